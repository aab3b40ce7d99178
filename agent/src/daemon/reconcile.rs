//! What this host's kernel should hold, derived purely from the cluster view and
//! this host's endpoints ([`desired_host_state`]), and the reconciler that applies it
//! and remembers what it applied.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use ipnet::Ipv4Net;
use netagent_overlay::{Endpoint, HostState, NetworkSpec, NetworkState, Peer};
use tracing::{info, warn};

use super::datapath::Datapath;
use super::local::LocalEndpoint;
use crate::model::{self, Cluster};

/// What the desired state depends on besides the cluster and the endpoints.
pub struct HostFacts<'a> {
    pub node: &'a str,
    pub underlay: Ipv4Addr,
    pub underlay_interface: Option<&'a str>,
    /// This host's mesh address while the encrypted mesh runs.
    pub mesh_address: Option<Ipv4Addr>,
    /// The store's addresses, kept from containers.
    pub store_addresses: &'a [Ipv4Addr],
}

pub fn network_spec(net: &model::NetworkRecord, block: Ipv4Net) -> NetworkSpec {
    NetworkSpec {
        name: net.name.clone(),
        vni: net.vni,
        subnet: net.subnet,
        block,
        mtu: net.mtu,
        encrypted: net.encrypted,
    }
}

/// The kernel state this host should have: every network it holds a block of, with
/// every other block of it as a peer, and the namespaces attached here. An encrypted
/// network waits for the mesh: it is never carried in plaintext on the underlay.
pub fn desired_host_state(
    c: &Cluster,
    endpoints: &BTreeMap<String, LocalEndpoint>,
    host: &HostFacts<'_>,
) -> HostState {
    let mut networks = Vec::new();
    for net in c.networks.values() {
        let Some(mine) = c.blocks_of(&net.name).find(|b| b.node == host.node) else {
            continue;
        };
        if net.encrypted && host.mesh_address.is_none() {
            continue;
        }
        // Encrypted networks reach their peers at mesh addresses, inside WireGuard.
        let peers = c
            .blocks_of(&net.name)
            .filter(|b| b.node != host.node)
            .filter_map(|b| {
                let underlay = if net.encrypted {
                    c.mesh_of(&b.node)?.address
                } else {
                    b.underlay
                };
                Some(Peer {
                    name: b.node.clone(),
                    underlay,
                    block: b.block,
                })
            })
            .collect();
        let endpoints = endpoints
            .values()
            .filter(|e| e.record.network == net.name)
            .map(LocalEndpoint::kernel_endpoint)
            .collect();
        networks.push(NetworkState {
            network: network_spec(net, mine.block),
            peers,
            endpoints,
        });
    }
    HostState {
        underlay_address: host.underlay,
        underlay_interface: host.underlay_interface.map(str::to_owned),
        mesh_address: host.mesh_address,
        networks,
        protected: super::protected::protected(c, host.store_addresses),
    }
}

/// The state last applied, and the networks left out of it.
#[derive(Default)]
pub struct Reconciler {
    applied: Mutex<Option<HostState>>,
    /// Networks whose records clash, left out of the datapath, with why.
    left_out: Mutex<Vec<(String, String)>>,
    /// How long datapath applies take, and how many failed (for the metrics).
    pub durations: super::metrics::Histogram,
    pub errors: std::sync::atomic::AtomicU64,
}

impl Reconciler {
    /// `desired` less the networks whose records clash (named in `status` and the
    /// log): one bad network must not stop the others.
    pub fn applicable(&self, desired: HostState) -> HostState {
        let (desired, left_out) = desired.without_invalid_networks();
        let left_out: Vec<(String, String)> = left_out
            .into_iter()
            .map(|(n, e)| (n, e.to_string()))
            .collect();
        let mut known = self.left_out.lock().unwrap();
        for (network, why) in left_out.iter().filter(|l| !known.contains(l)) {
            warn!(
                network,
                why, "network left out of this host's datapath; the others are applied"
            );
        }
        *known = left_out;
        desired
    }

    /// Why `network` was left out of the datapath, if it was.
    pub fn why_left_out(&self, network: &str) -> Option<String> {
        self.left_out
            .lock()
            .unwrap()
            .iter()
            .find(|(n, _)| n == network)
            .map(|(_, why)| why.clone())
    }

    pub fn left_out(&self) -> Vec<(String, String)> {
        self.left_out.lock().unwrap().clone()
    }

    /// Whether `network` (as specified) is in the state last applied completely.
    pub fn has_network(&self, spec: &NetworkSpec) -> bool {
        self.applied
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|a| a.networks.iter().any(|n| &n.network == spec))
    }

    /// Applies `desired` unless it is what was applied last (`full`: regardless, to
    /// repair drift). Only a complete apply is remembered: after a failure the next
    /// pass applies again.
    pub async fn apply<D: Datapath>(
        &self,
        datapath: &D,
        desired: HostState,
        full: bool,
    ) -> netagent_overlay::Result<()> {
        if !full && self.applied.lock().unwrap().as_ref() == Some(&desired) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let outcome = datapath.apply(&desired).await;
        self.durations.observe(started.elapsed());
        if outcome.is_err() {
            self.errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match &outcome {
            Ok(report) if !report.is_empty() => info!(
                created = report.created.len(),
                removed = report.removed.len(),
                "datapath reconciled"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "datapath reconcile incomplete; retrying later"),
        }
        *self.applied.lock().unwrap() = outcome.is_ok().then_some(desired);
        outcome.map(|_| ())
    }

    /// An endpoint was added to the kernel outside a pass (attach).
    pub fn attached(&self, spec: &NetworkSpec, endpoint: Endpoint) {
        if let Some(applied) = self.applied.lock().unwrap().as_mut() {
            if let Some(n) = applied.networks.iter_mut().find(|n| &n.network == spec) {
                n.endpoints.push(endpoint);
            }
        }
    }

    /// An endpoint was removed from the kernel outside a pass (detach).
    pub fn detached(&self, network: &str, address: Ipv4Addr) {
        if let Some(applied) = self.applied.lock().unwrap().as_mut() {
            for n in applied
                .networks
                .iter_mut()
                .filter(|n| n.network.name == network)
            {
                n.endpoints.retain(|e| e.address != address);
            }
        }
    }
}
