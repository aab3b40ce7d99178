//! What `status`, `peers`, `services` and `endpoints` show, read from the cluster
//! view.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use super::datapath::Datapath;
use super::keys::encode_key;
use super::Agent;
use crate::api::{
    AgentState, DockerStatus, EndpointInfo, MeshPeerInfo, PeerInfo, PeerState, ServiceInfo, Status,
};
use crate::store::{Store, StoreHealth};

impl<S: Store, D: Datapath> Agent<S, D> {
    pub fn status(&self) -> Status {
        let store = self.view.store().health().borrow().clone();
        let peers = self.peers();
        let docker = self.docker.as_ref().map(|d| d.status());
        let left_out_here = self.reconciler.left_out();
        let local_endpoints = self.local.len();
        self.view.read(|c| Status {
            node: self.node.name.clone(),
            underlay: self.node.underlay,
            version: self.node.version.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            state: if degraded_because(&store, docker.as_ref()).is_none() {
                AgentState::Ok
            } else {
                AgentState::Degraded
            },
            store,
            networks: c.networks.len(),
            local_endpoints,
            endpoints: c.endpoints.len(),
            peers_up: peers.iter().filter(|p| p.state == PeerState::Up).count(),
            peers_down: peers.iter().filter(|p| p.state != PeerState::Up).count(),
            docker,
            mesh_address: self.mesh.address(),
            public_key: self.mesh.public_key(),
            left_out: c
                .rejected
                .iter()
                .map(|(key, why)| format!("store record {key}: {why}"))
                .chain(
                    left_out_here
                        .iter()
                        .map(|(net, why)| format!("network {net:?} on this host: {why}")),
                )
                .collect(),
        })
    }

    /// Why `status` says `degraded` (None: `ok`), in one line.
    pub fn degraded_because(&self) -> Option<String> {
        let store = self.view.store().health().borrow().clone();
        let docker = self.docker.as_ref().map(|d| d.status());
        degraded_because(&store, docker.as_ref())
    }

    /// Ready: `status` says `ok` (store and Docker reached), and every attached
    /// namespace has its DNS listener. Otherwise why not, in one line. The agent
    /// exists only after its first reconcile, so that is implied. While a change is
    /// under way its namespace may be between the two lists; the listener check
    /// then waits for the next call rather than for the change.
    pub async fn readiness(&self) -> Result<(), String> {
        if let Some(why) = self.degraded_because() {
            return Err(why);
        }
        let Ok(_changes) = self.changes.try_lock() else {
            return Ok(());
        };
        let attached: BTreeSet<u64> = self.local.snapshot().values().map(|e| e.ino).collect();
        let listening = self.listeners.scopes().await;
        let missing = attached
            .iter()
            .filter(|ino| !listening.contains_key(ino))
            .count();
        if missing > 0 {
            return Err(format!(
                "{missing} of {} attached namespaces have no DNS listener (the log says why)",
                attached.len()
            ));
        }
        Ok(())
    }

    /// Every other host that is alive or holds a block: up while its lease lives.
    pub fn peers(&self) -> Vec<PeerInfo> {
        // By public key, as the store's records name them.
        let stats: HashMap<String, netagent_overlay::PeerStats> = self
            .mesh
            .stats()
            .into_iter()
            .map(|s| (encode_key(&s.public_key), s))
            .collect();
        let rtt = self.rtt.lock().unwrap().clone();
        self.view.read(|c| self.peers_in(c, &stats, &rtt))
    }

    fn peers_in(
        &self,
        c: &crate::model::Cluster,
        stats: &HashMap<String, netagent_overlay::PeerStats>,
        rtt: &HashMap<String, f64>,
    ) -> Vec<PeerInfo> {
        let mut peers: BTreeMap<String, PeerInfo> = BTreeMap::new();
        // Counted in one pass: per peer it would cost peers × endpoints.
        let mut endpoints_of: HashMap<&str, usize> = HashMap::new();
        for e in c.endpoints.values() {
            *endpoints_of.entry(e.node.as_str()).or_default() += 1;
        }
        for b in c.blocks.values().filter(|b| b.node != self.node.name) {
            peer(&mut peers, &b.node, b.underlay)
                .networks
                .push(b.network.clone());
        }
        // A live node's own record has its current underlay.
        for n in c.nodes.values().filter(|n| n.name != self.node.name) {
            peer(&mut peers, &n.name, n.underlay).underlay = n.underlay;
        }
        for p in peers.values_mut() {
            p.mesh = c.mesh_of(&p.name).and_then(|record| {
                let s = stats.get(&record.public_key)?;
                Some(MeshPeerInfo {
                    address: s.address,
                    endpoint: s.endpoint.to_string(),
                    public_key: record.public_key.clone(),
                    handshake_secs: s.last_handshake.map(|d| d.as_secs()),
                    tx_bytes: s.tx_bytes,
                    rx_bytes: s.rx_bytes,
                })
            });
            p.state = if c.is_alive(&p.name) {
                PeerState::Up
            } else {
                PeerState::Down
            };
            p.endpoints = endpoints_of.get(p.name.as_str()).copied().unwrap_or(0);
            p.rtt_ms = rtt.get(&p.name).copied();
        }
        peers.into_values().collect()
    }

    pub fn services(&self, network: Option<&str>) -> Vec<ServiceInfo> {
        self.view.read(|c| services_in(c, network))
    }

    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        let records: Vec<_> = self.view.read(|c| c.endpoints.values().cloned().collect());
        records.iter().map(|e| self.endpoint_info(e)).collect()
    }
}

fn peer<'a>(
    peers: &'a mut BTreeMap<String, PeerInfo>,
    name: &str,
    underlay: Ipv4Addr,
) -> &'a mut PeerInfo {
    peers.entry(name.to_owned()).or_insert_with(|| PeerInfo {
        name: name.to_owned(),
        underlay,
        state: PeerState::Down,
        rtt_ms: None,
        endpoints: 0,
        networks: Vec::new(),
        mesh: None,
    })
}

fn services_in(c: &crate::model::Cluster, network: Option<&str>) -> Vec<ServiceInfo> {
    let mut services: BTreeMap<(String, String), ServiceInfo> = BTreeMap::new();
    for e in c.endpoints.values() {
        let Some(service) = &e.service else { continue };
        if network.is_some_and(|n| n != e.network) {
            continue;
        }
        let s = services
            .entry((e.network.clone(), service.clone()))
            .or_insert_with(|| ServiceInfo {
                network: e.network.clone(),
                service: service.clone(),
                replicas: Vec::new(),
                nodes: Vec::new(),
            });
        if serves(c, e) {
            s.replicas.push(e.address);
            if !s.nodes.contains(&e.node) {
                s.nodes.push(e.node.clone());
            }
        }
    }
    services.into_values().collect()
}

/// Whether DNS answers a service's name with this replica.
pub(super) fn serves(c: &crate::model::Cluster, e: &crate::model::EndpointRecord) -> bool {
    c.is_alive(&e.node) && e.in_service
}

/// The one rule behind `ok` and `degraded`: the store and (when enabled) the Docker
/// engine are reached. Otherwise which is not, and why.
fn degraded_because(store: &StoreHealth, docker: Option<&DockerStatus>) -> Option<String> {
    if !store.connected {
        return Some(format!(
            "{} at {} unreachable: {}",
            store.kind,
            store.location,
            store.error.as_deref().unwrap_or("not connected yet")
        ));
    }
    match docker {
        // The engine's error names it already ("Docker engine at ... unreachable").
        Some(d) if !d.connected => Some(match d.error.as_deref() {
            Some(e) if e.starts_with("Docker engine") => e.to_owned(),
            e => format!(
                "Docker engine at {} unreachable: {}",
                d.socket,
                e.unwrap_or("not connected yet")
            ),
        }),
        _ => None,
    }
}
