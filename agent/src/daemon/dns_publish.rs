//! Cluster view → DNS snapshot. After a change, only the records it can touch are
//! derived again (an endpoint's own key; every endpoint of a node whose lease came or
//! went, or of a network created or removed) and only their difference is applied to
//! the snapshot, so publishing after every change costs what changed, not the
//! cluster's size: with 100,000 endpoints, deriving every record again on each of a
//! deploy's changes would cost every host tens of milliseconds per change. A fresh
//! picture derives everything; a change in which services answer one replica at a
//! time rebuilds the snapshot whole (rare: a label).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use netagent_dns::{DnsServer, Snapshot, SnapshotBuilder};

use super::cluster_view::Dirty;
use crate::model::{self, Cluster, EndpointRecord, Port, Protocol};

/// What the DNS should answer, derived from the cluster view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DnsRecords {
    /// By store key: endpoints of live nodes on networks that exist.
    records: BTreeMap<String, netagent_dns::EndpointRecord>,
    /// (network, service) answered one replica at a time: any of its endpoints asks.
    one_per_answer: BTreeSet<(String, String)>,
}

/// Whether `e` is answered: its node is alive and its network exists.
fn answered(c: &Cluster, e: &EndpointRecord) -> bool {
    c.is_alive(&e.node) && c.networks.contains_key(&e.network)
}

pub fn dns_records(c: &Cluster) -> DnsRecords {
    let live = c.endpoints.iter().filter(|(_, e)| answered(c, e));
    let mut out = DnsRecords::default();
    for (key, e) in live {
        out.records.insert(key.clone(), dns_record(e));
        if let (true, Some(service)) = (e.one_per_answer, &e.service) {
            out.one_per_answer
                .insert((e.network.clone(), service.clone()));
        }
    }
    out
}

fn dns_record(e: &EndpointRecord) -> netagent_dns::EndpointRecord {
    netagent_dns::EndpointRecord {
        network: e.network.clone(),
        address: e.address,
        // Every endpoint answers to some name of its own, for PTR.
        name: e
            .name
            .clone()
            .unwrap_or_else(|| e.address.to_string().replace('.', "-")),
        service: e.service.clone(),
        aliases: e.aliases.clone(),
        in_service: e.in_service,
        ports: e.ports.iter().map(service_port).collect(),
    }
}

fn service_port(p: &Port) -> netagent_dns::ServicePort {
    netagent_dns::ServicePort {
        name: p.name.clone(),
        port: p.port,
        protocol: match p.protocol {
            Protocol::Tcp => netagent_dns::PortProtocol::Tcp,
            Protocol::Udp => netagent_dns::PortProtocol::Udp,
        },
    }
}

pub struct DnsPublisher {
    server: Arc<DnsServer>,
    /// The records last published, and the snapshot they make.
    published: Mutex<(DnsRecords, Snapshot)>,
    /// Held across a publication, from reading the view to updating the server: a
    /// whole derivation published after a later change would undo that change.
    one_at_a_time: Mutex<()>,
}

impl DnsPublisher {
    pub fn new(server: Arc<DnsServer>) -> Self {
        DnsPublisher {
            server,
            published: Mutex::new(Default::default()),
            one_at_a_time: Mutex::new(()),
        }
    }

    pub fn server(&self) -> &Arc<DnsServer> {
        &self.server
    }

    /// Publishes what `wanted` differs in from the last records published.
    pub fn publish(&self, wanted: DnsRecords) {
        let mut guard = self.published.lock().unwrap();
        let (current, snapshot) = &mut *guard;
        if *current == wanted {
            return;
        }
        if current.one_per_answer != wanted.one_per_answer {
            let builder = wanted.one_per_answer.iter().fold(
                SnapshotBuilder::new().endpoints(wanted.records.values().cloned()),
                |b, (network, service)| b.one_per_answer(network, service),
            );
            *snapshot = builder.build();
        } else {
            let (now, next) = (&current.records, &wanted.records);
            let removed: Vec<_> = now
                .iter()
                .filter(|(k, r)| next.get(*k) != Some(r))
                .map(|(_, r)| r.clone())
                .collect();
            let added: Vec<_> = next
                .iter()
                .filter(|(k, r)| now.get(*k) != Some(r))
                .map(|(_, r)| r.clone())
                .collect();
            *snapshot = snapshot.apply(&removed, &added);
        }
        *current = wanted;
        self.server.update(snapshot.clone());
    }

    /// Taken for the whole of one publication (see `one_at_a_time`).
    pub fn one_at_a_time(&self) -> std::sync::MutexGuard<'_, ()> {
        self.one_at_a_time.lock().unwrap()
    }

    /// Publishes what changed in `c` since the last call (`dirty`, from
    /// [`super::cluster_view::ClusterView::read_changed`]). Runs under the view's
    /// read lock: only the incremental path, which costs what changed, runs there;
    /// a whole derivation is returned to be published after the lock is let go.
    pub fn publish_changed(&self, c: &Cluster, dirty: Dirty) -> Option<DnsRecords> {
        let Dirty::Keys(keys) = dirty else {
            return Some(dns_records(c));
        };
        let mut affected = BTreeSet::new();
        let mut nodes = BTreeSet::new();
        let mut networks = BTreeSet::new();
        for key in &keys {
            if let Some(k) = key.strip_prefix(model::ENDPOINTS) {
                affected.insert(k.to_owned());
            } else if let Some(n) = key.strip_prefix(model::NODES) {
                nodes.insert(n);
            } else if let Some(n) = key.strip_prefix(model::NETWORKS) {
                networks.insert(n);
            }
        }
        if !nodes.is_empty() || !networks.is_empty() {
            affected.extend(
                c.endpoints
                    .iter()
                    .filter(|(_, e)| {
                        nodes.contains(e.node.as_str()) || networks.contains(e.network.as_str())
                    })
                    .map(|(k, _)| k.clone()),
            );
        }
        if affected.is_empty() {
            return None;
        }
        let mut guard = self.published.lock().unwrap();
        let (current, snapshot) = &mut *guard;
        let one_per_answer = |k: &String| {
            c.endpoints.get(k).is_some_and(|e| e.one_per_answer)
                || current.records.get(k).is_some_and(|r| {
                    r.service.as_ref().is_some_and(|s| {
                        current
                            .one_per_answer
                            .contains(&(r.network.clone(), s.clone()))
                    })
                })
        };
        if affected.iter().any(one_per_answer) {
            return Some(dns_records(c));
        }
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        for key in affected {
            let next = c
                .endpoints
                .get(&key)
                .filter(|e| answered(c, e))
                .map(dns_record);
            if current.records.get(&key) == next.as_ref() {
                continue;
            }
            let previous = match next {
                Some(record) => {
                    added.push(record.clone());
                    current.records.insert(key, record)
                }
                None => current.records.remove(&key),
            };
            removed.extend(previous);
        }
        if !removed.is_empty() || !added.is_empty() {
            *snapshot = snapshot.apply(&removed, &added);
            self.server.update(snapshot.clone());
        }
        None
    }

    /// The snapshot last published.
    #[cfg(test)]
    pub fn snapshot(&self) -> Snapshot {
        self.published.lock().unwrap().1.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netagent_dns::Forwarder;

    use super::*;
    use crate::model::{encode, NetworkRecord, NodeRecord};
    use crate::store::Change;

    fn put(key: String, value: Vec<u8>) -> Change {
        Change {
            key,
            value: Some(value),
        }
    }

    fn endpoint(network: &str, i: u8, node: &str, service: &str) -> (String, Vec<u8>) {
        let address = Ipv4Addr::new(100, 64, 0, i);
        let record = EndpointRecord {
            network: network.into(),
            address,
            node: node.into(),
            id: format!("netns:e{i}"),
            netns: format!("/run/netns/e{i}"),
            name: Some(format!("e{i}")),
            service: Some(service.into()),
            aliases: Vec::new(),
            in_service: true,
            container: None,
            one_per_answer: false,
            ports: Vec::new(),
        };
        (model::endpoint_key(network, address), encode(&record))
    }

    #[test]
    fn publishing_changes_gives_what_deriving_everything_gives() {
        let publisher = DnsPublisher::new(DnsServer::new(Forwarder::new(Vec::new()).unwrap(), 5));
        let mut c = Cluster::default();
        publisher.publish(dns_records(&c));
        let node = |n: &str| {
            encode(&NodeRecord {
                name: n.into(),
                underlay: Ipv4Addr::new(192, 0, 2, 1),
                version: "0".into(),
                started: 0,
            })
        };
        let network = |n: &str, subnet: &str| {
            encode(&NetworkRecord {
                name: n.into(),
                subnet: subnet.parse().unwrap(),
                vni: 100,
                encrypted: false,
                mtu: None,
                block_prefix: 26,
            })
        };
        // Deterministic steps covering each way a record comes and goes: an
        // endpoint's own key, its node's lease, its network.
        let mut seed: u32 = 7;
        let mut next = move |n: u32| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) % n
        };
        for step in 0..400 {
            let nodes = ["h1", "h2", "h3"];
            let nets = [("a", "100.64.0.0/16"), ("b", "100.65.0.0/16")];
            let change = match next(6) {
                0 | 1 => {
                    let (net, _) = nets[next(2) as usize];
                    let (k, v) = endpoint(
                        net,
                        next(40) as u8,
                        nodes[next(3) as usize],
                        ["api", "db"][next(2) as usize],
                    );
                    put(k, v)
                }
                2 => {
                    let (net, _) = nets[next(2) as usize];
                    Change {
                        key: model::endpoint_key(net, Ipv4Addr::new(100, 64, 0, next(40) as u8)),
                        value: None,
                    }
                }
                3 => {
                    let n = nodes[next(3) as usize];
                    if next(2) == 0 {
                        put(model::node_key(n), node(n))
                    } else {
                        Change {
                            key: model::node_key(n),
                            value: None,
                        }
                    }
                }
                _ => {
                    let (n, subnet) = nets[next(2) as usize];
                    if next(3) > 0 {
                        put(model::network_key(n), network(n, subnet))
                    } else {
                        Change {
                            key: model::network_key(n),
                            value: None,
                        }
                    }
                }
            };
            c.apply(std::slice::from_ref(&change));
            let dirty = Dirty::Keys([change.key.clone()].into());
            if let Some(whole) = publisher.publish_changed(&c, dirty) {
                publisher.publish(whole);
            }
            let published = publisher.published.lock().unwrap().0.clone();
            assert_eq!(published, dns_records(&c), "step {step}: {change:?}");
        }
        // The steps did put records in and take them out.
        assert!(!dns_records(&c).records.is_empty() || c.endpoints.is_empty());
    }
}
