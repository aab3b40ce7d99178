//! What `status`, `peers`, `services` and `endpoints` show, read from the cluster
//! view, plus the round-trip probe behind `peers`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use netagent_overlay::block_gateway;

use super::datapath::Datapath;
use super::keys::encode_key;
use super::Agent;
use crate::api::{
    AgentState, EndpointInfo, MeshPeerInfo, PeerInfo, PeerState, ServiceInfo, Status,
};
use crate::store::Store;

const RTT_EVERY: Duration = Duration::from_secs(2);

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
            state: if store.connected && docker.as_ref().is_none_or(|d| d.connected) {
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
            p.endpoints = c.endpoints.values().filter(|e| e.node == p.name).count();
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

    /// Measures each live peer's round trip to its gateway on one shared network.
    pub(super) async fn rtt_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RTT_EVERY);
        loop {
            tick.tick().await;
            let targets: BTreeMap<Ipv4Addr, String> = self.view.read(|c| {
                let mine: BTreeSet<&str> = c
                    .blocks
                    .values()
                    .filter(|b| b.node == self.node.name)
                    .map(|b| b.network.as_str())
                    .collect();
                c.blocks
                    .values()
                    .filter(|b| b.node != self.node.name && mine.contains(b.network.as_str()))
                    .filter(|b| c.is_alive(&b.node))
                    .map(|b| (block_gateway(&b.block), b.node.clone()))
                    .collect()
            });
            // One gateway per peer is enough.
            let mut seen = BTreeSet::new();
            let targets: BTreeMap<Ipv4Addr, String> = targets
                .into_iter()
                .filter(|(_, n)| seen.insert(n.clone()))
                .collect();
            let measured = self
                .datapath
                .rtt(targets.keys().copied().collect(), Duration::from_secs(1))
                .await;
            let mut rtt = self.rtt.lock().unwrap();
            rtt.clear();
            for (ip, d) in measured {
                if let Some(node) = targets.get(&ip) {
                    rtt.insert(node.clone(), d.as_secs_f64() * 1000.0);
                }
            }
        }
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
        if c.is_alive(&e.node) && e.in_service {
            s.replicas.push(e.address);
            if !s.nodes.contains(&e.node) {
                s.nodes.push(e.node.clone());
            }
        }
    }
    services.into_values().collect()
}
