//! Desired state of one host's overlay: plain data, validated before anything is
//! touched, so a bad state is refused whole instead of half-applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::constants::MAX_VNI;
use crate::error::{Error, Result};
use crate::naming::Mac;
use crate::netns::NetnsRef;

/// Everything the overlay should look like on one host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostState {
    /// This host's address toward its peers: the VXLAN source address.
    pub underlay_address: Ipv4Addr,
    /// Interface holding `underlay_address`; found from the address when absent.
    #[serde(default)]
    pub underlay_interface: Option<String>,
    /// Networks present on this host, each with its peers and local endpoints.
    #[serde(default)]
    pub networks: Vec<NetworkState>,
    /// This host's address on the encrypted mesh (on [`crate::MESH_INTERFACE`]):
    /// the VXLAN source of encrypted networks, whose peers are mesh addresses too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_address: Option<Ipv4Addr>,
    /// Addresses overlay traffic is never forwarded to: the cluster's hosts (their
    /// underlay and mesh addresses) and its store. This host's own addresses need
    /// no entry: nothing from the overlay reaches them but replies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protected: Vec<Ipv4Net>,
}

/// One named network as seen from this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkState {
    #[serde(flatten)]
    pub network: NetworkSpec,
    /// Other hosts on this network; each gets one route, one neighbour and one FDB entry.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Namespaces attached to this network on this host.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// A network's identity and this host's share of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Name users give the network (`app-net`).
    pub name: String,
    /// VXLAN network identifier, unique per network in the cluster (1..=16777215).
    pub vni: u32,
    /// The whole network's subnet, spanning all hosts.
    pub subnet: Ipv4Net,
    /// This host's block of `subnet`; its first address is the gateway, held by the
    /// network's VXLAN device.
    pub block: Ipv4Net,
    /// MTU asked for the network; the underlay's MTU less VXLAN's overhead caps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Carried between hosts inside the WireGuard mesh (VXLAN on port 4790 over the
    /// mesh addresses); plaintext VXLAN for it from the underlay is dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

impl NetworkSpec {
    /// The gateway: first host address of this host's block.
    pub fn gateway(&self) -> Ipv4Addr {
        block_gateway(&self.block)
    }

    /// MTU of the network's devices over `underlay_mtu` (VXLAN overhead already taken).
    pub fn mtu_over(&self, overlay_mtu: u32) -> u32 {
        self.mtu.map_or(overlay_mtu, |m| m.min(overlay_mtu))
    }
}

/// First usable address of a block: the gateway on whichever host owns it.
pub fn block_gateway(block: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(block.network()) + 1)
}

/// Another host holding a block of the network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The peer's node name (for messages only).
    pub name: String,
    /// The peer's underlay address: where VXLAN packets for its block are sent.
    pub underlay: Ipv4Addr,
    /// The peer's block of the network's subnet.
    pub block: Ipv4Net,
}

/// A namespace attached to the network on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Caller's identifier (container id, namespace path); kept on the host veth's alias.
    pub id: String,
    /// The namespace to attach.
    pub netns: NetnsRef,
    /// Address inside this host's block; the prefix is the block's.
    pub address: Ipv4Addr,
    /// MAC of the namespace's interface; derived from the address when absent.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// The namespace's identity (nsfs inode) when it was attached: the namespace is
    /// opened only if it still is that one (a `pid:N` may name another process now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u64>,
    /// Route everything else through the host too, when the namespace has no
    /// default route yet. False where another party owns the default route (Docker
    /// gives a container on a driver network its own egress bridge).
    #[serde(default = "yes")]
    pub default_route: bool,
}

fn yes() -> bool {
    true
}

impl Endpoint {
    pub fn mac(&self) -> Mac {
        self.mac.unwrap_or_else(|| Mac::for_ip(self.address))
    }
}

impl NetworkSpec {
    pub fn validate(&self) -> Result<()> {
        let name = &self.name;
        if name.is_empty() || name.len() > 64 {
            return invalid(format!("network name {name:?} must be 1 to 64 characters"));
        }
        if self.vni == 0 || self.vni > MAX_VNI {
            return invalid(format!(
                "network {name:?}: VNI {} is out of range 1..={MAX_VNI}",
                self.vni
            ));
        }
        if self.subnet != self.subnet.trunc() || self.block != self.block.trunc() {
            return invalid(format!(
                "network {name:?}: subnet {} and block {} must be network addresses (host bits zero)",
                self.subnet, self.block
            ));
        }
        if !self.subnet.contains(&self.block) {
            return invalid(format!(
                "network {name:?}: block {} is not inside subnet {}",
                self.block, self.subnet
            ));
        }
        if self.block.prefix_len() > 30 {
            return invalid(format!(
                "network {name:?}: block {} is too small (at most /30)",
                self.block
            ));
        }
        Ok(())
    }

    /// Checks that `address` may be given to an endpoint of this host.
    pub fn validate_endpoint_address(&self, address: Ipv4Addr) -> Result<()> {
        let b = &self.block;
        if !b.contains(&address)
            || address == b.network()
            || address == b.broadcast()
            || address == self.gateway()
        {
            return invalid(format!(
                "network {:?}: address {address} is not a free host address of this host's block {b} (gateway {})",
                self.name,
                self.gateway()
            ));
        }
        Ok(())
    }
}

impl HostState {
    /// Where a network's VXLAN packets leave from: the mesh address for encrypted
    /// networks, the underlay address for the others.
    pub fn vxlan_source(&self, spec: &NetworkSpec) -> Ipv4Addr {
        match (spec.encrypted, self.mesh_address) {
            (true, Some(mesh)) => mesh,
            _ => self.underlay_address,
        }
    }

    /// Leaves out the networks that cannot be applied beside the ones before them (a
    /// clash in one network's records must not stop the others); returns the rest
    /// and, per network left out, why.
    pub fn without_invalid_networks(mut self) -> (HostState, Vec<(String, Error)>) {
        let mut left_out = Vec::new();
        let candidates = std::mem::take(&mut self.networks);
        for net in candidates {
            self.networks.push(net);
            if let Err(e) = self.validate() {
                let net = self.networks.pop().expect("just pushed");
                left_out.push((net.network.name, e));
            }
        }
        (self, left_out)
    }

    /// Refuses a state that cannot be applied whole: overlapping subnets, duplicate
    /// names, VNIs or addresses, blocks outside their subnet, peers that clash.
    pub fn validate(&self) -> Result<()> {
        let mut names = BTreeSet::new();
        let mut vnis = BTreeSet::new();
        let mut subnets: Vec<(&str, Ipv4Net)> = Vec::new();
        let mut addresses: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for net in &self.networks {
            let spec = &net.network;
            spec.validate()?;
            let name = spec.name.as_str();
            if spec.encrypted && self.mesh_address.is_none() {
                return invalid(format!(
                    "network {name:?} is encrypted but this host has no mesh address"
                ));
            }
            if !names.insert(name) {
                return invalid(format!("network {name:?} appears twice"));
            }
            if !vnis.insert(spec.vni) {
                return invalid(format!("VNI {} is used by two networks", spec.vni));
            }
            if let Some((other, _)) = subnets
                .iter()
                .find(|(_, s)| s.contains(&spec.subnet) || spec.subnet.contains(s))
            {
                return invalid(format!(
                    "network {name:?}: subnet {} overlaps network {other:?}",
                    spec.subnet
                ));
            }
            subnets.push((name, spec.subnet));
            let mut blocks = vec![(String::from("this host"), spec.block)];
            let local = self.vxlan_source(spec);
            let mut underlays = BTreeSet::from([local]);
            for peer in &net.peers {
                if !spec.subnet.contains(&peer.block) || peer.block != peer.block.trunc() {
                    return invalid(format!(
                        "network {name:?}: peer {:?} block {} is not a block of subnet {}",
                        peer.name, peer.block, spec.subnet
                    ));
                }
                if let Some((holder, _)) = blocks
                    .iter()
                    .find(|(_, b)| b.contains(&peer.block) || peer.block.contains(b))
                {
                    return invalid(format!(
                        "network {name:?}: peer {:?} block {} overlaps the block of {holder}",
                        peer.name, peer.block
                    ));
                }
                if !underlays.insert(peer.underlay) {
                    return invalid(format!(
                        "network {name:?}: peer {:?} underlay {} is used twice (or is this host's)",
                        peer.name, peer.underlay
                    ));
                }
                blocks.push((format!("peer {:?}", peer.name), peer.block));
            }
            let mut ids = BTreeSet::new();
            for ep in &net.endpoints {
                spec.validate_endpoint_address(ep.address)?;
                if !ids.insert(ep.id.as_str()) {
                    return invalid(format!(
                        "network {name:?}: endpoint {:?} appears twice",
                        ep.id
                    ));
                }
                if let Some(holder) = addresses.insert(ep.address, &ep.id) {
                    return invalid(format!(
                        "address {} is given to both {holder:?} and {:?}",
                        ep.address, ep.id
                    ));
                }
            }
        }
        Ok(())
    }
}

fn invalid<T>(message: String) -> Result<T> {
    Err(Error::Invalid(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, vni: u32, subnet: &str, block: &str) -> NetworkState {
        NetworkState {
            network: NetworkSpec {
                name: name.into(),
                vni,
                subnet: subnet.parse().unwrap(),
                block: block.parse().unwrap(),
                mtu: None,
                encrypted: false,
            },
            peers: vec![],
            endpoints: vec![],
        }
    }

    fn ep(id: &str, ip: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            netns: NetnsRef::Pid(1),
            address: ip.parse().unwrap(),
            mac: None,
            identity: None,
            default_route: true,
        }
    }

    fn state(networks: Vec<NetworkState>) -> HostState {
        HostState {
            underlay_address: "192.0.2.11".parse().unwrap(),
            underlay_interface: None,
            networks,
            mesh_address: None,
            protected: Vec::new(),
        }
    }

    fn err(s: HostState) -> String {
        s.validate().unwrap_err().to_string()
    }

    #[test]
    fn accepts_a_good_state() {
        let mut a = net("a", 1, "100.64.0.0/16", "100.64.1.0/24");
        a.endpoints.push(ep("c1", "100.64.1.2"));
        a.peers.push(Peer {
            name: "h2".into(),
            underlay: "192.0.2.12".parse().unwrap(),
            block: "100.64.2.0/24".parse().unwrap(),
        });
        let b = net("b", 2, "100.65.0.0/16", "100.65.1.0/24");
        state(vec![a, b]).validate().unwrap();
    }

    #[test]
    fn refuses_overlaps_and_duplicates() {
        let e = err(state(vec![
            net("a", 1, "100.64.0.0/16", "100.64.1.0/24"),
            net("b", 2, "100.64.128.0/17", "100.64.128.0/24"),
        ]));
        assert!(e.contains("overlaps network \"a\""), "{e}");
        let e = err(state(vec![
            net("a", 1, "100.64.0.0/16", "100.64.1.0/24"),
            net("a", 2, "100.65.0.0/16", "100.65.1.0/24"),
        ]));
        assert!(e.contains("appears twice"), "{e}");
        let e = err(state(vec![
            net("a", 7, "100.64.0.0/16", "100.64.1.0/24"),
            net("b", 7, "100.65.0.0/16", "100.65.1.0/24"),
        ]));
        assert!(e.contains("VNI 7"), "{e}");
    }

    #[test]
    fn refuses_bad_addresses() {
        let mut a = net("a", 1, "100.64.0.0/16", "100.64.1.0/24");
        a.endpoints.push(ep("c1", "100.64.2.5"));
        assert!(err(state(vec![a])).contains("not a free host address"));
        let mut a = net("a", 1, "100.64.0.0/16", "100.64.1.0/24");
        a.endpoints.push(ep("c1", "100.64.1.1"));
        assert!(err(state(vec![a])).contains("gateway 100.64.1.1"));
        let mut a = net("a", 1, "100.64.0.0/16", "100.64.1.0/24");
        a.endpoints.push(ep("c1", "100.64.1.5"));
        a.endpoints.push(ep("c2", "100.64.1.5"));
        assert!(err(state(vec![a])).contains("given to both"));
        let e = err(state(vec![net("a", 1, "100.64.0.0/16", "100.65.1.0/24")]));
        assert!(e.contains("not inside subnet"), "{e}");
        let e = err(state(vec![net("a", 0, "100.64.0.0/16", "100.64.1.0/24")]));
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn refuses_clashing_peers() {
        let mut a = net("a", 1, "100.64.0.0/16", "100.64.1.0/24");
        a.peers.push(Peer {
            name: "h2".into(),
            underlay: "192.0.2.11".parse().unwrap(),
            block: "100.64.2.0/24".parse().unwrap(),
        });
        assert!(err(state(vec![a])).contains("used twice"));
        let mut a = net("a", 1, "100.64.0.0/16", "100.64.1.0/24");
        a.peers.push(Peer {
            name: "h2".into(),
            underlay: "192.0.2.12".parse().unwrap(),
            block: "100.64.1.0/25".parse().unwrap(),
        });
        assert!(err(state(vec![a])).contains("overlaps the block of this host"));
    }

    #[test]
    fn one_clashing_network_leaves_the_others_applied() {
        let mut a = net("a", 1, "100.64.0.0/16", "100.64.1.0/24");
        // Two block owners claim one underlay address.
        for (name, block) in [("h2", "100.64.2.0/24"), ("h3", "100.64.3.0/24")] {
            a.peers.push(Peer {
                name: name.into(),
                underlay: "192.0.2.12".parse().unwrap(),
                block: block.parse().unwrap(),
            });
        }
        let b = net("b", 2, "100.65.0.0/16", "100.65.1.0/24");
        let c = net("c", 3, "100.66.0.0/16", "100.66.1.0/24");
        let (kept, left_out) = state(vec![b.clone(), a, c.clone()]).without_invalid_networks();
        assert_eq!(kept.networks, vec![b, c]);
        assert_eq!(left_out.len(), 1);
        assert_eq!(left_out[0].0, "a");
        assert!(
            left_out[0].1.to_string().contains("used twice"),
            "{}",
            left_out[0].1
        );
        kept.validate().unwrap();
    }

    #[test]
    fn parses_toml() {
        let s: HostState = toml_like();
        assert_eq!(
            s.networks[0].endpoints[0].netns,
            NetnsRef::Path("/run/netns/c1".into())
        );
    }

    fn toml_like() -> HostState {
        serde_json::from_str(
            r#"{"underlay_address":"192.0.2.11","networks":[{"name":"a","vni":1,
            "subnet":"100.64.0.0/16","block":"100.64.1.0/24",
            "endpoints":[{"id":"c1","netns":"/run/netns/c1","address":"100.64.1.2"}]}]}"#,
        )
        .unwrap()
    }
}
