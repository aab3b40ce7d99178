//! The embedded DNS inside each attached namespace, at 127.0.0.11:53 (UDP and TCP)
//! as Docker has it, so resolv.conf files written for Docker work unchanged. A
//! namespace's listener answers for exactly the networks it is attached to.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use netagent_overlay::{Netns, NetnsRef};
use tokio::task::JoinHandle;
use tracing::warn;

use super::{Agent, LocalState};
use crate::store::Store;

pub const DNS_ADDRESS: &str = "127.0.0.11:53";

pub struct Listener {
    scope: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Listener {
    async fn stop(self) {
        for t in self.tasks {
            t.abort();
            // Wait until the sockets are closed, so the address can be bound again.
            let _ = t.await;
        }
    }
}

impl<S: Store> Agent<S> {
    /// Opens, re-scopes or closes listeners to match the attached namespaces.
    pub(super) async fn sync_listeners(&self, state: &mut LocalState) {
        let mut wanted: HashMap<u64, (NetnsRef, BTreeSet<String>)> = HashMap::new();
        for e in state.endpoints.values() {
            wanted
                .entry(e.ino)
                .or_insert_with(|| (e.netns.clone(), BTreeSet::new()))
                .1
                .insert(e.record.network.clone());
        }
        let stale: Vec<u64> = state
            .listeners
            .iter()
            .filter(|(ino, l)| {
                wanted
                    .get(ino)
                    .is_none_or(|(_, scope)| !scope.iter().eq(l.scope.iter()))
            })
            .map(|(ino, _)| *ino)
            .collect();
        for ino in stale {
            if let Some(l) = state.listeners.remove(&ino) {
                l.stop().await;
            }
        }
        for (ino, (netns, scope)) in wanted {
            if state.listeners.contains_key(&ino) {
                continue;
            }
            let scope: Vec<String> = scope.into_iter().collect();
            match self.open_listener(&netns, ino, &scope).await {
                Ok(tasks) => {
                    state.listeners.insert(ino, Listener { scope, tasks });
                }
                Err(e) => warn!(netns = %netns, error = %e, "no embedded DNS in this namespace"),
            }
        }
    }

    async fn open_listener(
        &self,
        netns: &NetnsRef,
        identity: u64,
        scope: &[String],
    ) -> netagent_overlay::Result<Vec<JoinHandle<()>>> {
        let addr: SocketAddr = DNS_ADDRESS.parse().expect("constant address");
        let ns = Netns::open_expecting(netns, identity)?;
        let (udp, tcp) = ns.bind_listeners(addr).await?;
        let to_err = |source| netagent_overlay::Error::Listen {
            addr,
            ns: netns.to_string(),
            source,
        };
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(to_err)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(to_err)?;
        let scope: netagent_dns::Scope = Arc::from(scope.to_vec());
        Ok(vec![
            self.dns.serve_udp(udp, scope.clone()),
            self.dns.serve_tcp(tcp, scope),
        ])
    }
}
