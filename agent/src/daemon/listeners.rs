//! The embedded DNS inside each attached namespace, at 127.0.0.11:53 (UDP and TCP)
//! as Docker has it, so resolv.conf files written for Docker work unchanged. A
//! namespace's listener answers for exactly the networks it is attached to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use netagent_dns::DnsServer;
use netagent_overlay::NetnsRef;
use tokio::task::JoinHandle;
use tracing::warn;

use super::datapath::Datapath;
use super::local::LocalEndpoint;

pub const DNS_ADDRESS: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(127, 0, 0, 11),
    53,
));

struct Listener {
    scope: Vec<String>,
    /// Where it listens (127.0.0.11:53 in the namespace; a fake datapath's choice in tests).
    #[cfg_attr(not(test), allow(dead_code))]
    udp: Option<SocketAddr>,
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

/// One listener per attached namespace, by its identity. The lock is held across
/// binding (a namespace switch on the datapath's thread): two passes must not bind
/// the same namespace's address at once.
#[derive(Default)]
pub struct Listeners {
    open: tokio::sync::Mutex<HashMap<u64, Listener>>,
}

impl Listeners {
    /// Opens, re-scopes or closes listeners to match the attached namespaces.
    pub async fn sync<D: Datapath>(
        &self,
        datapath: &D,
        dns: &Arc<DnsServer>,
        endpoints: &BTreeMap<String, LocalEndpoint>,
    ) {
        let mut wanted: HashMap<u64, (NetnsRef, BTreeSet<String>)> = HashMap::new();
        for e in endpoints.values() {
            wanted
                .entry(e.ino)
                .or_insert_with(|| (e.netns.clone(), BTreeSet::new()))
                .1
                .insert(e.record.network.clone());
        }
        let mut open = self.open.lock().await;
        let stale: Vec<u64> = open
            .iter()
            .filter(|(ino, l)| {
                wanted
                    .get(ino)
                    .is_none_or(|(_, scope)| !scope.iter().eq(l.scope.iter()))
            })
            .map(|(ino, _)| *ino)
            .collect();
        for ino in stale {
            if let Some(l) = open.remove(&ino) {
                l.stop().await;
            }
        }
        for (ino, (netns, scope)) in wanted {
            if open.contains_key(&ino) {
                continue;
            }
            let scope: Vec<String> = scope.into_iter().collect();
            match datapath.bind_dns(&netns, ino, DNS_ADDRESS).await {
                Ok((udp, tcp)) => match serve(dns, udp, tcp, &scope) {
                    Ok((addr, tasks)) => {
                        open.insert(
                            ino,
                            Listener {
                                scope,
                                udp: addr,
                                tasks,
                            },
                        );
                    }
                    Err(e) => {
                        warn!(netns = %netns, addr = %DNS_ADDRESS, error = %e, "no embedded DNS in this namespace")
                    }
                },
                Err(e) => {
                    warn!(netns = %netns, addr = %DNS_ADDRESS, error = %e, "no embedded DNS in this namespace")
                }
            }
        }
    }

    pub async fn close_all(&self) {
        for (_, l) in self.open.lock().await.drain() {
            l.stop().await;
        }
    }

    /// The namespaces with a listener: the networks each answers for, and where.
    #[cfg(test)]
    pub async fn scopes(&self) -> BTreeMap<u64, (Vec<String>, Option<SocketAddr>)> {
        self.open
            .lock()
            .await
            .iter()
            .map(|(ino, l)| (*ino, (l.scope.clone(), l.udp)))
            .collect()
    }
}

type Served = (Option<SocketAddr>, Vec<JoinHandle<()>>);

fn serve(
    dns: &Arc<DnsServer>,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    scope: &[String],
) -> std::io::Result<Served> {
    let udp = tokio::net::UdpSocket::from_std(udp)?;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let addr = udp.local_addr().ok();
    let scope: netagent_dns::Scope = Arc::from(scope.to_vec());
    Ok((
        addr,
        vec![dns.serve_udp(udp, scope.clone()), dns.serve_tcp(tcp, scope)],
    ))
}
