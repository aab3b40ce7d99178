//! The forwarder's way to its upstream resolvers. A few long-lived UDP sockets per
//! address family, bound once where the forwarder is made (the host's namespace,
//! never a container's), a table of queries awaiting an answer keyed by (socket,
//! random id, upstream), and one reader task per socket that hands a response to its
//! query only when it also carries the question exactly as sent (0x20 letter case
//! included); anything else is dropped and the query keeps waiting. TCP, for
//! truncated answers, is one connection per query under a small global bound; those
//! sockets are made on runtime workers, which never enter another namespace, so
//! they too start in the host's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::response;

/// UDP sockets per address family: their ports and the ids multiply what a spoofer
/// must guess.
pub const SOCKETS_PER_FAMILY: usize = 4;
/// TCP connections to upstreams open at once, for all queries.
pub const MAX_TCP: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no socket for this address family")]
    NoSocket,
    #[error("no free query id")]
    NoId,
    #[error("timed out")]
    Timeout,
    #[error("too many TCP connections to upstreams")]
    TcpBusy,
    #[error("the answer does not match the query")]
    Mismatch,
    #[error("no random numbers from the OS: {0}")]
    Random(getrandom::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Random bytes from the OS, drawn a block at a time.
pub struct Rng(Mutex<([u8; 256], usize)>);

impl Default for Rng {
    fn default() -> Self {
        Rng(Mutex::new(([0; 256], 256)))
    }
}

impl Rng {
    pub fn fill(&self, out: &mut [u8]) -> Result<(), ExchangeError> {
        let mut guard = self.0.lock().expect("rng lock");
        let (buf, used) = &mut *guard;
        for b in out {
            if *used == buf.len() {
                getrandom::fill(buf).map_err(ExchangeError::Random)?;
                *used = 0;
            }
            *b = buf[*used];
            *used += 1;
        }
        Ok(())
    }

    pub fn u16(&self) -> Result<u16, ExchangeError> {
        let mut b = [0u8; 2];
        self.fill(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
}

/// (socket index, id, upstream address without flow or scope).
type PendingKey = (usize, u16, SocketAddr);

struct Waiting {
    question: Box<[u8]>,
    reply: oneshot::Sender<Vec<u8>>,
}

type Table = Arc<Mutex<HashMap<PendingKey, Waiting>>>;

/// The sockets once handed to tokio, with their readers.
struct Live {
    /// (index, socket) per family: IPv4, IPv6.
    sockets: [Vec<(usize, Arc<UdpSocket>)>; 2],
    readers: Vec<JoinHandle<()>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

pub struct Upstreams {
    /// Bound at construction; handed to tokio at first use (construction may run
    /// outside a runtime).
    bound: Mutex<Vec<(std::net::UdpSocket, bool)>>,
    live: OnceLock<Live>,
    table: Table,
    tcp: Semaphore,
    rng: Arc<Rng>,
}

fn plain(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port())
}

impl Upstreams {
    /// Binds the UDP sockets for the families of `upstreams` in the calling thread's
    /// namespace. A family whose sockets cannot be opened is left out (with a
    /// warning); an error only when none could be.
    pub fn bind(upstreams: &[SocketAddr], rng: Arc<Rng>) -> std::io::Result<Self> {
        let mut bound = Vec::new();
        let mut last_error = None;
        for v6 in [false, true] {
            if !upstreams.iter().any(|u| u.is_ipv6() == v6) {
                continue;
            }
            let any: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }
                .parse()
                .expect("literal");
            let opened: std::io::Result<Vec<_>> = (0..SOCKETS_PER_FAMILY)
                .map(|_| {
                    let s = std::net::UdpSocket::bind(any)?;
                    s.set_nonblocking(true)?;
                    Ok((s, v6))
                })
                .collect();
            match opened {
                Ok(s) => bound.extend(s),
                Err(e) => {
                    warn!(family = if v6 { "IPv6" } else { "IPv4" }, error = %e,
                        "no upstream sockets for this family; its resolvers are skipped");
                    last_error = Some(e);
                }
            }
        }
        if let (true, Some(e)) = (bound.is_empty(), last_error) {
            return Err(e);
        }
        Ok(Self::from_bound(bound, rng))
    }

    fn from_bound(bound: Vec<(std::net::UdpSocket, bool)>, rng: Arc<Rng>) -> Self {
        Upstreams {
            bound: Mutex::new(bound),
            live: OnceLock::new(),
            table: Arc::default(),
            tcp: Semaphore::new(MAX_TCP),
            rng,
        }
    }

    /// Must run inside the runtime (first use spawns the readers).
    fn live(&self) -> &Live {
        self.live.get_or_init(|| {
            let bound = std::mem::take(&mut *self.bound.lock().expect("bound lock"));
            let mut live = Live {
                sockets: Default::default(),
                readers: Vec::new(),
            };
            for (index, (socket, v6)) in bound.into_iter().enumerate() {
                match UdpSocket::from_std(socket) {
                    Ok(s) => {
                        let s = Arc::new(s);
                        live.readers
                            .push(tokio::spawn(read(index, s.clone(), self.table.clone())));
                        live.sockets[usize::from(v6)].push((index, s));
                    }
                    Err(e) => warn!(error = %e, "an upstream socket cannot be used"),
                }
            }
            live
        })
    }

    /// Queries awaiting an answer.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.table.lock().expect("table lock").len()
    }

    /// Sends `query` (its id is chosen here) to `upstream` over UDP and waits up to
    /// `limit` for the answer to `question` (name, type, class as in the query).
    pub async fn udp(
        &self,
        upstream: SocketAddr,
        query: &mut [u8],
        question: &[u8],
        limit: Duration,
    ) -> Result<Vec<u8>, ExchangeError> {
        let upstream = plain(upstream);
        let sockets = &self.live().sockets[usize::from(upstream.is_ipv6())];
        if sockets.is_empty() {
            return Err(ExchangeError::NoSocket);
        }
        let (rx, key, socket) = {
            let mut table = self.table.lock().expect("table lock");
            let mut tries = 0;
            loop {
                let r = self.rng.u16()?;
                let (index, socket) = &sockets[r as usize % sockets.len()];
                let key = (*index, self.rng.u16()?, upstream);
                if let std::collections::hash_map::Entry::Vacant(slot) = table.entry(key) {
                    let (tx, rx) = oneshot::channel();
                    slot.insert(Waiting {
                        question: question.into(),
                        reply: tx,
                    });
                    break (rx, key, socket.clone());
                }
                tries += 1;
                if tries == 16 {
                    return Err(ExchangeError::NoId);
                }
            }
        };
        // However this ends (answer, timeout, cancelled), the slot is freed.
        let _slot = Slot(&self.table, key);
        query[..2].copy_from_slice(&key.1.to_be_bytes());
        socket.send_to(query, upstream).await?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(ExchangeError::Mismatch),
            Err(_) => Err(ExchangeError::Timeout),
        }
    }

    /// The same over TCP (one query, one connection), within `limit` in all.
    pub async fn tcp(
        &self,
        upstream: SocketAddr,
        query: &mut [u8],
        question: &[u8],
        limit: Duration,
    ) -> Result<Vec<u8>, ExchangeError> {
        let _permit = self.tcp.try_acquire().map_err(|_| ExchangeError::TcpBusy)?;
        let id = self.rng.u16()?;
        query[..2].copy_from_slice(&id.to_be_bytes());
        let exchange = async {
            let mut stream = TcpStream::connect(upstream).await?;
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(query);
            stream.write_all(&framed).await?;
            let len = stream.read_u16().await? as usize;
            let mut answer = vec![0u8; len];
            stream.read_exact(&mut answer).await?;
            Ok::<_, ExchangeError>(answer)
        };
        let answer = tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ExchangeError::Timeout)??;
        if answer.len() < 12 || answer[..2] != id.to_be_bytes() {
            return Err(ExchangeError::Mismatch);
        }
        if !response::answers(&answer, question) {
            return Err(ExchangeError::Mismatch);
        }
        Ok(answer)
    }
}

struct Slot<'a>(&'a Table, PendingKey);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("table lock").remove(&self.1);
    }
}

/// One socket's reader: matches each datagram to the query awaiting it.
async fn read(index: usize, socket: Arc<UdpSocket>, table: Table) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "upstream socket receive failed");
                // Errors such as ICMP reports repeat at most as fast as we send.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let packet = &buf[..n];
        if n < 12 {
            continue;
        }
        let key = (
            index,
            u16::from_be_bytes([packet[0], packet[1]]),
            plain(from),
        );
        let mut t = table.lock().expect("table lock");
        let fits = t
            .get(&key)
            .is_some_and(|w| response::answers(packet, &w.question));
        if fits {
            let waiting = t.remove(&key).expect("checked present");
            drop(t);
            let _ = waiting.reply.send(packet.to_vec());
        } else {
            drop(t);
            debug!(%from, "dropped an upstream response that answers no query");
        }
    }
}
