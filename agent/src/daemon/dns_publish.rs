//! Cluster view → DNS snapshot. The records are derived from the view as a whole
//! and only the difference is applied to the snapshot, so publishing after every
//! change costs what changed, not the cluster's size.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use netagent_dns::{DnsServer, Snapshot};

use crate::model::{Cluster, EndpointRecord};

/// The name records the cluster gives, by store key: endpoints of live nodes on
/// networks that exist.
pub fn dns_records(c: &Cluster) -> BTreeMap<String, netagent_dns::EndpointRecord> {
    c.endpoints
        .iter()
        .filter(|(_, e)| c.is_alive(&e.node) && c.networks.contains_key(&e.network))
        .map(|(k, e)| (k.clone(), dns_record(e)))
        .collect()
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
    }
}

pub struct DnsPublisher {
    server: Arc<DnsServer>,
    /// The records last published, and the snapshot they make.
    published: Mutex<(BTreeMap<String, netagent_dns::EndpointRecord>, Snapshot)>,
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
    pub fn publish(&self, wanted: BTreeMap<String, netagent_dns::EndpointRecord>) {
        let mut guard = self.published.lock().unwrap();
        let (current, snapshot) = &mut *guard;
        if *current == wanted {
            return;
        }
        let removed: Vec<_> = current
            .iter()
            .filter(|(k, r)| wanted.get(*k) != Some(r))
            .map(|(_, r)| r.clone())
            .collect();
        let added: Vec<_> = wanted
            .iter()
            .filter(|(k, r)| current.get(*k) != Some(r))
            .map(|(_, r)| r.clone())
            .collect();
        *snapshot = snapshot.apply(&removed, &added);
        *current = wanted;
        self.server.update(snapshot.clone());
    }

    /// The snapshot last published.
    #[cfg(test)]
    pub fn snapshot(&self) -> Snapshot {
        self.published.lock().unwrap().1.clone()
    }
}
