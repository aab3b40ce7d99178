//! The server: serves already-bound UDP and TCP sockets (one pair per namespace,
//! opened there by the agent), each with the networks of that namespace as its scope.
//! The record set is an immutable snapshot swapped whole; the query path never waits
//! on a lock.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use std::os::fd::AsRawFd;

use tokio::io::Interest;

use crate::answer::{answer, Answer, Transport};
use crate::batch::{Batch, BATCH};
use crate::forward::Forwarder;
use crate::snapshot::Snapshot;
use crate::wire;

/// Default TTL of local answers: short, so caching clients follow replicas.
pub const DEFAULT_TTL: u32 = 5;
/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The networks whose names a socket's namespace sees.
pub type Scope = Arc<[String]>;

pub struct DnsServer {
    snapshot: ArcSwap<Snapshot>,
    forwarder: Forwarder,
    ttl: u32,
}

impl DnsServer {
    pub fn new(forwarder: Forwarder, ttl: u32) -> Arc<Self> {
        Arc::new(Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            forwarder,
            ttl,
        })
    }

    /// Replaces the whole record set; queries in flight finish on the old one.
    pub fn update(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The local step of a query: answered from the current snapshot, or not local.
    fn local(&self, networks: &[&str], packet: &[u8], transport: Transport) -> Answer {
        answer(&self.snapshot.load(), networks, packet, transport, self.ttl)
    }

    /// Answers one query completely, forwarding when it is not local (TCP's path).
    async fn handle(
        &self,
        networks: &[&str],
        packet: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        match self.local(networks, packet, transport) {
            Answer::Reply(bytes) => Some(bytes),
            Answer::Drop => None,
            Answer::Forward => {
                let q = wire::parse(packet).ok()?;
                Some(self.forwarder.forward(packet, &q).await)
            }
        }
    }

    /// Serves a UDP socket until the task is aborted: batches of queries in one
    /// `recvmmsg`, their local answers in one `sendmmsg`. Forwarded queries run in
    /// their own tasks so one slow upstream never holds up local answers.
    pub fn serve_udp(self: &Arc<Self>, socket: UdpSocket, scope: Scope) -> JoinHandle<()> {
        let server = self.clone();
        tokio::spawn(async move {
            let socket = Arc::new(socket);
            let fd = socket.as_raw_fd();
            let networks: Vec<&str> = scope.iter().map(String::as_str).collect();
            let mut batch = Batch::new();
            let mut replies: Vec<(usize, Vec<u8>)> = Vec::with_capacity(BATCH);
            loop {
                if let Err(e) = socket.readable().await {
                    warn!(error = %e, "dns udp socket failed");
                    return;
                }
                let n = match socket.try_io(Interest::READABLE, || batch.recv(fd)) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        warn!(error = %e, "dns udp receive failed");
                        continue;
                    }
                };
                replies.clear();
                for i in 0..n {
                    match server.local(&networks, batch.packet(i), Transport::Udp) {
                        Answer::Reply(bytes) => replies.push((i, bytes)),
                        Answer::Drop => debug!("dropped a non-query"),
                        Answer::Forward => {
                            let Some(peer) = batch.peer(i) else { continue };
                            let (server, socket, packet) =
                                (server.clone(), socket.clone(), batch.packet(i).to_vec());
                            tokio::spawn(async move {
                                if let Ok(q) = wire::parse(&packet) {
                                    let bytes = server.forwarder.forward(&packet, &q).await;
                                    let _ = socket.send_to(&bytes, peer).await;
                                }
                            });
                        }
                    }
                }
                let sent = socket
                    .try_io(Interest::WRITABLE, || batch.send(fd, &replies))
                    .unwrap_or(0);
                // What the socket buffer could not take now goes out one by one.
                for (i, bytes) in &replies[sent..] {
                    if let Some(peer) = batch.peer(*i) {
                        let _ = socket.send_to(bytes, peer).await;
                    }
                }
            }
        })
    }

    /// Serves a TCP listener: each connection may carry many queries (RFC 7766).
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener, scope: Scope) -> JoinHandle<()> {
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let (server, scope) = (server.clone(), scope.clone());
                        tokio::spawn(async move { server.serve_connection(stream, scope).await });
                    }
                    Err(e) => warn!(error = %e, "dns tcp accept failed"),
                }
            }
        })
    }

    async fn serve_connection(&self, mut stream: TcpStream, scope: Scope) {
        let networks: Vec<&str> = scope.iter().map(String::as_str).collect();
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
                Ok(Ok(len)) => len as usize,
                _ => return,
            };
            let mut packet = vec![0u8; len];
            if stream.read_exact(&mut packet).await.is_err() {
                return;
            }
            let Some(reply) = self.handle(&networks, &packet, Transport::Tcp).await else {
                return;
            };
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}
