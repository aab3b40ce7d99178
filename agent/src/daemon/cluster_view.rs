//! The cluster as this host sees it, and the only writer of that view. It changes in
//! four ways: the store's watch (`apply_event`), this host's own successful writes
//! (`commit`, mirrored at once so the next decision sees them before the watch says
//! so), a fresh read (`reload`, after losing a race), and deletions this host owes the
//! store while it is away (`delete_or_owe`: out of the view at once, and kept out of
//! every fresh picture until the store has them). Decisions that must not use a
//! cached view (networks) read the store through `fresh`.
//!
//! A mirrored write is kept (`unseen`, with the revision the store gave it) until the
//! watch reaches that revision: an event or a picture older than the write, arriving
//! after it, must not undo it in the view (a network removed and made again at once
//! would otherwise lose its new record to the old removal's event, and keep its old
//! blocks until the watch brought their prefix delete).
//!
//! An endpoint of this host that leaves the view by someone else's hand is only a
//! suspect: a picture read before this host's own latest write may arrive after that
//! write. The reconcile pass detaches only what a fresh read confirms
//! (`confirm_deleted`).
//!
//! Every write also notes the keys it touched (`dirty`), so the DNS, which is derived
//! from the view, can follow a change at the cost of the change rather than of the
//! cluster's size.
//!
//! Lock order: `cluster`, then `unseen`, `owed` or `dirty`; no other lock is taken
//! inside them.

use std::collections::{BTreeMap, BTreeSet};
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
    /// This host's endpoints that left the view by a store event or a fresh picture,
    /// to be confirmed before they are detached.
    suspects: Mutex<BTreeSet<String>>,
    /// What changed since [`ClusterView::read_changed`] last took it.
    dirty: Mutex<Dirty>,
    /// This host's writes the watch has not delivered yet, by key. Bounded by what
    /// this host writes between two watch events.
    unseen: Mutex<BTreeMap<String, Unseen>>,
}

/// A write of this host's: the store's revision after it, and the value (None: a
/// deletion).
type Unseen = (i64, Option<Vec<u8>>);

/// The keys written since the last look, or the whole view (a fresh picture).
#[derive(Debug, PartialEq)]
pub enum Dirty {
    Keys(BTreeSet<String>),
    All,
}

/// More changed keys than this between two looks count as a whole new picture.
const MOST_DIRTY_KEYS: usize = 10_000;

impl Dirty {
    fn add<'a>(&mut self, keys: impl IntoIterator<Item = &'a String>) {
        if let Dirty::Keys(set) = self {
            set.extend(keys.into_iter().cloned());
            if set.len() > MOST_DIRTY_KEYS {
                *self = Dirty::All;
            }
        }
    }
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
    #[error("lost the race for it {0} times (hosts racing)")]
    Contended(usize),
}

impl<S: Store> ClusterView<S> {
    pub fn new(store: S, node: &str) -> Self {
        ClusterView {
            store,
            cluster: RwLock::new(Cluster::default()),
            node: node.to_owned(),
            owed: Mutex::new(BTreeSet::new()),
            suspects: Mutex::new(BTreeSet::new()),
            dirty: Mutex::new(Dirty::All),
            unseen: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Reads the view; `f` must not block (the watch waits on it).
    pub fn read<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.cluster.read().unwrap())
    }

    /// Reads the view with what changed in it since the last call; `f` must not block.
    pub fn read_changed<R>(&self, f: impl FnOnce(&Cluster, Dirty) -> R) -> R {
        let c = self.cluster.read().unwrap();
        let dirty = std::mem::replace(
            &mut *self.dirty.lock().unwrap(),
            Dirty::Keys(BTreeSet::new()),
        );
        f(&c, dirty)
    }

    /// Applies what the watch delivered.
    pub fn apply_event(&self, event: StoreEvent) {
        match event {
            StoreEvent::Reset(loaded) => {
                self.change(None, |c| *c = Cluster::from_loaded(&loaded));
            }
            // A resumed watch may replay what a fresher read already holds.
            StoreEvent::Changes { revision, .. } if revision <= self.read(|c| c.revision) => {}
            StoreEvent::Changes { revision, changes } => self.change(Some(&changes), |c| {
                c.apply(&changes);
                c.revision = c.revision.max(revision);
            }),
        }
    }

    /// Changes the view with `f`, keeps out what this host owes the store, and
    /// makes suspects of this host's endpoints that left it. `touched`: the keys `f`
    /// changes, so only those are compared; None: a whole new picture.
    fn change(&self, touched: Option<&[Change]>, f: impl FnOnce(&mut Cluster)) {
        let mine = |c: &Cluster| -> BTreeSet<String> {
            let here = |key: &str| c.endpoints.get(key).is_some_and(|e| e.node == self.node);
            match touched {
                Some(changes) => changes
                    .iter()
                    .filter(|ch| ch.key.strip_prefix(model::ENDPOINTS).is_some_and(here))
                    .map(|ch| ch.key.clone())
                    .collect(),
                None => c
                    .endpoints
                    .iter()
                    .filter(|(_, e)| e.node == self.node)
                    .map(|(k, _)| format!("{}{k}", model::ENDPOINTS))
                    .collect(),
            }
        };
        let mut c = self.cluster.write().unwrap();
        let before = mine(&c);
        let was = c.revision;
        f(&mut c);
        if c.revision < was {
            // The store went back in revisions (restored from a backup): what this
            // host wrote under the old numbering is either in the picture or lost.
            self.unseen.lock().unwrap().clear();
        }
        // Keys the event did not touch hold these values already; touched ones are
        // dirty anyway.
        let newer = self.unseen_after(c.revision);
        c.apply(&newer);
        let owed: Vec<Change> = self
            .owed
            .lock()
            .unwrap()
            .iter()
            .map(|key| Change {
                key: key.clone(),
                value: None,
            })
            .collect();
        c.apply(&owed);
        let gone: Vec<String> = before.difference(&mine(&c)).cloned().collect();
        {
            let mut dirty = self.dirty.lock().unwrap();
            match touched {
                Some(changes) => dirty.add(changes.iter().chain(&owed).map(|ch| &ch.key)),
                None => *dirty = Dirty::All,
            }
        }
        drop(c);
        self.suspects.lock().unwrap().extend(gone);
    }

    /// This host's writes newer than `revision`, to apply again over a picture of
    /// it; the others the picture holds already and are forgotten.
    fn unseen_after(&self, revision: i64) -> Vec<Change> {
        let mut unseen = self.unseen.lock().unwrap();
        unseen.retain(|_, (at, _)| *at > revision);
        unseen
            .iter()
            .map(|(key, (_, value))| Change {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }

    /// This host's endpoints that left the view since the last call.
    pub fn take_suspects(&self) -> Vec<String> {
        std::mem::take(&mut *self.suspects.lock().unwrap())
            .into_iter()
            .collect()
    }

    /// Which of `suspects` the store has indeed deleted. One fresh read decides;
    /// those it still holds as this host's records go back into the view. When the
    /// store cannot be read the suspects wait for the next pass.
    pub async fn confirm_deleted(&self, suspects: Vec<String>) -> Vec<String> {
        if suspects.is_empty() {
            return suspects;
        }
        let loaded = match self.store.load().await {
            Ok(loaded) => loaded,
            Err(e) => {
                warn!(error = %e, "cannot confirm deletions of this host's endpoints yet");
                self.suspects.lock().unwrap().extend(suspects);
                return Vec::new();
            }
        };
        // Still this host's record in the store: the event that hid it was stale.
        // Read with the view's own size bound and checks.
        let wanted: BTreeSet<&str> = suspects.iter().map(String::as_str).collect();
        let candidates = store::Loaded {
            revision: loaded.revision,
            pairs: loaded
                .pairs
                .into_iter()
                .filter(|(k, _)| wanted.contains(k.as_str()))
                .collect(),
        };
        let checked = Cluster::from_loaded(&candidates);
        let held: Vec<Change> = candidates
            .pairs
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix(model::ENDPOINTS)
                    .and_then(|k| checked.endpoints.get(k))
                    .is_some_and(|e| e.node == self.node)
            })
            .map(|(key, value)| Change {
                key,
                value: Some(value),
            })
            .collect();
        if !held.is_empty() {
            let keys: Vec<&str> = held.iter().map(|c| c.key.as_str()).collect();
            info!(
                ?keys,
                "a stale store event hid this host's endpoints; restored"
            );
            // Only these keys: the rest of the view may be newer than this read.
            // They are this host's, written under the lock the caller holds.
            self.change(Some(&held), |c| c.apply(&held));
        }
        suspects
            .into_iter()
            .filter(|k| !held.iter().any(|c| &c.key == k))
            .collect()
    }

    /// Writes `txn` to the store; when it took effect, it is mirrored into the view
    /// in the store's order (prefix deletes, deletes, puts), a prefix delete as the
    /// keys the view holds under it (the watch brings any others).
    pub async fn commit(&self, txn: Txn) -> store::Result<bool> {
        let prefixes = txn.delete_prefix.clone();
        let written: Vec<Change> = txn
            .delete
            .iter()
            .map(|key| Change {
                key: key.clone(),
                value: None,
            })
            .chain(txn.put.iter().map(|(key, value)| Change {
                key: key.clone(),
                value: Some(value.clone()),
            }))
            .collect();
        let Some(revision) = self.store.txn(txn).await? else {
            return Ok(false);
        };
        let mut c = self.cluster.write().unwrap();
        if c.revision >= revision {
            // The watch brought this write already, and maybe later ones over it.
            return Ok(true);
        }
        let mut unseen = self.unseen.lock().unwrap();
        // A later write of this host's got there first (two tasks racing).
        let newest = |key: &String| unseen.get(key).is_none_or(|(at, _)| *at <= revision);
        let swept: Vec<String> = prefixes
            .iter()
            .flat_map(|p| c.keys_under(p))
            .filter(newest)
            .collect();
        // This host's endpoints a prefix delete took (a network removed): suspects,
        // as the watch would have made them, so the reconcile pass detaches them.
        let mine: Vec<String> = swept
            .iter()
            .filter(|k| {
                k.strip_prefix(model::ENDPOINTS)
                    .and_then(|k| c.endpoints.get(k))
                    .is_some_and(|e| e.node == self.node)
            })
            .cloned()
            .collect();
        let changes: Vec<Change> = swept
            .into_iter()
            .map(|key| Change { key, value: None })
            .chain(written.into_iter().filter(|ch| newest(&ch.key)))
            .collect();
        c.apply(&changes);
        for ch in &changes {
            unseen.insert(ch.key.clone(), (revision, ch.value.clone()));
        }
        drop(unseen);
        self.dirty
            .lock()
            .unwrap()
            .add(changes.iter().map(|ch| &ch.key));
        drop(c);
        self.suspects.lock().unwrap().extend(mine);
        Ok(true)
    }

    /// Deletes `key` in the store, or, while the store is away, owes it the
    /// deletion: the key leaves the view now (the DNS stops answering it) and stays
    /// out of it until [`ClusterView::pay_owed`] gets the store to agree.
    pub async fn delete_or_owe(&self, key: &str) {
        if let Err(e) = self.commit(Txn::default().delete(key)).await {
            warn!(key, error = %e, "cannot remove the record from the store yet; will retry");
            let mut c = self.cluster.write().unwrap();
            self.owed.lock().unwrap().insert(key.to_owned());
            c.apply(&[Change {
                key: key.to_owned(),
                value: None,
            }]);
            self.dirty.lock().unwrap().add([&key.to_owned()]);
        }
    }

    /// The addresses of `network` whose deletion this host still owes the store:
    /// not free to hand out yet.
    pub fn owed_addresses(&self, network: &str) -> Vec<std::net::Ipv4Addr> {
        let prefix = format!("{}{network}/", model::ENDPOINTS);
        self.owed
            .lock()
            .unwrap()
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.parse().ok())
            .collect()
    }

    /// Whether this host owes the store any deletion (no store call).
    pub fn has_owed(&self) -> bool {
        !self.owed.lock().unwrap().is_empty()
    }

    /// Retries the deletions owed to the store, in key order, until one fails.
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

    /// Replaces the view with the store as it is now (what this host owes the store
    /// stays out; its endpoints missing from the read become suspects).
    pub async fn reload(&self) -> store::Result<()> {
        let loaded = self.store.load().await?;
        // Checked once more under the write lock below; this spares the DNS a whole
        // new derivation for a read that will not be applied.
        if loaded.revision < self.read(|c| c.revision) {
            return Ok(());
        }
        self.change(None, |c| {
            // A read older than what the watch has applied since would undo those
            // changes, and the watch does not deliver them again (seen with a
            // hundred hosts attaching at once): the view already holds all it knows.
            if loaded.revision >= c.revision {
                *c = Cluster::from_loaded(&loaded);
            }
        });
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
