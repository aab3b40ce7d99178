//! The embedded DNS inside each attached namespace, at 127.0.0.11:53 (UDP and TCP)
//! as Docker has it, so resolv.conf files written for Docker work unchanged. A
//! namespace's listener answers for exactly the networks it is attached to.
//!
//! The sockets outlive the agent when a keeper holds copies of them (see
//! [`crate::keeper`]): a listener opened here is copied to the keeper, one closed here
//! is forgotten there, and at start the sockets the previous agent left are taken
//! back instead of binding new ones, so queries sent across a restart are answered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex as StdMutex, Weak};

use netagent_dns::{DnsServer, ForwardLimits, Forwarder};
use netagent_overlay::NetnsRef;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::datapath::Datapath;
use super::local::LocalEndpoint;
use crate::keeper::{Inherited, KeeperLink};

pub const DNS_ADDRESS: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(127, 0, 0, 11),
    53,
));

/// One namespace's sockets and the tasks serving them.
struct Listener {
    scope: Vec<String>,
    /// The namespace's own DNS servers (empty: the host's).
    upstreams: Vec<SocketAddr>,
    /// The sockets themselves, kept here so they can be served again under another
    /// scope without being closed (and without losing what waits in them).
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    served: Served,
}

/// The tasks serving one namespace's sockets.
struct Served {
    stop: watch::Sender<bool>,
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
}

impl Served {
    /// Ends both tasks at once (the namespace is gone or changes scope).
    async fn abort(self) {
        for t in [self.udp, self.tcp] {
            t.abort();
            // Wait until their sockets are closed.
            let _ = t.await;
        }
    }

    /// Stops reading, answers what was read over UDP (forwards included), then
    /// ends; TCP stops at once (no more connections under this scope).
    async fn drain(self) {
        self.tcp.abort();
        let _ = self.stop.send(true);
        let _ = self.udp.await;
        let _ = self.tcp.await;
    }
}

/// Whose DNS address may still be held by a copy that is going away.
#[derive(Default)]
struct Contested {
    namespaces: std::collections::HashSet<u64>,
    /// Every namespace's, until then (a keeper was just told to let go).
    all_until: Option<std::time::Instant>,
}

impl Contested {
    fn contains(&self, ino: u64) -> bool {
        self.namespaces.contains(&ino)
            || self
                .all_until
                .is_some_and(|t| std::time::Instant::now() < t)
    }
}

/// The keeper and what it gave back at start.
struct Handover {
    link: KeeperLink,
    /// Sockets of the previous agent not yet claimed by a namespace of this one.
    inherited: StdMutex<HashMap<u64, Inherited>>,
}

/// One listener per attached namespace, by its identity. The lock is held across
/// binding (a namespace switch on the datapath's thread): two passes must not bind
/// the same namespace's address at once.
#[derive(Default)]
pub struct Listeners {
    open: tokio::sync::Mutex<HashMap<u64, Listener>>,
    handover: Option<Handover>,
    /// Namespaces whose DNS address a copy going away may still hold a moment (the
    /// keeper's, refused or just let go of): their binds are retried, no others.
    contested: StdMutex<Contested>,
    /// Old tasks of re-scoped listeners, answering what they read; awaited on close.
    draining: StdMutex<Vec<JoinHandle<()>>>,
    /// One forwarder (sockets and cache) per set of namespaces' own DNS servers,
    /// shared by the namespaces naming the same set, gone with the last of them.
    own_upstreams: StdMutex<HashMap<Vec<SocketAddr>, Weak<Forwarder>>>,
}

/// Binds retried while the DNS address is still held by another copy (50 ms apart).
const BIND_RETRIES: u32 = 20;

/// Distinct sets of namespaces' own DNS servers at most; a namespace beyond it
/// forwards to the host's (each set has its own sockets and cache).
const MAX_OWN_UPSTREAM_SETS: usize = 64;
/// Bounds of one such set's forwarder: a namespace's own servers serve few.
const OWN_UPSTREAM_LIMITS: ForwardLimits = ForwardLimits {
    max_in_flight: 512,
    cache_bytes: 512 << 10,
};

impl Listeners {
    /// Listeners whose sockets the keeper behind `link` also holds; `inherited` are
    /// those the previous agent left.
    pub fn kept(link: KeeperLink, inherited: HashMap<u64, Inherited>, refused: Vec<u64>) -> Self {
        if !inherited.is_empty() {
            info!(
                namespaces = inherited.len(),
                "took over the previous agent's DNS sockets"
            );
        }
        Self {
            handover: Some(Handover {
                link,
                inherited: StdMutex::new(inherited),
            }),
            contested: StdMutex::new(Contested {
                namespaces: refused.into_iter().collect(),
                all_until: None,
            }),
            ..Default::default()
        }
    }

    /// Listeners without a keeper, started right after one was told to let go: its
    /// copies may hold the addresses a moment longer.
    pub fn after_keeper_stopped() -> Self {
        Self {
            contested: StdMutex::new(Contested {
                namespaces: Default::default(),
                all_until: Some(std::time::Instant::now() + std::time::Duration::from_secs(2)),
            }),
            ..Default::default()
        }
    }

    /// Opens, re-scopes or closes listeners to match the attached namespaces.
    pub async fn sync<D: Datapath>(
        &self,
        datapath: &D,
        dns: &Arc<DnsServer>,
        endpoints: &BTreeMap<String, LocalEndpoint>,
    ) {
        let mut wanted: HashMap<u64, (NetnsRef, BTreeSet<String>, Vec<SocketAddr>)> =
            HashMap::new();
        for e in endpoints.values() {
            let w = wanted
                .entry(e.ino)
                .or_insert_with(|| (e.netns.clone(), BTreeSet::new(), Vec::new()));
            w.1.insert(e.record.network.clone());
            // One namespace, one resolver: the first endpoint that names servers.
            if w.2.is_empty() {
                w.2 = e.upstreams.clone();
            }
        }
        let mut open = self.open.lock().await;
        let gone: Vec<u64> = open
            .keys()
            .filter(|ino| !wanted.contains_key(ino))
            .copied()
            .collect();
        for ino in gone {
            if let Some(l) = open.remove(&ino) {
                l.served.abort().await;
                if let Some(h) = &self.handover {
                    h.link.forget(ino);
                }
            }
        }
        for (ino, (netns, scope, upstreams)) in wanted {
            let scope: Vec<String> = scope.into_iter().collect();
            if let Some(l) = open.get_mut(&ino) {
                if l.scope != scope || l.upstreams != upstreams {
                    let forwarder = self.forwarder_for(&upstreams);
                    if let Some(old) = rescope(dns, l, scope, upstreams, forwarder) {
                        let mut draining = self.draining.lock().unwrap();
                        draining.retain(|t| !t.is_finished());
                        draining.push(tokio::spawn(old.drain()));
                    }
                }
                continue;
            }
            let forwarder = self.forwarder_for(&upstreams);
            let sockets = match self.inherited(ino) {
                Some(kept) => Ok((kept.udp, kept.tcp)),
                None => self.bind(datapath, &netns, ino).await,
            };
            let opened = sockets.map_err(|e| e.to_string()).and_then(|(udp, tcp)| {
                Listener::open(dns, udp, tcp, scope, upstreams, forwarder)
                    .map_err(|e| e.to_string())
            });
            match opened {
                Ok(l) => {
                    if let Some(h) = &self.handover {
                        h.link.keep(ino, l.udp.as_fd(), l.tcp.as_fd());
                    }
                    open.insert(ino, l);
                }
                Err(e) => {
                    // Whatever the keeper still holds for it would only be in the way.
                    if let Some(h) = &self.handover {
                        h.link.forget(ino);
                    }
                    warn!(netns = %netns, addr = %DNS_ADDRESS, error = %e, "no embedded DNS in this namespace")
                }
            }
        }
    }

    /// The forwarder for a namespace's own DNS servers (None: the host's): shared
    /// with every namespace naming the same servers.
    fn forwarder_for(&self, upstreams: &[SocketAddr]) -> Option<Arc<Forwarder>> {
        if upstreams.is_empty() {
            return None;
        }
        let mut sets = self.own_upstreams.lock().unwrap();
        sets.retain(|_, f| f.strong_count() > 0);
        if let Some(f) = sets.get(upstreams).and_then(Weak::upgrade) {
            return Some(f);
        }
        if sets.len() >= MAX_OWN_UPSTREAM_SETS {
            warn!(upstreams = ?upstreams, max = MAX_OWN_UPSTREAM_SETS, "too many distinct sets of namespaces' own DNS servers: this namespace forwards to the host's");
            return None;
        }
        // Bound here, on a runtime thread, in the host's namespace: upstream sockets
        // never live in a container.
        match Forwarder::with_limits(upstreams.to_vec(), OWN_UPSTREAM_LIMITS) {
            Ok(f) => {
                let f = Arc::new(f);
                sets.insert(upstreams.to_vec(), Arc::downgrade(&f));
                Some(f)
            }
            Err(e) => {
                warn!(error = %e, "this namespace forwards to the host's DNS servers");
                None
            }
        }
    }

    /// Binds a namespace's DNS sockets. Where the address may still be held by a
    /// copy that is going away (a keeper's copy this agent refused, a keeper told to
    /// let go a moment ago), the bind is retried for a second; anywhere else (a
    /// container's own server on port 53, say) the first failure stands.
    async fn bind<D: Datapath>(
        &self,
        datapath: &D,
        netns: &NetnsRef,
        ino: u64,
    ) -> netagent_overlay::Result<(std::net::UdpSocket, std::net::TcpListener)> {
        let mut tries = 0;
        loop {
            match datapath.bind_dns(netns, ino, DNS_ADDRESS).await {
                Err(netagent_overlay::Error::Listen { ref source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && tries < BIND_RETRIES
                        && self.contested.lock().unwrap().contains(ino) =>
                {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => {
                    self.contested.lock().unwrap().namespaces.remove(&ino);
                    return other;
                }
            }
        }
    }

    fn inherited(&self, ino: u64) -> Option<Inherited> {
        self.handover
            .as_ref()?
            .inherited
            .lock()
            .unwrap()
            .remove(&ino)
    }

    /// Lets go of the previous agent's sockets that no attached namespace claimed.
    pub fn release_unclaimed(&self) {
        let Some(h) = &self.handover else { return };
        let unclaimed: Vec<u64> = h
            .inherited
            .lock()
            .unwrap()
            .drain()
            .map(|(i, _)| i)
            .collect();
        for ino in unclaimed {
            info!(
                ino,
                "the previous agent's DNS sockets for a namespace no longer attached: closed"
            );
            h.link.forget(ino);
        }
    }

    /// Stops every listener gracefully: no more reads, answers for what was read.
    /// The sockets stay open in the keeper, if there is one, for the next agent.
    pub async fn close_all(&self) {
        let open: Vec<Listener> = self.open.lock().await.drain().map(|(_, l)| l).collect();
        futures::future::join_all(open.into_iter().map(|l| l.served.drain())).await;
        let draining: Vec<JoinHandle<()>> = std::mem::take(&mut *self.draining.lock().unwrap());
        futures::future::join_all(draining).await;
        // What is queued for the keeper reaches it before this process ends.
        if let Some(h) = &self.handover {
            if let Some(sending) = h.link.close() {
                let _ = tokio::task::spawn_blocking(move || sending.join()).await;
            }
        }
    }

    /// The namespaces with a listener: the networks each answers for, and where.
    pub async fn scopes(&self) -> BTreeMap<u64, (Vec<String>, Option<SocketAddr>)> {
        self.open
            .lock()
            .await
            .iter()
            .map(|(ino, l)| (*ino, (l.scope.clone(), l.udp.local_addr().ok())))
            .collect()
    }
}

impl Listener {
    fn open(
        dns: &Arc<DnsServer>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        scope: Vec<String>,
        upstreams: Vec<SocketAddr>,
        forwarder: Option<Arc<Forwarder>>,
    ) -> std::io::Result<Self> {
        let served = serve(dns, &udp, &tcp, &scope, forwarder)?;
        Ok(Listener {
            scope,
            upstreams,
            udp,
            tcp,
            served,
        })
    }
}

/// Serves a listener's sockets under a new scope (they stay open throughout);
/// returns the old tasks, to be drained: they answer what they read.
fn rescope(
    dns: &Arc<DnsServer>,
    l: &mut Listener,
    scope: Vec<String>,
    upstreams: Vec<SocketAddr>,
    forwarder: Option<Arc<Forwarder>>,
) -> Option<Served> {
    match serve(dns, &l.udp, &l.tcp, &scope, forwarder) {
        Ok(served) => {
            let old = std::mem::replace(&mut l.served, served);
            l.scope = scope;
            l.upstreams = upstreams;
            Some(old)
        }
        Err(e) => {
            warn!(addr = %DNS_ADDRESS, error = %e, "cannot serve this namespace's DNS under its new networks");
            None
        }
    }
}

/// Serves copies of `udp` and `tcp` (the originals stay with the listener).
fn serve(
    dns: &Arc<DnsServer>,
    udp: &std::net::UdpSocket,
    tcp: &std::net::TcpListener,
    scope: &[String],
    forwarder: Option<Arc<Forwarder>>,
) -> std::io::Result<Served> {
    let udp = tokio::net::UdpSocket::from_std(udp.try_clone()?)?;
    let tcp = tokio::net::TcpListener::from_std(tcp.try_clone()?)?;
    let mut scope = netagent_dns::Scope::new(scope.to_vec());
    if let Some(f) = forwarder {
        scope = scope.with_upstream(f);
    }
    let (stop, stopping) = watch::channel(false);
    Ok(Served {
        udp: dns.serve_udp_until(udp, scope.clone(), stopping),
        tcp: dns.serve_tcp(tcp, scope),
        stop,
    })
}
