//! The record set: an immutable snapshot of every network's names, built whole from
//! endpoint records and swapped whole by the server's owner. Queries read it without
//! locks; the only shared mutable state is each name's rotation counter (an atomic).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// The addresses one name resolves to, and where its rotation stands.
#[derive(Debug, Default)]
pub struct NameSet {
    addresses: Vec<Ipv4Addr>,
    one_per_answer: bool,
    cursor: AtomicUsize,
}

impl NameSet {
    /// The addresses in this query's order: all of them rotated by one per query, or
    /// (one-per-answer) just the next one, so even clients that sort answers spread out.
    pub fn rotated(&self, out: &mut Vec<Ipv4Addr>) {
        let n = self.addresses.len();
        if n == 0 {
            return;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        if self.one_per_answer {
            out.push(self.addresses[start]);
        } else {
            out.extend(
                self.addresses[start..]
                    .iter()
                    .chain(&self.addresses[..start]),
            );
        }
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }
}

/// Every name of one network.
#[derive(Debug, Default)]
pub struct Zone {
    names: HashMap<NameKey, NameSet>,
}

/// The whole record set.
#[derive(Debug, Default)]
pub struct Snapshot {
    zones: HashMap<String, Zone>,
    /// Reverse names per (network, address): the encoded `<name>.<network>.`.
    ptr: HashMap<(String, Ipv4Addr), Vec<u8>>,
}

impl Snapshot {
    /// The name set of `name` in `network`, if the network has it.
    pub fn lookup(&self, network: &str, name: &[u8]) -> Option<&NameSet> {
        self.zones.get(network)?.names.get(name)
    }

    /// The encoded PTR target for `address` on `network`.
    pub fn reverse(&self, network: &str, address: Ipv4Addr) -> Option<&[u8]> {
        self.ptr
            .get(&(network.to_string(), address))
            .map(Vec::as_slice)
    }

    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.zones.keys().map(String::as_str)
    }
}

/// Builds a snapshot from endpoint records.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    records: Vec<EndpointRecord>,
    one_per_answer: Vec<(String, String)>,
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
        self.one_per_answer
            .push((network.to_string(), service.to_lowercase()));
        self
    }

    /// Names that cannot be carried by DNS are skipped (the caller validates them
    /// earlier and reports them to the user).
    pub fn build(self) -> Snapshot {
        let mut snap = Snapshot::default();
        // Sorted so every replica set is in a stable order whatever the input order.
        let mut records = self.records;
        records.sort_by(|a, b| (&a.network, a.address).cmp(&(&b.network, b.address)));
        for r in &records {
            let zone = snap.zones.entry(r.network.clone()).or_default();
            let mut add = |name: &str| {
                for variant in [name.to_string(), format!("{name}.{}", r.network)] {
                    if let Some(key) = name_key(&variant) {
                        let set = zone.names.entry(key).or_default();
                        if set.addresses.last() != Some(&r.address) {
                            set.addresses.push(r.address);
                        }
                    }
                }
            };
            add(&r.name);
            for alias in &r.aliases {
                add(alias);
            }
            if let Some(service) = r.service.as_deref().filter(|_| r.in_service) {
                add(service);
                add(&format!("tasks.{service}"));
            }
            if let Some(key) = name_key(&format!("{}.{}", r.name, r.network)) {
                let mut encoded = Vec::with_capacity(key.len() + 2);
                encode_name(&key, &mut encoded);
                snap.ptr.insert((r.network.clone(), r.address), encoded);
            }
        }
        for (network, service) in &self.one_per_answer {
            if let Some(zone) = snap.zones.get_mut(network) {
                for name in [service.clone(), format!("tasks.{service}")] {
                    for variant in [name.clone(), format!("{name}.{network}")] {
                        if let Some(set) = name_key(&variant).and_then(|k| zone.names.get_mut(&k)) {
                            set.one_per_answer = true;
                        }
                    }
                }
            }
        }
        snap
    }
}
