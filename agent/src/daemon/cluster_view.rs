//! The cluster as this host sees it, and the only writer of that view. It changes in
//! four ways: the store's watch (`apply_event`), this host's own successful writes
//! (`commit`, mirrored at once so the next decision sees them before the watch says
//! so), a fresh read (`reload`, after losing a race), and deletions this host owes the
//! store while it is away (`delete_or_owe`: out of the view at once, and kept out of
//! every fresh picture until the store has them). Decisions that must not use a
//! cached view (networks) read the store through `fresh`.

use std::collections::BTreeSet;
use std::sync::{Mutex, RwLock};

use tracing::{info, warn};

use crate::model::{self, Cluster};
use crate::store::{self, Change, Compare, Store, StoreEvent, Txn};

pub struct ClusterView<S> {
    store: S,
    cluster: RwLock<Cluster>,
    /// This host's name: deletions of its endpoints by others are reported.
    node: String,
    /// Keys deleted here that the store has not deleted yet (it was away).
    owed: Mutex<BTreeSet<String>>,
}

/// What a claim found in the view: the record is there already, or this write would
/// make it so.
pub enum Claim<T> {
    Held(T),
    /// Write `value` at `key`; `only_if_absent`: nobody else may have it meanwhile.
    Write {
        key: String,
        bytes: Vec<u8>,
        only_if_absent: bool,
        value: T,
    },
}

/// Why a claim gave up.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError<E> {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The caller's pick refused (no room left, say).
    #[error(transparent)]
    Refused(E),
    #[error("lost the race for it {0} times (hosts racing); try again")]
    Contended(usize),
}

impl<S: Store> ClusterView<S> {
    pub fn new(store: S, node: &str) -> Self {
        ClusterView {
            store,
            cluster: RwLock::new(Cluster::default()),
            node: node.to_owned(),
            owed: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Reads the view; `f` must not block (the watch waits on it).
    pub fn read<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.cluster.read().unwrap())
    }

    /// Applies what the watch delivered; returns the store keys of this host's
    /// endpoints that someone else deleted (their namespaces must be detached),
    /// whether the watch says so change by change or in a fresh picture after a
    /// reconnection.
    pub fn apply_event(&self, event: StoreEvent) -> Vec<String> {
        let owed = self.owed.lock().unwrap().clone();
        let mut c = self.cluster.write().unwrap();
        let mine = |c: &Cluster| -> BTreeSet<String> {
            c.endpoints
                .iter()
                .filter(|(_, e)| e.node == self.node)
                .map(|(k, _)| format!("{}{k}", model::ENDPOINTS))
                .collect()
        };
        let before = mine(&c);
        match event {
            StoreEvent::Reset(loaded) => *c = Cluster::from_loaded(&loaded),
            StoreEvent::Changes(changes) => c.apply(&changes),
        }
        // What this host deleted stays deleted, whatever the store still says.
        let owed: Vec<Change> = owed
            .into_iter()
            .map(|key| Change { key, value: None })
            .collect();
        c.apply(&owed);
        let after = mine(&c);
        before.difference(&after).cloned().collect()
    }

    /// Writes `txn` to the store; when it took effect, its puts and deletes are
    /// mirrored into the view (prefix deletes come with the watch).
    pub async fn commit(&self, txn: Txn) -> store::Result<bool> {
        let changes: Vec<Change> = txn
            .put
            .iter()
            .map(|(key, value)| Change {
                key: key.clone(),
                value: Some(value.clone()),
            })
            .chain(txn.delete.iter().map(|key| Change {
                key: key.clone(),
                value: None,
            }))
            .collect();
        let done = self.store.txn(txn).await?;
        if done {
            self.cluster.write().unwrap().apply(&changes);
        }
        Ok(done)
    }

    /// Deletes `key` in the store, or, while the store is away, owes it the
    /// deletion: the key leaves the view now (the DNS stops answering it) and stays
    /// out of it until [`ClusterView::pay_owed`] gets the store to agree.
    pub async fn delete_or_owe(&self, key: &str) {
        if let Err(e) = self.commit(Txn::default().delete(key)).await {
            warn!(key, error = %e, "cannot remove the record from the store yet; will retry");
            self.owed.lock().unwrap().insert(key.to_owned());
            self.cluster.write().unwrap().apply(&[Change {
                key: key.to_owned(),
                value: None,
            }]);
        }
    }

    /// Retries the deletions owed to the store, oldest first, until one fails.
    pub async fn pay_owed(&self) {
        let owed: Vec<String> = self.owed.lock().unwrap().iter().cloned().collect();
        for key in owed {
            if self
                .commit(Txn::default().delete(key.clone()))
                .await
                .is_err()
            {
                return;
            }
            self.owed.lock().unwrap().remove(&key);
        }
    }

    /// Replaces the view with the store as it is now.
    pub async fn reload(&self) -> store::Result<()> {
        let loaded = self.store.load().await?;
        *self.cluster.write().unwrap() = Cluster::from_loaded(&loaded);
        Ok(())
    }

    /// The store as it is now, without touching the view.
    pub async fn fresh(&self) -> store::Result<Cluster> {
        Ok(Cluster::from_loaded(&self.store.load().await?))
    }

    /// Takes a record that only one host may hold (a block, a mesh address): `pick`
    /// looks at the view and either finds it held already or proposes a write; a
    /// write that lost to another host's reloads the view and picks again.
    pub async fn claim<T, E>(
        &self,
        retries: usize,
        pick: impl Fn(&Cluster) -> Result<Claim<T>, E>,
    ) -> Result<T, ClaimError<E>> {
        for _ in 0..retries {
            let claim = self.read(&pick).map_err(ClaimError::Refused)?;
            let (key, bytes, only_if_absent, value) = match claim {
                Claim::Held(value) => return Ok(value),
                Claim::Write {
                    key,
                    bytes,
                    only_if_absent,
                    value,
                } => (key, bytes, only_if_absent, value),
            };
            let mut txn = Txn::default().put(key.clone(), bytes);
            if only_if_absent {
                txn = txn.when(Compare::Absent(key.clone()));
            }
            if self.commit(txn).await? {
                return Ok(value);
            }
            info!(key, "another host took it first; reading the store again");
            self.reload().await?;
        }
        Err(ClaimError::Contended(retries))
    }
}
