//! The record set: an immutable snapshot of every network's names. Built whole from
//! endpoint records, or derived from the previous snapshot by [`Snapshot::apply`] for a
//! few changed endpoints; either way the server swaps it in whole. Queries read it
//! without locks; the only shared mutable state is each name's rotation counter.
//!
//! Zones, names and name sets sit behind `Arc`s, so deriving a snapshot copies
//! pointers of the touched network and rebuilds only the names that changed: an
//! update of one endpoint among 100,000 does not rebuild the other 99,999.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::wire::{encode_name, name_key, NameKey};

/// One attached endpoint as the DNS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRecord {
    /// The network it is attached to.
    pub network: String,
    pub address: Ipv4Addr,
    /// The container's name: always a name of the endpoint.
    pub name: String,
    /// Its service (`echo_api`), answered with every replica.
    pub service: Option<String>,
    /// More names of this endpoint alone.
    pub aliases: Vec<String>,
    /// False while a health check fails: left out of service answers, still resolvable
    /// by its own name.
    pub in_service: bool,
}

impl EndpointRecord {
    /// Every name key this record contributes to its zone.
    fn keys(&self) -> Vec<NameKey> {
        let mut names: Vec<String> = vec![self.name.clone()];
        names.extend(self.aliases.iter().cloned());
        if let Some(service) = self.service.as_deref().filter(|_| self.in_service) {
            names.push(service.to_string());
            names.push(format!("tasks.{service}"));
        }
        let net = &self.network;
        let mut keys: Vec<NameKey> = names
            .iter()
            .flat_map(|n| [name_key(n), name_key(&format!("{n}.{net}"))])
            .flatten()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// The encoded PTR target `<name>.<network>.`.
    fn reverse_name(&self) -> Option<Arc<[u8]>> {
        let key = name_key(&format!("{}.{}", self.name, self.network))?;
        let mut encoded = Vec::with_capacity(key.len() + 2);
        encode_name(&key, &mut encoded);
        Some(encoded.into())
    }
}

/// A name's addresses. Most names (a container's own) have one, kept inline: with
/// 100,000 endpoints that saves 100,000+ heap allocations.
#[derive(Debug)]
enum Addresses {
    One(Ipv4Addr),
    Many(Box<[Ipv4Addr]>),
}

impl Addresses {
    fn from_sorted(mut v: Vec<Ipv4Addr>) -> Self {
        if v.len() == 1 {
            Addresses::One(v.pop().expect("one"))
        } else {
            Addresses::Many(v.into_boxed_slice())
        }
    }

    fn as_slice(&self) -> &[Ipv4Addr] {
        match self {
            Addresses::One(a) => std::slice::from_ref(a),
            Addresses::Many(v) => v,
        }
    }
}

/// The addresses one name resolves to, and where its rotation stands.
#[derive(Debug)]
pub struct NameSet {
    addresses: Addresses,
    one_per_answer: bool,
    cursor: AtomicUsize,
}

impl NameSet {
    /// The addresses in this query's order: all of them rotated by one per query, or
    /// (one-per-answer) just the next one, so even clients that sort answers spread out.
    pub fn rotated(&self, out: &mut Vec<Ipv4Addr>) {
        let addresses = self.addresses.as_slice();
        let n = addresses.len();
        if n <= 1 {
            out.extend_from_slice(addresses);
            return;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        if self.one_per_answer {
            out.push(addresses[start]);
        } else {
            out.extend(addresses[start..].iter().chain(&addresses[..start]));
        }
    }

    /// Whether this name answers one replica at a time.
    pub fn is_one_per_answer(&self) -> bool {
        self.one_per_answer
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.as_slice().is_empty()
    }
}

/// Every name of one network.
#[derive(Debug, Default, Clone)]
struct Zone {
    names: HashMap<Arc<[u8]>, Arc<NameSet>>,
    ptr: HashMap<Ipv4Addr, Arc<[u8]>>,
}

/// The whole record set.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    zones: HashMap<String, Arc<Zone>>,
    /// (network, name key) of every name answered one replica at a time.
    one_per_answer: Arc<HashSet<(String, NameKey)>>,
}

impl Snapshot {
    /// The name set of `name` in `network`, if the network has it.
    pub fn lookup(&self, network: &str, name: &[u8]) -> Option<&NameSet> {
        self.zones.get(network)?.names.get(name).map(Arc::as_ref)
    }

    /// The encoded PTR target for `address` on `network`.
    pub fn reverse(&self, network: &str, address: Ipv4Addr) -> Option<&[u8]> {
        self.zones.get(network)?.ptr.get(&address).map(|n| &n[..])
    }

    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.zones.keys().map(String::as_str)
    }

    /// A new snapshot with `removed` endpoints taken out and `added` ones put in
    /// (a changed endpoint is its old record removed and its new one added). Only the
    /// names these records carry are rebuilt; every other name keeps its rotation.
    pub fn apply(&self, removed: &[EndpointRecord], added: &[EndpointRecord]) -> Snapshot {
        let mut next = self.clone();
        let mut touched: HashMap<String, Zone> = HashMap::new();
        let changes = removed
            .iter()
            .map(|r| (r, false))
            .chain(added.iter().map(|r| (r, true)));
        for (record, add) in changes {
            let zone = touched.entry(record.network.clone()).or_insert_with(|| {
                self.zones
                    .get(&record.network)
                    .map(|z| (**z).clone())
                    .unwrap_or_default()
            });
            for key in record.keys() {
                let old = zone.names.get(&key[..]);
                let mut addresses = old
                    .map(|s| s.addresses.as_slice().to_vec())
                    .unwrap_or_default();
                let cursor = old.map_or(0, |s| s.cursor.load(Ordering::Relaxed));
                match (add, addresses.binary_search(&record.address)) {
                    (true, Err(at)) => addresses.insert(at, record.address),
                    (false, Ok(at)) => {
                        addresses.remove(at);
                    }
                    _ => {}
                }
                if addresses.is_empty() {
                    zone.names.remove(&key[..]);
                    continue;
                }
                let one_per_answer = self
                    .one_per_answer
                    .contains(&(record.network.clone(), key.clone()));
                let set = NameSet {
                    addresses: Addresses::from_sorted(addresses),
                    one_per_answer,
                    cursor: AtomicUsize::new(cursor),
                };
                zone.names.insert(key.into(), Arc::new(set));
            }
            if add {
                if let Some(name) = record.reverse_name() {
                    zone.ptr.insert(record.address, name);
                }
            } else {
                zone.ptr.remove(&record.address);
            }
        }
        for (network, zone) in touched {
            if zone.names.is_empty() && zone.ptr.is_empty() {
                next.zones.remove(&network);
            } else {
                next.zones.insert(network, Arc::new(zone));
            }
        }
        next
    }
}

/// Builds a snapshot from endpoint records.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    records: Vec<EndpointRecord>,
    one_per_answer: HashSet<(String, NameKey)>,
}

impl SnapshotBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn endpoint(mut self, record: EndpointRecord) -> Self {
        self.records.push(record);
        self
    }

    pub fn endpoints(mut self, records: impl IntoIterator<Item = EndpointRecord>) -> Self {
        self.records.extend(records);
        self
    }

    /// Answers `service` on `network` with one replica per answer (rotating), for
    /// clients that sort multi-address answers (getaddrinfo's RFC 6724 ordering).
    pub fn one_per_answer(mut self, network: &str, service: &str) -> Self {
        for name in [service.to_string(), format!("tasks.{service}")] {
            for variant in [name.clone(), format!("{name}.{network}")] {
                if let Some(key) = name_key(&variant) {
                    self.one_per_answer.insert((network.to_string(), key));
                }
            }
        }
        self
    }

    /// Names that cannot be carried by DNS are skipped (the caller validates them
    /// earlier and reports them to the user).
    pub fn build(self) -> Snapshot {
        let mut by_network: HashMap<String, HashMap<NameKey, Vec<Ipv4Addr>>> = HashMap::new();
        let mut ptrs: HashMap<String, HashMap<Ipv4Addr, Arc<[u8]>>> = HashMap::new();
        for r in &self.records {
            let names = by_network.entry(r.network.clone()).or_default();
            for key in r.keys() {
                names.entry(key).or_default().push(r.address);
            }
            if let Some(name) = r.reverse_name() {
                ptrs.entry(r.network.clone())
                    .or_default()
                    .insert(r.address, name);
            }
        }
        let mut snap = Snapshot {
            zones: HashMap::new(),
            one_per_answer: Arc::new(self.one_per_answer),
        };
        for (network, names) in by_network {
            let names = names
                .into_iter()
                .map(|(key, mut addresses)| {
                    // Sorted, so every replica set has one order whatever the input order.
                    addresses.sort();
                    addresses.dedup();
                    let one_per_answer = snap
                        .one_per_answer
                        .contains(&(network.clone(), key.clone()));
                    let set = NameSet {
                        addresses: Addresses::from_sorted(addresses),
                        one_per_answer,
                        cursor: AtomicUsize::new(0),
                    };
                    (Arc::<[u8]>::from(key), Arc::new(set))
                })
                .collect();
            let ptr = ptrs.remove(&network).unwrap_or_default();
            snap.zones.insert(network, Arc::new(Zone { names, ptr }));
        }
        snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32, service: &str) -> EndpointRecord {
        EndpointRecord {
            network: format!("net{}", i % 3),
            address: Ipv4Addr::from(0x6440_0000 + i),
            name: format!("c{i}"),
            service: Some(service.to_string()),
            aliases: vec![format!("alias{i}")],
            in_service: !i.is_multiple_of(7),
        }
    }

    fn all(s: &Snapshot, network: &str, name: &str) -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        if let Some(set) = s.lookup(network, name.as_bytes()) {
            set.rotated(&mut out);
        }
        out.sort();
        out
    }

    #[test]
    fn apply_matches_a_full_rebuild() {
        let records: Vec<EndpointRecord> =
            (0..60).map(|i| rec(i, &format!("svc{}", i % 4))).collect();
        let base = SnapshotBuilder::new()
            .endpoints(records[..50].to_vec())
            .build();
        // Remove 5, add 10, and flip one endpoint's health.
        let mut sick = records[1].clone();
        sick.in_service = false;
        let removed: Vec<EndpointRecord> = records[..5].to_vec();
        let mut added: Vec<EndpointRecord> = records[50..].to_vec();
        added.push(sick.clone());
        let removed = [removed, vec![]].concat();
        let derived = base.apply(&removed, &added);
        let mut expected: Vec<EndpointRecord> = records[5..].to_vec();
        expected.push(sick);
        let full = SnapshotBuilder::new().endpoints(expected).build();
        for network in ["net0", "net1", "net2"] {
            for name in (0..4)
                .map(|s| format!("svc{s}"))
                .chain((0..60).map(|i| format!("c{i}")))
                .chain((0..60).map(|i| format!("alias{i}.{network}")))
            {
                assert_eq!(
                    all(&derived, network, &name),
                    all(&full, network, &name),
                    "{network} {name}"
                );
            }
            for i in 0..60u32 {
                let ip = Ipv4Addr::from(0x6440_0000 + i);
                assert_eq!(
                    derived.reverse(network, ip),
                    full.reverse(network, ip),
                    "PTR {ip}"
                );
            }
        }
        assert_eq!(all(&derived, "net1", "svc1"), all(&full, "net1", "svc1"));
    }

    #[test]
    fn untouched_names_keep_their_rotation() {
        let base = SnapshotBuilder::new()
            .endpoints((0..3).map(|i| EndpointRecord {
                network: "n".into(),
                ..rec(i, "a")
            }))
            .build();
        let mut first = Vec::new();
        base.lookup("n", b"a").unwrap().rotated(&mut first);
        let next = base.apply(
            &[],
            &[EndpointRecord {
                network: "n".into(),
                ..rec(9, "b")
            }],
        );
        let mut second = Vec::new();
        next.lookup("n", b"a").unwrap().rotated(&mut second);
        assert_ne!(first[0], second[0], "rotation continued across the update");
        assert!(next.lookup("n", b"b").is_some());
        let emptied = next.apply(
            &[EndpointRecord {
                network: "n".into(),
                ..rec(9, "b")
            }],
            &[],
        );
        assert!(emptied.lookup("n", b"b").is_none());
    }
}
