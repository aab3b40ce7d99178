//! Cluster view → DNS snapshot. The records are derived from the view as a whole
//! and only the difference is applied to the snapshot, so publishing after every
//! change costs what changed, not the cluster's size. A change in which services
//! answer one replica at a time rebuilds the snapshot whole (rare: a label).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use netagent_dns::{DnsServer, Snapshot, SnapshotBuilder};

use crate::model::{Cluster, EndpointRecord, Port, Protocol};

/// What the DNS should answer, derived from the cluster view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DnsRecords {
    /// By store key: endpoints of live nodes on networks that exist.
    records: BTreeMap<String, netagent_dns::EndpointRecord>,
    /// (network, service) answered one replica at a time: any of its endpoints asks.
    one_per_answer: BTreeSet<(String, String)>,
}

pub fn dns_records(c: &Cluster) -> DnsRecords {
    let live = c
        .endpoints
        .iter()
        .filter(|(_, e)| c.is_alive(&e.node) && c.networks.contains_key(&e.network));
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
}

impl DnsPublisher {
    pub fn new(server: Arc<DnsServer>) -> Self {
        DnsPublisher {
            server,
            published: Mutex::new(Default::default()),
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

    /// The snapshot last published.
    #[cfg(test)]
    pub fn snapshot(&self) -> Snapshot {
        self.published.lock().unwrap().1.clone()
    }
}
