//! Forwarding of names that are not local to the host's upstream resolvers, built
//! to hold against the containers that ask: a bounded number of forwards in flight
//! (beyond it, SERVFAIL at once), long-lived upstream sockets with random ids and
//! random letter case checked on the way back ([`crate::upstream`]), an upstream
//! query rebuilt from the parsed question (never the client's bytes), TCP when the
//! answer comes back truncated, identical questions in flight sharing one exchange,
//! and a byte-bounded cache keyed by the question as DNS sees it ([`crate::cache`]).
//! SERVFAIL comes well before a client's own timeout when no upstream answers.
//!
//! One forwarder serves one set of upstreams; its cache is never shared with another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tracing::debug;

use crate::cache::{Cache, CacheKey, KEY_CD, KEY_DO, KEY_RD};
use crate::metrics::{self, Exchange};
use crate::response;
use crate::upstream::{Rng, Upstreams};
use crate::wire::{self, Question};

/// All upstream attempts of one query end by then (clients give up at ~5 s).
pub const FORWARD_DEADLINE: Duration = Duration::from_millis(1500);
/// Longest a positive answer is cached.
const CACHE_MAX_TTL: u32 = 300;
/// Longest a negative answer is cached, whatever its SOA says.
const CACHE_MAX_NEGATIVE_TTL: u32 = 60;

/// Upstream resolvers listed in a resolv.conf text (`nameserver` lines, port 53).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Bounds of one forwarder.
#[derive(Debug, Clone, Copy)]
pub struct ForwardLimits {
    /// Forwards in flight at once, over all namespaces; beyond it, SERVFAIL.
    pub max_in_flight: usize,
    /// Cache size, counting responses and keys.
    pub cache_bytes: usize,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            max_in_flight: 1024,
            cache_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot open sockets to the upstream resolvers {upstreams:?}: {source}")]
    Sockets {
        upstreams: Vec<SocketAddr>,
        source: std::io::Error,
    },
}

/// The outcome of an exchange, shared with identical queries that joined it: the
/// response with a lower-case question, or nothing (SERVFAIL).
type Shared = Option<Arc<[u8]>>;

/// Forwards queries; shared by every namespace the server serves.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    io: Upstreams,
    cache: Cache,
    in_flight: Semaphore,
    /// Exchanges under way, by question: later identical queries wait for them.
    joins: Mutex<HashMap<CacheKey, watch::Receiver<Option<Shared>>>>,
    rng: Arc<Rng>,
}

impl Forwarder {
    /// A forwarder with default limits. Its sockets are opened here, in the calling
    /// thread's network namespace; an error when none can be.
    pub fn new(upstreams: Vec<SocketAddr>) -> Result<Self, ForwardError> {
        Self::with_limits(upstreams, ForwardLimits::default())
    }

    pub fn with_limits(
        upstreams: Vec<SocketAddr>,
        limits: ForwardLimits,
    ) -> Result<Self, ForwardError> {
        let rng = Arc::new(Rng::default());
        let io =
            Upstreams::bind(&upstreams, rng.clone()).map_err(|source| ForwardError::Sockets {
                upstreams: upstreams.clone(),
                source,
            })?;
        Ok(Forwarder {
            upstreams,
            io,
            cache: Cache::new(limits.cache_bytes),
            in_flight: Semaphore::new(limits.max_in_flight),
            joins: Mutex::default(),
            rng,
        })
    }

    /// The response to send back for `packet` (already parsed as `q`).
    pub async fn forward(&self, packet: &[u8], q: &Question<'_>) -> Vec<u8> {
        let key = CacheKey::of(q, packet);
        if let Some(hit) = self.cache.get(&key, Instant::now()) {
            if let Some(bytes) = response::reissue(&hit.response, q, hit.age, hit.ttl) {
                metrics::cache(true);
                return bytes;
            }
        }
        metrics::cache(false);
        let Ok(_permit) = self.in_flight.try_acquire() else {
            debug!("too many forwards in flight; SERVFAIL");
            return servfail(q);
        };
        match self.shared(&key).await {
            Some(bytes) => response::reissue(&bytes, q, 0, u32::MAX).unwrap_or_else(|| servfail(q)),
            None => servfail(q),
        }
    }

    /// Joins an exchange under way for the same question, or leads a new one.
    async fn shared(&self, key: &CacheKey) -> Shared {
        let lead = {
            let mut joins = self.joins.lock().expect("joins lock");
            match joins.get(key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    joins.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        match lead {
            Ok(tx) => {
                let _leading = Leading(&self.joins, key);
                let outcome = self.resolve(key).await;
                tx.send_replace(Some(outcome.clone()));
                outcome
            }
            // A leader that is cancelled drops its sender: the joiners fail too.
            Err(mut rx) => {
                match tokio::time::timeout(FORWARD_DEADLINE, rx.wait_for(Option::is_some)).await {
                    Ok(Ok(outcome)) => outcome.clone().flatten(),
                    _ => None,
                }
            }
        }
    }

    /// Asks the upstreams in turn, each with its share of the deadline; the first
    /// answer that is not a server failure wins and is cached.
    async fn resolve(&self, key: &CacheKey) -> Shared {
        let deadline = tokio::time::Instant::now() + FORWARD_DEADLINE;
        let lower = key.question();
        let mut failure = None;
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / (self.upstreams.len() - i) as u32;
            let answer = match self.exchange(*upstream, key, &lower, share, deadline).await {
                Ok(a) => a,
                Err(e) => {
                    debug!(%upstream, error = %e, "upstream failed");
                    let timed_out = matches!(e, crate::upstream::ExchangeError::Timeout);
                    let outcome = if timed_out {
                        Exchange::TimedOut
                    } else {
                        Exchange::Failed
                    };
                    metrics::forwarded(*upstream, outcome);
                    continue;
                }
            };
            let Some(walked) = response::walk(&answer) else {
                debug!(%upstream, "malformed upstream response");
                metrics::forwarded(*upstream, Exchange::Failed);
                continue;
            };
            metrics::forwarded(*upstream, Exchange::Answered(response::rcode(&answer)));
            let mut answer = answer;
            response::set_question(&mut answer, &lower).expect("checked question");
            let answer: Arc<[u8]> = answer.into();
            if matches!(response::rcode(&answer), 2 | 4 | 5) {
                failure = Some(answer);
                continue;
            }
            if let Some(ttl) =
                response::cache_ttl(&answer, &walked, CACHE_MAX_TTL, CACHE_MAX_NEGATIVE_TTL)
            {
                self.cache
                    .insert(key.clone(), answer.clone(), ttl, Instant::now());
            }
            return Some(answer);
        }
        failure
    }

    /// One upstream: UDP within `share`, then TCP until `deadline` when truncated
    /// (keeping the truncated answer if TCP fails).
    async fn exchange(
        &self,
        upstream: SocketAddr,
        key: &CacheKey,
        lower: &[u8],
        share: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<u8>, crate::upstream::ExchangeError> {
        let question = self.mix_case(lower)?;
        let mut query = build_query(&question, key.flags);
        let answer = self.io.udp(upstream, &mut query, &question, share).await?;
        if !response::truncated(&answer) {
            return Ok(answer);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match self.io.tcp(upstream, &mut query, &question, left).await {
            Ok(full) => Ok(full),
            Err(e) => {
                debug!(%upstream, error = %e, "TCP retry of a truncated answer failed");
                Ok(answer)
            }
        }
    }

    /// DNS 0x20: every letter of the name in a random case, which the answer must
    /// echo exactly.
    fn mix_case(&self, lower: &[u8]) -> Result<Vec<u8>, crate::upstream::ExchangeError> {
        let mut bits = vec![0u8; lower.len().div_ceil(8)];
        self.rng.fill(&mut bits)?;
        let mut out = lower.to_vec();
        let name_end = out.len() - 4;
        let mut at = 0;
        while at < name_end && out[at] != 0 {
            let len = out[at] as usize;
            for i in at + 1..(at + 1 + len).min(name_end) {
                if out[i].is_ascii_lowercase() && bits[i / 8] & (1 << (i % 8)) != 0 {
                    out[i] = out[i].to_ascii_uppercase();
                }
            }
            at += 1 + len;
        }
        Ok(out)
    }
}

/// Removes the leader's entry however the exchange ends.
struct Leading<'a>(
    &'a Mutex<HashMap<CacheKey, watch::Receiver<Option<Shared>>>>,
    &'a CacheKey,
);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("joins lock").remove(self.1);
    }
}

/// Our query for `question`: RD and CD as the client asked, EDNS with our payload
/// size and the client's DO. The id is set by the transport.
fn build_query(question: &[u8], flags: u8) -> Vec<u8> {
    let mut header_flags: u16 = 0;
    if flags & KEY_RD != 0 {
        header_flags |= 0x0100;
    }
    if flags & KEY_CD != 0 {
        header_flags |= 0x0010;
    }
    let mut q = Vec::with_capacity(12 + question.len() + 11);
    q.extend_from_slice(&[0, 0]);
    q.extend_from_slice(&header_flags.to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    q.extend_from_slice(question);
    q.extend_from_slice(&[0, 0, 41]);
    q.extend_from_slice(&wire::OUR_EDNS_SIZE.to_be_bytes());
    let do_bit = if flags & KEY_DO != 0 { 0x80 } else { 0 };
    q.extend_from_slice(&[0, 0, do_bit, 0, 0, 0]);
    q
}

fn servfail(q: &Question<'_>) -> Vec<u8> {
    wire::write_response(q, wire::RCODE_SERVFAIL, &[], 0, usize::MAX)
}

#[cfg(test)]
#[path = "forward_tests.rs"]
mod tests;
