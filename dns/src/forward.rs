//! Forwarding of names that are not local to the host's upstream resolvers: UDP
//! first, TCP when the answer comes back truncated, a small cache that honours TTLs,
//! and SERVFAIL well before a client's own timeout when no upstream answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

use crate::wire::{self, Question};

/// All upstream attempts of one query end by then (clients give up at ~5 s; the
/// issue allows 2 s).
pub const FORWARD_DEADLINE: Duration = Duration::from_millis(1500);
const CACHE_MAX_ENTRIES: usize = 10_000;
const CACHE_MAX_TTL: u32 = 300;
/// TTL for answers that carry no record to take one from.
const CACHE_EMPTY_TTL: u32 = 5;

/// Upstream resolvers listed in a resolv.conf text (`nameserver` lines, port 53).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Cache key: lower-cased name, type, class.
type CacheKey = (Vec<u8>, u16, u16);

struct Cached {
    response: Message,
    stored: Instant,
    ttl: u32,
}

/// Forwards queries; shared by every namespace the server serves.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    cache: Mutex<HashMap<CacheKey, Cached>>,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self {
            upstreams,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The response to send back for `packet` (already parsed as `q`).
    pub async fn forward(&self, packet: &[u8], q: &Question<'_>) -> Vec<u8> {
        let key = (q.name.clone(), q.qtype, q.qclass);
        if let Some(bytes) = self.cached(&key, packet) {
            return bytes;
        }
        let deadline = Instant::now() + FORWARD_DEADLINE;
        for upstream in &self.upstreams {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, exchange(*upstream, packet)).await {
                Ok(Ok(bytes)) => {
                    self.store(key, &bytes);
                    return bytes;
                }
                Ok(Err(e)) => debug!(%upstream, error = %e, "upstream failed"),
                Err(_) => debug!(%upstream, "upstream timed out"),
            }
        }
        wire::write_response(q, wire::RCODE_SERVFAIL, &[], 0, usize::MAX)
    }

    fn cached(&self, key: &CacheKey, packet: &[u8]) -> Option<Vec<u8>> {
        let cache = self.cache.lock().expect("cache lock");
        let hit = cache.get(key)?;
        let age = hit.stored.elapsed().as_secs() as u32;
        if age >= hit.ttl {
            return None;
        }
        let mut response = hit.response.clone();
        drop(cache);
        // Re-issued with the asker's id and question (its letter case), TTLs aged.
        let query = Message::from_vec(packet).ok()?;
        response.metadata.id = query.metadata.id;
        response.queries = query.queries;
        for r in response
            .answers
            .iter_mut()
            .chain(response.authorities.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        response.to_vec().ok()
    }

    fn store(&self, key: CacheKey, bytes: &[u8]) {
        let Ok(response) = Message::from_vec(bytes) else {
            return;
        };
        if response.metadata.truncation
            || !matches!(
                response.metadata.response_code,
                ResponseCode::NoError | ResponseCode::NXDomain
            )
        {
            return;
        }
        let ttl = response
            .answers
            .iter()
            .chain(&response.authorities)
            .map(|r| r.ttl)
            .min()
            .unwrap_or(CACHE_EMPTY_TTL)
            .min(CACHE_MAX_TTL);
        if ttl == 0 {
            return;
        }
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_MAX_ENTRIES {
            cache.retain(|_, c| c.stored.elapsed().as_secs() < c.ttl as u64);
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Cached {
                response,
                stored: Instant::now(),
                ttl,
            },
        );
    }
}

/// One query to one upstream: UDP, then TCP when the UDP answer is truncated.
async fn exchange(upstream: SocketAddr, packet: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(packet).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Ignore anything that is not the answer to this query (spoofing, stale).
        if n >= 12 && buf[..2] == packet[..2] && buf[2] & 0x80 != 0 {
            if buf[2] & 0x02 == 0 {
                return Ok(buf[..n].to_vec());
            }
            break;
        }
    }
    let mut stream = TcpStream::connect(upstream).await?;
    stream
        .write_all(&(packet.len() as u16).to_be_bytes())
        .await?;
    stream.write_all(packet).await?;
    let len = stream.read_u16().await? as usize;
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers() {
        let text = "# comment\nsearch example.org\nnameserver 192.0.2.53\nnameserver  2001:db8::1\noptions ndots:1\n";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }
}
