//! Notices namespaces that went away. The DNS listener inside an attached namespace
//! keeps the namespace itself alive, so its veth never disappears on its own; what
//! tells us is the name: the path or process no longer leads to the namespace we
//! attached (a stat per namespace, off the runtime's workers). The datapath wakes
//! us when a name may have gone (a deleted file, an exited process), and a full
//! check every few seconds catches what it cannot see; an idle host does nothing
//! in between.

use std::sync::Arc;
use std::time::Duration;

use super::datapath::Datapath;
use super::Agent;
use crate::model::EndpointRecord;
use crate::store::Store;
use netagent_overlay::NetnsRef;

/// How often every namespace is checked however quiet the datapath's watch, and
/// deletions owed to the store are retried.
const BACKSTOP: Duration = Duration::from_secs(2);

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

impl<S: Store, D: Datapath> Agent<S, D> {
    pub(super) async fn liveness_loop(self: Arc<Self>) {
        let mut backstop = tokio::time::interval(BACKSTOP);
        backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = backstop.tick() => {
                    if self.view.has_owed() {
                        self.view.pay_owed().await;
                    }
                    if self.docker_book.owes_records() {
                        self.write_unrecorded().await;
                    }
                }
                () = self.datapath.namespace_may_be_gone() => {}
            }
            let watched: Vec<((String, u64), NetnsRef, u64)> = self.local.read(|endpoints| {
                endpoints
                    .iter()
                    // A Docker sandbox not made yet is not gone: the engine says
                    // when the endpoint leaves.
                    .filter(|(_, e)| e.ino != 0)
                    .map(|(k, e)| ((k.clone(), e.ino), e.netns.clone(), e.ino))
                    .collect()
            });
            let gone = self.datapath.gone(watched).await;
            self.remove_endpoints(gone, "namespace gone").await;
        }
    }
}
