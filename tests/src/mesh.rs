//! Builds the desired overlay state of every host of a test bed: each network spans
//! all hosts, host `i` (1-based) holds block `i` (a /24) of each network's subnet.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netagent_overlay::{Endpoint, HostState, NetnsRef, NetworkSpec, NetworkState, Peer};

use crate::testbed::{netns_path, Testbed};

#[derive(Clone, Debug)]
pub struct MeshNetwork {
    pub name: String,
    pub vni: u32,
    pub subnet: Ipv4Net,
}

#[derive(Clone, Debug)]
pub struct MeshEndpoint {
    pub host: usize,
    pub network: String,
    pub netns: String,
    pub address: Ipv4Addr,
}

#[derive(Clone, Debug, Default)]
pub struct Mesh {
    pub underlays: Vec<Ipv4Addr>,
    pub networks: Vec<MeshNetwork>,
    pub endpoints: Vec<MeshEndpoint>,
}

/// Block `host` (1-based) of a subnet: the host-th /24, or /22 for subnets of /14
/// and larger (room for 1,000 endpoints on one host).
pub fn block(subnet: Ipv4Net, host: usize) -> Ipv4Net {
    let len = if subnet.prefix_len() <= 14 { 22 } else { 24 };
    let size = 1u32 << (32 - len);
    let base = u32::from(subnet.network()) + (host as u32) * size;
    Ipv4Net::new(Ipv4Addr::from(base), len).unwrap()
}

impl Mesh {
    pub fn new(bed: &Testbed) -> Self {
        Mesh {
            underlays: bed.hosts.iter().map(|h| h.underlay).collect(),
            ..Default::default()
        }
    }

    pub fn network(mut self, name: &str, vni: u32, subnet: &str) -> Self {
        self.networks.push(MeshNetwork {
            name: name.into(),
            vni,
            subnet: subnet.parse().unwrap(),
        });
        self
    }

    /// Adds an endpoint on `host` (1-based) with host-part `n` of that host's block.
    pub fn endpoint(&mut self, host: usize, network: &str, netns: &str, n: u8) -> Ipv4Addr {
        self.endpoint_at(host, network, netns, n.into())
    }

    /// Adds an endpoint with host-part `n` of a host's block, for blocks beyond a /24.
    pub fn endpoint_at(&mut self, host: usize, network: &str, netns: &str, n: u32) -> Ipv4Addr {
        let net = self
            .networks
            .iter()
            .find(|x| x.name == network)
            .expect("network");
        let b = block(net.subnet, host);
        let address = Ipv4Addr::from(u32::from(b.network()) + n);
        self.endpoints.push(MeshEndpoint {
            host,
            network: network.into(),
            netns: netns.into(),
            address,
        });
        address
    }

    /// Drops a host from the mesh (its peers forget it); its own state is untouched.
    pub fn without_host(&self, host: usize) -> Mesh {
        let mut m = self.clone();
        m.underlays[host - 1] = Ipv4Addr::UNSPECIFIED;
        m.endpoints.retain(|e| e.host != host);
        m
    }

    pub fn state(&self, host: usize) -> HostState {
        let networks = self
            .networks
            .iter()
            .map(|net| NetworkState {
                network: NetworkSpec {
                    name: net.name.clone(),
                    vni: net.vni,
                    subnet: net.subnet,
                    block: block(net.subnet, host),
                    mtu: None,
                    encrypted: false,
                },
                peers: self
                    .underlays
                    .iter()
                    .enumerate()
                    .filter(|(i, u)| i + 1 != host && !u.is_unspecified())
                    .map(|(i, u)| Peer {
                        name: format!("h{}", i + 1),
                        underlay: *u,
                        block: block(net.subnet, i + 1),
                    })
                    .collect(),
                endpoints: self
                    .endpoints
                    .iter()
                    .filter(|e| e.host == host && e.network == net.name)
                    .map(|e| Endpoint {
                        id: e.netns.clone(),
                        netns: NetnsRef::Path(netns_path(&e.netns)),
                        address: e.address,
                        mac: None,
                        identity: None,
                        default_route: true,
                    })
                    .collect(),
            })
            .collect();
        HostState {
            underlay_address: self.underlays[host - 1],
            underlay_interface: None,
            networks,
            mesh_address: None,
            protected: Vec::new(),
        }
    }
}
