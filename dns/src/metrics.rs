//! The DNS server's counters, kept off the query path's critical resources: each
//! thread counts into a shard of its own (a cache-aligned block of atomics, picked
//! once per thread), so queries answered on different cores never write the same
//! cache line; a scrape sums the shards ([`stats`]). Counting allocates nothing.
//!
//! One set per process (the agent runs one DNS server): the namespaces' own
//! forwarders are counted with the server's without being handed anything.
//!
//! Every label is bounded: query types are a fixed list plus `other`, response
//! codes the sixteen of the header, upstreams the addresses forwarders were given
//! (at most [`MAX_UPSTREAMS`], the rest as `other`), whatever the clients send.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the request duration histogram, in seconds: CoreDNS's
/// (0.25 ms doubling to 8.192 s).
pub const DURATION_BUCKETS: [f64; 16] = {
    let mut b = [0.00025; 16];
    let mut i = 1;
    while i < 16 {
        b[i] = b[i - 1] * 2.0;
        i += 1;
    }
    b
};

/// The query types counted by name (CoreDNS's list); any other is `other`.
pub const QTYPES: [(u16, &str); 18] = [
    (1, "A"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (28, "AAAA"),
    (33, "SRV"),
    (43, "DS"),
    (46, "RRSIG"),
    (47, "NSEC"),
    (48, "DNSKEY"),
    (50, "NSEC3"),
    (65, "HTTPS"),
    (251, "IXFR"),
    (252, "AXFR"),
    (255, "ANY"),
];
const TYPES: usize = QTYPES.len() + 1;
const OTHER_TYPE: usize = QTYPES.len();

/// The header's response codes by name (as CoreDNS names them).
pub const RCODES: [&str; 16] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13", "RCODE14", "RCODE15",
];

/// How a query arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// Upstream addresses counted by address; beyond, `other` (forwarders are made
/// only from configured upstreams, so this is a safety net).
pub const MAX_UPSTREAMS: usize = 32;

/// Outcomes of one upstream exchange: its answer's response code, or none came.
const FORWARD_OUTCOMES: usize = 18;
const FORWARD_TIMEOUT: usize = 16;
const FORWARD_ERROR: usize = 17;

/// Shards: more than the cores of most hosts, so threads rarely share one.
const SHARDS: usize = 64;

/// One thread's (or a few threads') counters, alone on its cache lines.
#[repr(align(128))]
struct Shard {
    requests: [[AtomicU64; TYPES]; 2],
    responses: [AtomicU64; 16],
    /// Per bucket (not cumulative), the last one above every bound.
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_sum_ns: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl Shard {
    const fn new() -> Self {
        Shard {
            requests: [const { [const { AtomicU64::new(0) }; TYPES] }; 2],
            responses: [const { AtomicU64::new(0) }; 16],
            durations: [const { AtomicU64::new(0) }; DURATION_BUCKETS.len() + 1],
            duration_sum_ns: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        }
    }
}

static SHARD: [Shard; SHARDS] = [const { Shard::new() }; SHARDS];
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard, handed out in turn on first use.
    static MINE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

fn shard() -> &'static Shard {
    let i = MINE.with(|m| {
        let mut i = m.get();
        if i == usize::MAX {
            i = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
            m.set(i);
        }
        i
    });
    &SHARD[i]
}

/// Upstream exchanges by address and outcome. Exchanges wait on the network, so one
/// lock for them costs nothing the forwarder does not already pay (its cache and
/// shared exchanges take locks too).
static FORWARDS: Mutex<Vec<(SocketAddr, [u64; FORWARD_OUTCOMES])>> = Mutex::new(Vec::new());
static FORWARDS_OTHER: Mutex<[u64; FORWARD_OUTCOMES]> = Mutex::new([0; FORWARD_OUTCOMES]);

/// A query received (anything that is not one — a response, a runt — is not counted).
pub(crate) fn request(proto: Proto, packet: &[u8]) {
    let t = qtype(packet).map_or(OTHER_TYPE, type_index);
    shard().requests[proto as usize][t].fetch_add(1, Relaxed);
}

/// A response sent (its header's response code).
pub(crate) fn response(reply: &[u8]) {
    if let Some(flags) = reply.get(3) {
        shard().responses[(flags & 0x0f) as usize].fetch_add(1, Relaxed);
    }
}

/// `n` queries answered `took` after they were read (one batch's answers go out
/// together, so they share one duration).
pub(crate) fn answered(n: usize, took: Duration) {
    if n == 0 {
        return;
    }
    let s = shard();
    let secs = took.as_secs_f64();
    let bucket = DURATION_BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(DURATION_BUCKETS.len());
    s.durations[bucket].fetch_add(n as u64, Relaxed);
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    s.duration_sum_ns
        .fetch_add(ns.saturating_mul(n as u64), Relaxed);
}

/// A forwarded query answered from the cache, or not.
pub(crate) fn cache(hit: bool) {
    let s = shard();
    if hit {
        s.cache_hits.fetch_add(1, Relaxed);
    } else {
        s.cache_misses.fetch_add(1, Relaxed);
    }
}

/// How one exchange with an upstream ended.
pub(crate) enum Exchange {
    Answered(u8),
    TimedOut,
    Failed,
}

pub(crate) fn forwarded(upstream: SocketAddr, outcome: Exchange) {
    let o = match outcome {
        Exchange::Answered(rcode) => (rcode & 0x0f) as usize,
        Exchange::TimedOut => FORWARD_TIMEOUT,
        Exchange::Failed => FORWARD_ERROR,
    };
    let mut table = FORWARDS.lock().expect("forward counters");
    if let Some((_, counts)) = table.iter_mut().find(|(a, _)| *a == upstream) {
        counts[o] += 1;
    } else if table.len() < MAX_UPSTREAMS {
        let mut counts = [0; FORWARD_OUTCOMES];
        counts[o] = 1;
        table.push((upstream, counts));
    } else {
        drop(table);
        FORWARDS_OTHER.lock().expect("forward counters")[o] += 1;
    }
}

/// The counters summed over every thread, for a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DnsStats {
    /// (proto, qtype, count), every combination.
    pub requests: Vec<(&'static str, &'static str, u64)>,
    /// (rcode, count), every code.
    pub responses: Vec<(&'static str, u64)>,
    /// Per bucket of [`DURATION_BUCKETS`] (not cumulative), then the count above
    /// the last bound.
    pub duration_buckets: Vec<u64>,
    pub duration_sum_seconds: f64,
    /// (upstream address or `other`, rcode or `timeout`/`error`, count), the ones
    /// that happened.
    pub forwards: Vec<(String, &'static str, u64)>,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// Sums the shards now (writers go on; each counter is read once).
pub fn stats() -> DnsStats {
    let mut requests = [[0u64; TYPES]; 2];
    let mut responses = [0u64; 16];
    let mut durations = [0u64; DURATION_BUCKETS.len() + 1];
    let (mut sum_ns, mut hits, mut misses) = (0u64, 0u64, 0u64);
    for s in &SHARD {
        for (p, row) in s.requests.iter().enumerate() {
            for (t, c) in row.iter().enumerate() {
                requests[p][t] += c.load(Relaxed);
            }
        }
        for (r, c) in s.responses.iter().enumerate() {
            responses[r] += c.load(Relaxed);
        }
        for (b, c) in s.durations.iter().enumerate() {
            durations[b] += c.load(Relaxed);
        }
        sum_ns = sum_ns.wrapping_add(s.duration_sum_ns.load(Relaxed));
        hits += s.cache_hits.load(Relaxed);
        misses += s.cache_misses.load(Relaxed);
    }
    let type_name = |t: usize| QTYPES.get(t).map_or("other", |q| q.1);
    let mut out = DnsStats {
        requests: [Proto::Udp, Proto::Tcp]
            .iter()
            .flat_map(|p| (0..TYPES).map(move |t| (*p, t)))
            .map(|(p, t)| (p.name(), type_name(t), requests[p as usize][t]))
            .collect(),
        responses: RCODES.iter().copied().zip(responses).collect(),
        duration_buckets: durations.to_vec(),
        duration_sum_seconds: sum_ns as f64 / 1e9,
        forwards: Vec::new(),
        cache_hits: hits,
        cache_misses: misses,
    };
    let table = FORWARDS.lock().expect("forward counters").clone();
    let other = *FORWARDS_OTHER.lock().expect("forward counters");
    let rows = table.into_iter().map(|(a, c)| (a.to_string(), c)).chain(
        other
            .iter()
            .any(|c| *c > 0)
            .then(|| ("other".into(), other)),
    );
    for (to, counts) in rows {
        for (o, n) in counts.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            out.forwards.push((to.clone(), outcome_name(o), n));
        }
    }
    out
}

fn outcome_name(o: usize) -> &'static str {
    match o {
        FORWARD_TIMEOUT => "timeout",
        FORWARD_ERROR => "error",
        rcode => RCODES[rcode],
    }
}

fn type_index(qtype: u16) -> usize {
    QTYPES
        .iter()
        .position(|(t, _)| *t == qtype)
        .unwrap_or(OTHER_TYPE)
}

/// The first question's type, read past its name (labels only: a question's name
/// is never compressed); None when the packet is too short to have one.
fn qtype(packet: &[u8]) -> Option<u16> {
    let mut at = 12;
    loop {
        let len = *packet.get(at)? as usize;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
    }
    let t = packet.get(at + 1..at + 3)?;
    Some(u16::from_be_bytes([t[0], t[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stub_query;

    #[test]
    fn the_query_type_is_read_past_the_name_and_unknown_ones_are_other() {
        assert_eq!(qtype(&stub_query(1, "db.example", 28)), Some(28));
        assert_eq!(qtype(&stub_query(1, "db", 1)), Some(1));
        assert_eq!(qtype(&[0; 12]), None);
        assert_eq!(type_index(28), 7);
        assert_eq!(type_index(65_000), OTHER_TYPE);
        assert_eq!(type_index(99), OTHER_TYPE);
    }

    #[test]
    fn random_query_types_do_not_grow_the_label_set() {
        let before = stats();
        // Over TCP: the UDP test of the server counts a type of its own meanwhile.
        for t in 0..=u16::MAX {
            request(Proto::Tcp, &stub_query(1, "x", t));
        }
        let after = stats();
        assert_eq!(after.requests.len(), before.requests.len());
        assert_eq!(after.requests.len(), 2 * (QTYPES.len() + 1));
        let count = |s: &DnsStats, ty: &str| {
            s.requests
                .iter()
                .find(|r| r.0 == "tcp" && r.1 == ty)
                .unwrap()
                .2
        };
        assert_eq!(
            count(&after, "other") - count(&before, "other"),
            65_536 - QTYPES.len() as u64
        );
        assert!(count(&after, "AAAA") > count(&before, "AAAA"));
    }

    #[test]
    fn durations_land_in_coredns_buckets_and_sum() {
        assert_eq!(DURATION_BUCKETS[0], 0.00025);
        assert_eq!(DURATION_BUCKETS[15], 8.192);
        let before = stats();
        answered(3, Duration::from_micros(300));
        answered(1, Duration::from_secs(10));
        let after = stats();
        let delta = |b: usize| after.duration_buckets[b] - before.duration_buckets[b];
        assert_eq!(delta(1), 3, "300 us is in the 0.5 ms bucket");
        assert_eq!(delta(16), 1, "10 s is above every bound");
        let sum = after.duration_sum_seconds - before.duration_sum_seconds;
        assert!((sum - 10.0009).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn upstreams_beyond_the_cap_are_other() {
        for i in 0..(MAX_UPSTREAMS as u8 + 5) {
            let a = SocketAddr::from(([198, 51, 100, i], 53));
            forwarded(a, Exchange::Answered(3));
        }
        forwarded(
            SocketAddr::from(([198, 51, 100, 1], 53)),
            Exchange::TimedOut,
        );
        let s = stats();
        let tos: std::collections::BTreeSet<&str> =
            s.forwards.iter().map(|f| f.0.as_str()).collect();
        // Other tests of this binary forward too (to their own fake upstreams):
        // wherever the table filled up, it holds no more than the cap.
        assert!(tos.len() <= MAX_UPSTREAMS + 1, "{tos:?}");
        assert!(tos.contains("other"));
        assert!(s.forwards.iter().any(|f| f.1 == "timeout" && f.2 >= 1));
        assert!(s.forwards.iter().any(|f| f.1 == "NXDOMAIN"));
    }
}
