//! Notices namespaces that went away. The DNS listener inside an attached namespace
//! keeps the namespace itself alive, so its veth never disappears on its own; what
//! tells us is the name: the path or process no longer leads to the namespace we
//! attached (a stat, four times a second, off the runtime's workers).

use std::sync::Arc;
use std::time::Duration;

use netagent_overlay::NetnsRef;
use tracing::info;

use super::Agent;
use crate::model::EndpointRecord;
use crate::store::{Store, Txn};

const SWEEP: Duration = Duration::from_millis(250);

/// An endpoint's identity: the namespace's nsfs inode (see `NetnsRef::identity`).
pub(super) fn endpoint_id(ino: u64) -> String {
    format!("ns:{ino}")
}

/// The namespace a stored endpoint was attached to, as its record names it.
pub(super) fn recorded_namespace(record: &EndpointRecord) -> Option<(NetnsRef, u64)> {
    let netns = NetnsRef::parse(&record.netns).ok()?;
    let ino = record.id.strip_prefix("ns:")?.parse().ok()?;
    Some((netns, ino))
}

/// Which of `watched` no longer lead to the namespace they were attached to: one
/// `stat` each, all on one blocking thread.
pub(super) async fn gone<K: Send + 'static>(watched: Vec<(K, NetnsRef, u64)>) -> Vec<K> {
    if watched.is_empty() {
        return Vec::new();
    }
    tokio::task::spawn_blocking(move || {
        watched
            .into_iter()
            .filter(|(_, netns, ino)| netns.identity().ok() != Some(*ino))
            .map(|(k, _, _)| k)
            .collect()
    })
    .await
    .unwrap_or_default()
}

impl<S: Store> Agent<S> {
    pub(super) async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.retry_pending_deletes().await;
            let watched: Vec<(String, NetnsRef, u64)> = {
                let state = self.local.lock().await;
                state
                    .endpoints
                    .iter()
                    .map(|(k, e)| (k.clone(), e.netns.clone(), e.ino))
                    .collect()
            };
            self.remove_endpoints(gone(watched).await, "namespace gone")
                .await;
        }
    }

    /// Removes endpoints of this host everywhere: kernel, DNS, local view, store.
    pub(super) async fn remove_endpoints(&self, keys: Vec<String>, why: &str) {
        if keys.is_empty() {
            return;
        }
        let mut state = self.local.lock().await;
        for key in keys {
            info!(key, why, "removing an endpoint");
            self.drop_local(&mut state, &key).await;
            self.forget_in_store(&key).await;
        }
    }

    async fn retry_pending_deletes(&self) {
        let keys: Vec<String> = self
            .pending_deletes
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect();
        for key in keys {
            if self
                .store
                .txn(Txn::default().delete(key.clone()))
                .await
                .is_ok()
            {
                self.pending_deletes.lock().unwrap().remove(&key);
            } else {
                return;
            }
        }
    }
}
