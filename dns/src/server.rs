//! The server: serves already-bound UDP and TCP sockets (one pair per namespace,
//! opened there by the agent), each with the networks of that namespace as its scope.
//! The record set is an immutable snapshot swapped whole; the query path never waits
//! on a lock.
//!
//! A namespace is untrusted: everything one of them can make the server hold is
//! bounded per listener ([`Limits`]) and owned by the listener's task, so aborting
//! that task ([`DnsServer::serve_udp`], [`DnsServer::serve_tcp`]) ends its forwards
//! and connections and closes their sockets. The socket loops are in `udp` and `tcp`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use crate::answer::{answer, Answer, Transport};
use crate::forward::Forwarder;
use crate::snapshot::Snapshot;
use crate::{tcp, udp, wire};

/// Default TTL of local answers: short, so caching clients follow replicas.
pub const DEFAULT_TTL: u32 = 5;

/// What one namespace's sockets answer with: the networks whose names it sees, and
/// where names outside them go (its own upstreams, or the server's).
#[derive(Clone)]
pub struct Scope {
    networks: Arc<[String]>,
    upstream: Option<Arc<Forwarder>>,
}

impl Scope {
    pub fn new(networks: Vec<String>) -> Self {
        Self {
            networks: networks.into(),
            upstream: None,
        }
    }

    /// Names outside the networks go to `upstream` (with its own cache) instead of
    /// the server's forwarder.
    pub fn with_upstream(mut self, upstream: Arc<Forwarder>) -> Self {
        self.upstream = Some(upstream);
        self
    }

    pub fn networks(&self) -> &[String] {
        &self.networks
    }
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.networks.iter()).finish()
    }
}

/// What one namespace's listeners may hold at most.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// Forwarded UDP queries in flight per namespace; beyond it SERVFAIL at once.
    /// Well below the forwarder's global cap, so one namespace cannot spend the
    /// budget of all the others.
    pub udp_forwards: usize,
    /// Open TCP connections per namespace; beyond it new ones are closed at once.
    pub tcp_connections: usize,
    /// A TCP client that sends nothing for this long between queries is dropped.
    pub tcp_idle: Duration,
    /// Time to send a query's body once its length has come.
    pub tcp_read: Duration,
    /// Time for the client to take one answer.
    pub tcp_write: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            udp_forwards: 64,
            tcp_connections: 16,
            tcp_idle: Duration::from_secs(10),
            tcp_read: Duration::from_secs(5),
            tcp_write: Duration::from_secs(5),
        }
    }
}

pub struct DnsServer {
    snapshot: ArcSwap<Snapshot>,
    forwarder: Forwarder,
    ttl: u32,
    limits: Limits,
}

impl DnsServer {
    pub fn new(forwarder: Forwarder, ttl: u32) -> Arc<Self> {
        Self::with_limits(forwarder, ttl, Limits::default())
    }

    pub(crate) fn with_limits(forwarder: Forwarder, ttl: u32, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            forwarder,
            ttl,
            limits,
        })
    }

    /// Replaces the whole record set; queries in flight finish on the old one.
    pub fn update(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The local step of a query: answered from the current snapshot, or not local.
    pub(crate) fn local(&self, networks: &[&str], packet: &[u8], transport: Transport) -> Answer {
        answer(&self.snapshot.load(), networks, packet, transport, self.ttl)
    }

    /// The upstream's answer to a query that is not local: the namespace's own
    /// upstreams when it has them, else the server's.
    pub(crate) async fn forward(&self, scope: &Scope, packet: &[u8]) -> Option<Vec<u8>> {
        let q = wire::parse(packet).ok()?;
        let forwarder = scope.upstream.as_deref().unwrap_or(&self.forwarder);
        Some(forwarder.forward(packet, &q).await)
    }

    /// Answers one query completely, forwarding when it is not local (TCP's path).
    pub(crate) async fn handle(
        &self,
        scope: &Scope,
        networks: &[&str],
        packet: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        match self.local(networks, packet, transport) {
            Answer::Reply(bytes) => Some(bytes),
            Answer::Drop => None,
            Answer::Forward => self.forward(scope, packet).await,
        }
    }

    /// Serves a UDP socket until the task is aborted: batches of queries in one
    /// `recvmmsg`, their local answers in one `sendmmsg`. Forwarded queries run in
    /// tasks of their own (at most `Limits::udp_forwards`) so one slow upstream
    /// never holds up local answers; aborting the task aborts them too.
    pub fn serve_udp(self: &Arc<Self>, socket: UdpSocket, scope: Scope) -> JoinHandle<()> {
        tokio::spawn(udp::serve(self.clone(), socket, scope, None))
    }

    /// As [`DnsServer::serve_udp`], until `stop` turns true: then it reads no more
    /// (what arrives later waits in the socket for whoever holds it next), answers
    /// the forwarded queries still in flight (for at most the forward deadline) and
    /// ends. A restart loses no query this way.
    pub fn serve_udp_until(
        self: &Arc<Self>,
        socket: UdpSocket,
        scope: Scope,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(udp::serve(self.clone(), socket, scope, Some(stop)))
    }

    /// Serves a TCP listener: each connection may carry many queries (RFC 7766).
    /// Connections are bounded in number and time and end with the task.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener, scope: Scope) -> JoinHandle<()> {
        tokio::spawn(tcp::serve(self.clone(), listener, scope))
    }
}

/// Counts events that a flood repeats many times a second, and says when one is
/// worth a log line: the first, then at most one per interval, with the count since.
pub(crate) struct LogEvery {
    interval: Duration,
    last: Option<Instant>,
    since: u64,
}

impl LogEvery {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            since: 0,
        }
    }

    /// One more event: `Some(events since the last log line)` when to log now.
    pub fn hit(&mut self) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < self.interval) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_once_per_interval_with_its_count() {
        let mut log = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(log.hit(), Some(1));
        for _ in 0..1000 {
            assert_eq!(log.hit(), None);
        }
        log.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(log.hit(), Some(1001));
    }
}
