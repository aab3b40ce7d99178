//! The forwarder's answer cache: keyed by the question as DNS sees it (the name in
//! wire form, so a label holding a dot never meets the name whose labels it spells,
//! plus type, class and the query flags that change the answer), bounded in bytes,
//! evicting the least recently used entry one at a time and never flushing whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::wire::Question;

/// Query flags that change what an upstream answers, as kept in a key.
pub const KEY_RD: u8 = 1;
pub const KEY_CD: u8 = 2;
pub const KEY_DO: u8 = 4;

/// What an entry costs besides its response and key bytes (map and order slots).
const ENTRY_OVERHEAD: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Length-prefixed labels ending in the root label, ASCII lower-cased.
    pub name: Box<[u8]>,
    pub qtype: u16,
    pub qclass: u16,
    /// `KEY_RD | KEY_CD | KEY_DO` as the query had them.
    pub flags: u8,
}

impl CacheKey {
    /// The key of a parsed query (`packet` is what `q` was parsed from).
    pub fn of(q: &Question<'_>, packet: &[u8]) -> Self {
        let name_len = q.raw.len() - 4;
        let name: Box<[u8]> = q.raw[..name_len]
            .iter()
            .map(u8::to_ascii_lowercase)
            .collect();
        let mut flags = 0;
        if q.flags & 0x0100 != 0 {
            flags |= KEY_RD;
        }
        if q.flags & 0x0010 != 0 {
            flags |= KEY_CD;
        }
        // The parser accepted exactly one OPT right after the question; its TTL
        // field's third byte holds DO.
        let opt = 12 + q.raw.len();
        if q.edns_size.is_some() && packet.get(opt + 7).is_some_and(|b| b & 0x80 != 0) {
            flags |= KEY_DO;
        }
        CacheKey {
            name,
            qtype: q.qtype,
            qclass: q.qclass,
            flags,
        }
    }

    /// The question in wire form (name, type, class), lower case.
    pub fn question(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.name.len() + 4);
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.qtype.to_be_bytes());
        out.extend_from_slice(&self.qclass.to_be_bytes());
        out
    }

    fn cost(&self, response: &[u8]) -> usize {
        // The key is held twice: in the map and in the recency order.
        response.len() + 2 * self.name.len() + ENTRY_OVERHEAD
    }
}

/// A hit: the stored response, how old it is and how long it was to live.
pub struct Hit {
    pub response: Arc<[u8]>,
    pub age: u32,
    pub ttl: u32,
}

struct Entry {
    response: Arc<[u8]>,
    stored: Instant,
    ttl: u32,
    /// Its place in the recency order.
    tick: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<CacheKey, Entry>,
    /// Least recently used first.
    order: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: usize,
}

impl Inner {
    fn remove(&mut self, key: &CacheKey) {
        if let Some(e) = self.map.remove(key) {
            self.order.remove(&e.tick);
            self.bytes -= key.cost(&e.response);
        }
    }

    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }
}

pub struct Cache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl Cache {
    pub fn new(max_bytes: usize) -> Self {
        Cache {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The live entry for `key`, now the most recently used.
    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<Hit> {
        let mut inner = self.inner.lock().expect("cache lock");
        let entry = inner.map.get(key)?;
        let age = now.saturating_duration_since(entry.stored).as_secs();
        if age >= u64::from(entry.ttl) {
            inner.remove(key);
            return None;
        }
        let old = entry.tick;
        let tick = inner.tick();
        let order_key = inner.order.remove(&old).expect("entry in order");
        inner.order.insert(tick, order_key);
        let entry = inner.map.get_mut(key).expect("entry present");
        entry.tick = tick;
        Some(Hit {
            response: entry.response.clone(),
            age: age as u32,
            ttl: entry.ttl,
        })
    }

    /// Stores `response` for `ttl` seconds, evicting least recently used entries
    /// until it fits. One larger than the whole budget is not stored.
    pub fn insert(&self, key: CacheKey, response: Arc<[u8]>, ttl: u32, now: Instant) {
        let cost = key.cost(&response);
        if cost > self.max_bytes || ttl == 0 {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        inner.remove(&key);
        while inner.bytes + cost > self.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            let e = inner.map.remove(&oldest).expect("ordered entry in map");
            inner.bytes -= oldest.cost(&e.response);
        }
        let tick = inner.tick();
        inner.order.insert(tick, key.clone());
        inner.bytes += cost;
        inner.map.insert(
            key,
            Entry {
                response,
                stored: now,
                ttl,
                tick,
            },
        );
    }

    /// Bytes held, as counted against the budget.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("cache lock").bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().expect("cache lock").map.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::response::tests::query;
    use crate::wire;

    fn key(name: &[u8]) -> CacheKey {
        let packet = query(name, false);
        CacheKey::of(&wire::parse(&packet).unwrap(), &packet)
    }

    #[test]
    fn a_dotted_label_is_not_the_name_it_spells() {
        let one_label = key(b"\x0fwww.example.com\x00");
        let three = key(b"\x03www\x07example\x03com\x00");
        // The old key form (labels joined by '.') made these equal.
        assert_ne!(one_label, three);
        assert_eq!(three, key(b"\x03WWW\x07Example\x03cOm\x00"), "case folds");
    }

    #[test]
    fn flags_that_change_the_answer_are_in_the_key() {
        let name = b"\x01a\x04test\x00";
        let base = query(name, true);
        let with = |byte: usize, bit: u8| {
            let mut p = base.clone();
            p[byte] ^= bit;
            let q = wire::parse(&p).unwrap();
            CacheKey::of(&q, &p)
        };
        let plain = with(0, 0);
        let no_rd = with(2, 0x01);
        let cd = with(3, 0x10);
        let dnssec_ok = with(base.len() - 4, 0x80);
        assert_eq!(plain.flags, KEY_RD);
        assert_eq!(no_rd.flags, 0);
        assert_eq!(cd.flags, KEY_RD | KEY_CD);
        assert_eq!(dnssec_ok.flags, KEY_RD | KEY_DO);
        let keys = std::collections::HashSet::from([plain, no_rd, cd, dnssec_ok]);
        assert_eq!(keys.len(), 4);
    }

    fn name(i: usize) -> Vec<u8> {
        let label = format!("n{i:05}");
        let mut n = vec![label.len() as u8];
        n.extend_from_slice(label.as_bytes());
        n.push(0);
        n
    }

    #[test]
    fn evicts_least_recently_used_by_bytes_and_never_flushes() {
        let t0 = Instant::now();
        let response: Arc<[u8]> = vec![0u8; 872].into();
        let per_entry = key(&name(0)).cost(&response);
        let cache = Cache::new(per_entry * 10);
        for i in 0..10 {
            cache.insert(key(&name(i)), response.clone(), 60, t0);
        }
        assert_eq!(cache.len(), 10);
        // Touch entry 0: entry 1 is now the least recently used.
        assert!(cache.get(&key(&name(0)), t0).is_some());
        for i in 10..1000 {
            cache.insert(key(&name(i)), response.clone(), 60, t0);
            assert_eq!(cache.len(), 10, "full, never emptied");
            assert!(cache.bytes() <= per_entry * 10);
            if i == 10 {
                assert!(cache.get(&key(&name(1)), t0).is_none(), "LRU evicted");
                assert!(
                    cache.get(&key(&name(0)), t0).is_some(),
                    "recently used kept"
                );
            }
        }
        assert!(cache.get(&key(&name(999)), t0).is_some());
        // A larger entry takes the room of several small ones, not all of them.
        let big: Arc<[u8]> = vec![0u8; per_entry * 3].into();
        cache.insert(key(&name(5000)), big, 60, t0);
        assert!((6..=7).contains(&cache.len()), "{}", cache.len());
        let huge: Arc<[u8]> = vec![0u8; per_entry * 11].into();
        cache.insert(key(&name(5001)), huge, 60, t0);
        assert!(cache.get(&key(&name(5001)), t0).is_none());
        assert!(cache.get(&key(&name(5000)), t0).is_some());
    }

    #[test]
    fn entries_expire_and_report_their_age() {
        let t0 = Instant::now();
        let cache = Cache::new(1 << 20);
        let k = key(&name(1));
        cache.insert(k.clone(), vec![1u8; 20].into(), 30, t0);
        let hit = cache.get(&k, t0 + Duration::from_secs(12)).unwrap();
        assert_eq!((hit.age, hit.ttl), (12, 30));
        assert!(cache.get(&k, t0 + Duration::from_secs(30)).is_none());
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }
}
