//! The picture of the mesh the live page draws: hosts with their state and round
//! trip, networks, and each service's replicas grouped by host. Built from the same
//! views as `status`, `peers` and `services`, so the page and the CLI agree.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use super::datapath::Datapath;
use super::views::serves;
use super::Agent;
use crate::api::{AgentState, PeerState};
use crate::store::Store;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Picture {
    /// The host that draws it.
    pub node: String,
    /// `starting`, `ok` or `degraded`, as `status` says.
    pub state: String,
    /// Why it is not `ok`, in one line.
    pub detail: Option<String>,
    pub hosts: Vec<HostPicture>,
    pub networks: Vec<NetworkPicture>,
    pub services: Vec<ServicePicture>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostPicture {
    pub name: String,
    pub underlay: Ipv4Addr,
    /// `self` for the host that draws the picture, else `up` or `down`.
    pub state: String,
    pub rtt_ms: Option<f64>,
    pub endpoints: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetworkPicture {
    pub name: String,
    pub subnet: Ipv4Net,
    pub vni: u32,
    pub encrypted: bool,
    /// Hosts holding a block of it.
    pub hosts: Vec<String>,
    pub endpoints: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePicture {
    pub network: String,
    pub service: String,
    /// By host name.
    pub hosts: BTreeMap<String, Vec<Replica>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Replica {
    pub address: Ipv4Addr,
    pub name: Option<String>,
    /// Whether DNS answers with it (its host is alive and it is in service).
    pub serving: bool,
}

impl Picture {
    /// What can be drawn before the agent has read the store: this host alone.
    pub fn starting(node: &str, detail: String) -> Self {
        Picture {
            node: node.to_owned(),
            state: "starting".into(),
            detail: Some(detail),
            hosts: Vec::new(),
            networks: Vec::new(),
            services: Vec::new(),
        }
    }
}

impl<S: Store, D: Datapath> Agent<S, D> {
    pub fn picture(&self) -> Picture {
        // The state as `status` decides it, without building the rest of `status`
        // (its peers are listed just below).
        let detail = self.degraded_because();
        let state = if detail.is_none() {
            AgentState::Ok
        } else {
            AgentState::Degraded
        };
        let mut hosts = vec![HostPicture {
            name: self.node.name.clone(),
            underlay: self.node.underlay,
            state: "self".into(),
            rtt_ms: None,
            endpoints: self.local.len(),
        }];
        hosts.extend(self.peers().into_iter().map(|p| {
            HostPicture {
                state: match p.state {
                    PeerState::Up => "up",
                    PeerState::Down => "down",
                }
                .into(),
                name: p.name,
                underlay: p.underlay,
                rtt_ms: p.rtt_ms.map(|r| (r * 100.0).round() / 100.0),
                endpoints: p.endpoints,
            }
        }));
        let (networks, services) = self.view.read(|c| {
            // Counted in one pass: per network it would cost networks × endpoints.
            let mut endpoints_of: BTreeMap<&str, usize> = BTreeMap::new();
            for e in c.endpoints.values() {
                *endpoints_of.entry(e.network.as_str()).or_default() += 1;
            }
            let networks = c
                .networks
                .values()
                .map(|n| {
                    let mut holders: Vec<String> =
                        c.blocks_of(&n.name).map(|b| b.node.clone()).collect();
                    holders.sort();
                    holders.dedup();
                    NetworkPicture {
                        name: n.name.clone(),
                        subnet: n.subnet,
                        vni: n.vni,
                        encrypted: n.encrypted,
                        hosts: holders,
                        endpoints: endpoints_of.get(n.name.as_str()).copied().unwrap_or(0),
                    }
                })
                .collect();
            let mut services: BTreeMap<(String, String), ServicePicture> = BTreeMap::new();
            for e in c.endpoints.values() {
                let Some(service) = &e.service else { continue };
                services
                    .entry((e.network.clone(), service.clone()))
                    .or_insert_with(|| ServicePicture {
                        network: e.network.clone(),
                        service: service.clone(),
                        hosts: BTreeMap::new(),
                    })
                    .hosts
                    .entry(e.node.clone())
                    .or_default()
                    .push(Replica {
                        address: e.address,
                        name: e.name.clone(),
                        serving: serves(c, e),
                    });
            }
            (networks, services.into_values().collect())
        });
        Picture {
            node: self.node.name.clone(),
            state: state.to_string(),
            detail,
            hosts,
            networks,
            services,
        }
    }
}
