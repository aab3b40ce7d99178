//! The record set: an immutable snapshot of every network's names. Built whole from
//! endpoint records, or derived from the previous snapshot by [`Snapshot::apply`] for a
//! few changed endpoints; either way the server swaps it in whole. Queries read it
//! without locks; the only shared mutable state is each name's rotation counter.
//!
//! Zones, names and name sets sit behind `Arc`s, so deriving a snapshot copies
//! pointers of the touched network and rebuilds only the names that changed: an
//! update of one endpoint among 100,000 does not rebuild the other 99,999.
//!
//! Endpoints that name their ports also get SRV names (see [`EndpointRecord::ports`]),
//! kept apart from the address names so the A path never looks at them.

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
    /// Its named ports, answered as SRV records: `_<port>._<proto>.<service>` (every
    /// in-service replica with that port), `_<port>._<proto>.<name>` (this endpoint
    /// alone), and Consul's `<service>.service` (every in-service replica's first TCP
    /// port). The targets are the endpoints' own names.
    pub ports: Vec<ServicePort>,
}

/// One named port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// The service label (`http`), without the leading underscore.
    pub name: String,
    pub port: u16,
    pub protocol: PortProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Tcp,
    Udp,
}

impl PortProtocol {
    fn label(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "_tcp",
            PortProtocol::Udp => "_udp",
        }
    }
}

impl EndpointRecord {
    /// An endpoint on `network` named `name`, a replica of `service` if one is
    /// given: in service, with no aliases and no ports (set those on the result).
    pub fn replica(network: &str, address: Ipv4Addr, name: &str, service: Option<&str>) -> Self {
        EndpointRecord {
            network: network.into(),
            address,
            name: name.into(),
            service: service.map(Into::into),
            aliases: Vec::new(),
            in_service: true,
            ports: Vec::new(),
        }
    }

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

    /// Every SRV name this record contributes to its zone, each with the record's
    /// entry under it. Empty (and no allocation) for an endpoint without ports.
    fn srv_entries(&self) -> Vec<(NameKey, SrvTarget)> {
        if self.ports.is_empty() {
            return Vec::new();
        }
        let Some(target) = name_key(&self.name).map(|key| {
            let mut encoded = Vec::with_capacity(key.len() + 2);
            encode_name(&key, &mut encoded);
            Arc::<[u8]>::from(encoded)
        }) else {
            return Vec::new();
        };
        let service = self.service.as_deref().filter(|_| self.in_service);
        let mut names: Vec<(String, u16)> = Vec::new();
        for p in &self.ports {
            let prefix = format!("_{}.{}", p.name, p.protocol.label());
            names.push((format!("{prefix}.{}", self.name), p.port));
            if let Some(service) = service {
                names.push((format!("{prefix}.{service}"), p.port));
            }
        }
        // Consul answers a service with one port per instance: its first TCP one.
        let first_tcp = self.ports.iter().find(|p| p.protocol == PortProtocol::Tcp);
        if let (Some(service), Some(p)) = (service, first_tcp) {
            names.push((format!("{service}.service"), p.port));
        }
        let net = &self.network;
        let mut entries: Vec<(NameKey, SrvTarget)> = names
            .iter()
            .flat_map(|(n, port)| {
                [name_key(n), name_key(&format!("{n}.{net}"))]
                    .into_iter()
                    .flatten()
                    .map(|key| {
                        let entry = SrvTarget {
                            target: target.clone(),
                            port: *port,
                            address: self.address,
                        };
                        (key, entry)
                    })
            })
            .collect();
        entries.sort();
        entries.dedup();
        entries
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

/// `items` in this query's order: all of them rotated by one per query, or
/// (one-per-answer) just the next one, so even clients that sort answers spread out.
/// The one rotation of every answer that lists replicas (A and SRV).
fn rotation<'a, T>(
    items: &'a [T],
    cursor: &AtomicUsize,
    one_per_answer: bool,
) -> impl Iterator<Item = &'a T> {
    let n = items.len();
    let (start, take) = if n <= 1 {
        (0, n)
    } else {
        let start = cursor.fetch_add(1, Ordering::Relaxed) % n;
        (start, if one_per_answer { 1 } else { n })
    };
    items[start..].iter().chain(&items[..start]).take(take)
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
        out.extend(rotation(
            self.addresses.as_slice(),
            &self.cursor,
            self.one_per_answer,
        ));
    }

    /// Whether this name answers one replica at a time.
    pub fn is_one_per_answer(&self) -> bool {
        self.one_per_answer
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.as_slice().is_empty()
    }
}

/// One SRV record's data: a replica's port, and its own name as the target (whose
/// address goes into the additional section).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrvTarget {
    /// The target, encoded (`\x01a\x00`).
    pub target: Arc<[u8]>,
    pub port: u16,
    pub address: Ipv4Addr,
}

/// The SRV records of one name, and where their rotation stands.
#[derive(Debug)]
pub struct SrvSet {
    entries: Box<[SrvTarget]>,
    cursor: AtomicUsize,
}

impl SrvSet {
    /// The entries in this query's order, rotated as a service's addresses are.
    pub fn rotated<'a>(&'a self, out: &mut Vec<&'a SrvTarget>) {
        out.extend(rotation(&self.entries, &self.cursor, false));
    }
}

/// Every name of one network.
#[derive(Debug, Default, Clone)]
struct Zone {
    names: HashMap<Arc<[u8]>, Arc<NameSet>>,
    ptr: HashMap<Ipv4Addr, Arc<[u8]>>,
    /// SRV names (`_http._tcp.echo_api`, `echo_api.service`).
    srv: HashMap<Arc<[u8]>, Arc<SrvSet>>,
}

impl Zone {
    fn is_empty(&self) -> bool {
        self.names.is_empty() && self.ptr.is_empty() && self.srv.is_empty()
    }

    /// Puts `entry` under `key` or takes it out, keeping the name's rotation.
    fn change_srv(&mut self, key: NameKey, entry: SrvTarget, add: bool) {
        let old = self.srv.get(&key[..]);
        let mut entries = old.map(|s| s.entries.to_vec()).unwrap_or_default();
        let cursor = old.map_or(0, |s| s.cursor.load(Ordering::Relaxed));
        match (add, entries.binary_search(&entry)) {
            (true, Err(at)) => entries.insert(at, entry),
            (false, Ok(at)) => {
                entries.remove(at);
            }
            _ => {}
        }
        if entries.is_empty() {
            self.srv.remove(&key[..]);
            return;
        }
        let set = SrvSet {
            entries: entries.into_boxed_slice(),
            cursor: AtomicUsize::new(cursor),
        };
        self.srv.insert(key.into(), Arc::new(set));
    }
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

    /// The SRV records of `name` in `network`, if the network has it.
    pub fn lookup_srv(&self, network: &str, name: &[u8]) -> Option<&SrvSet> {
        self.zones.get(network)?.srv.get(name).map(Arc::as_ref)
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
            for (key, entry) in record.srv_entries() {
                zone.change_srv(key, entry, add);
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
            if zone.is_empty() {
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
        let mut srvs: HashMap<String, HashMap<NameKey, Vec<SrvTarget>>> = HashMap::new();
        for r in &self.records {
            let names = by_network.entry(r.network.clone()).or_default();
            for key in r.keys() {
                names.entry(key).or_default().push(r.address);
            }
            for (key, entry) in r.srv_entries() {
                let srv = srvs.entry(r.network.clone()).or_default();
                srv.entry(key).or_default().push(entry);
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
            let srv = srvs.remove(&network).unwrap_or_default();
            snap.zones.insert(
                network,
                Arc::new(Zone {
                    names,
                    ptr,
                    srv: srv_sets(srv),
                }),
            );
        }
        snap
    }
}

/// SRV sets in one order whatever the input order.
fn srv_sets(srv: HashMap<NameKey, Vec<SrvTarget>>) -> HashMap<Arc<[u8]>, Arc<SrvSet>> {
    srv.into_iter()
        .map(|(key, mut entries)| {
            entries.sort();
            entries.dedup();
            let set = SrvSet {
                entries: entries.into_boxed_slice(),
                cursor: AtomicUsize::new(0),
            };
            (Arc::<[u8]>::from(key), Arc::new(set))
        })
        .collect()
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
            ports: if i.is_multiple_of(2) {
                vec![ServicePort {
                    name: "http".into(),
                    port: 8000 + i as u16,
                    protocol: PortProtocol::Tcp,
                }]
            } else {
                Vec::new()
            },
        }
    }

    fn srv(s: &Snapshot, network: &str, name: &str) -> Vec<(u16, Ipv4Addr)> {
        let mut out = Vec::new();
        if let Some(set) = s.lookup_srv(network, name.as_bytes()) {
            set.rotated(&mut out);
        }
        let mut out: Vec<(u16, Ipv4Addr)> = out.iter().map(|e| (e.port, e.address)).collect();
        out.sort();
        out
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
                for srv_name in [format!("_http._tcp.{name}"), format!("{name}.service")] {
                    assert_eq!(
                        srv(&derived, network, &srv_name),
                        srv(&full, network, &srv_name),
                        "{network} {srv_name}"
                    );
                }
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
        assert!(
            !srv(&full, "net0", "_http._tcp.svc0").is_empty(),
            "the comparison above compared SRV sets that exist"
        );
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
