//! The pure half of reconciliation: desired state and observed kernel state as sets
//! of plain objects, and the plan between them. No I/O, so it is tested without root.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::naming::Mac;
use crate::spec::{HostState, NetworkState};

/// A kernel object the overlay owns. The derived order is the creation order
/// (devices before what hangs on them); removal runs in reverse.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    /// The network's VXLAN device (`nax<vni>`); its identity fixes VNI and source.
    Vxlan { vni: u32, local: Ipv4Addr },
    /// The gateway address (a /32) on the VXLAN device: what containers route via.
    Gateway { vni: u32, address: Ipv4Net },
    /// FDB entry: a peer's VTEP MAC lives at the peer's underlay address.
    PeerFdb {
        vni: u32,
        mac: Mac,
        underlay: Ipv4Addr,
    },
    /// Neighbour: the peer block's network address resolves to the peer's VTEP MAC.
    PeerNeighbour { vni: u32, ip: Ipv4Addr, mac: Mac },
    /// Route: the peer's block via its network address on the VXLAN device (onlink).
    PeerRoute { vni: u32, block: Ipv4Net },
    /// An attached namespace: host veth `nav<ip>` in the network's interface group,
    /// tagged with the id, with a /32 route and a permanent neighbour entry.
    Endpoint {
        vni: u32,
        address: Ipv4Addr,
        id: String,
    },
}

impl Object {
    pub fn vni(&self) -> u32 {
        match self {
            Object::Vxlan { vni, .. }
            | Object::Gateway { vni, .. }
            | Object::PeerFdb { vni, .. }
            | Object::PeerNeighbour { vni, .. }
            | Object::PeerRoute { vni, .. }
            | Object::Endpoint { vni, .. } => *vni,
        }
    }

    /// True for objects that live on (and die with) the network's VXLAN device.
    /// Endpoints do not: their veths are independent devices, removed explicitly.
    fn on_vxlan(&self) -> bool {
        matches!(
            self,
            Object::Gateway { .. }
                | Object::PeerFdb { .. }
                | Object::PeerNeighbour { .. }
                | Object::PeerRoute { .. }
        )
    }
}

/// Objects that the desired state implies on this host.
pub fn desired_objects(state: &HostState) -> BTreeSet<Object> {
    let mut out = BTreeSet::new();
    for net in &state.networks {
        network_objects(state.vxlan_source(&net.network), net, &mut out);
    }
    out
}

fn network_objects(local: Ipv4Addr, net: &NetworkState, out: &mut BTreeSet<Object>) {
    let spec = &net.network;
    let vni = spec.vni;
    out.insert(Object::Vxlan { vni, local });
    out.insert(Object::Gateway {
        vni,
        address: Ipv4Net::new(spec.gateway(), 32).expect("valid prefix"),
    });
    for peer in &net.peers {
        let mac = Mac::for_vtep(vni, peer.underlay);
        out.insert(Object::PeerFdb {
            vni,
            mac,
            underlay: peer.underlay,
        });
        out.insert(Object::PeerNeighbour {
            vni,
            ip: peer.block.network(),
            mac,
        });
        out.insert(Object::PeerRoute {
            vni,
            block: peer.block,
        });
    }
    for ep in &net.endpoints {
        out.insert(Object::Endpoint {
            vni,
            address: ep.address,
            id: ep.id.clone(),
        });
    }
}

/// What to do: remove first (in this order), then create (in this order).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove: Vec<Object>,
    pub create: Vec<Object>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.create.is_empty()
    }
}

/// The plan that turns `observed` into `desired`. Objects on a device that is being
/// removed count as gone, so they are recreated on the new device when still desired.
pub fn plan(desired: &BTreeSet<Object>, observed: &BTreeSet<Object>) -> Plan {
    let removed: BTreeSet<&Object> = observed.difference(desired).collect();
    let dying_vxlan = |vni| {
        removed
            .iter()
            .any(|o| matches!(o, Object::Vxlan { vni: v, .. } if *v == vni))
    };
    let survives = |o: &Object| !(o.on_vxlan() && dying_vxlan(o.vni()));
    let still_there: BTreeSet<&Object> = observed.iter().filter(|o| survives(o)).collect();
    Plan {
        // Children of a dying device go with it; removing them first is wasted work.
        remove: removed
            .iter()
            .rev()
            .filter(|o| survives(o))
            .map(|o| (*o).clone())
            .collect(),
        create: desired
            .iter()
            .filter(|o| !still_there.contains(o))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NetnsRef;
    use crate::spec::{Endpoint, NetworkSpec, Peer};

    fn state(peers: &[(u8, &str)], endpoints: &[&str]) -> HostState {
        HostState {
            underlay_address: "192.0.2.11".parse().unwrap(),
            underlay_interface: None,
            mesh_address: None,
            protected: Vec::new(),
            networks: vec![NetworkState {
                network: NetworkSpec {
                    name: "a".into(),
                    vni: 10,
                    subnet: "100.64.0.0/16".parse().unwrap(),
                    block: "100.64.1.0/24".parse().unwrap(),
                    mtu: None,
                    encrypted: false,
                },
                peers: peers
                    .iter()
                    .map(|(h, block)| Peer {
                        name: format!("h{h}"),
                        underlay: Ipv4Addr::new(192, 0, 2, 10 + h),
                        block: block.parse().unwrap(),
                    })
                    .collect(),
                endpoints: endpoints
                    .iter()
                    .map(|ip| Endpoint {
                        id: format!("c-{ip}"),
                        netns: NetnsRef::Pid(1),
                        address: ip.parse().unwrap(),
                        mac: None,
                        identity: None,
                        default_route: true,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn kernel_objects_grow_with_hosts_not_endpoints() {
        let few = desired_objects(&state(&[(2, "100.64.2.0/24")], &["100.64.1.2"]));
        let many_eps: Vec<String> = (2..200).map(|i| format!("100.64.1.{i}")).collect();
        let refs: Vec<&str> = many_eps.iter().map(String::as_str).collect();
        let many = desired_objects(&state(&[(2, "100.64.2.0/24")], &refs));
        let per_peer = |s: &BTreeSet<Object>| {
            s.iter()
                .filter(|o| {
                    matches!(
                        o,
                        Object::PeerFdb { .. }
                            | Object::PeerNeighbour { .. }
                            | Object::PeerRoute { .. }
                    )
                })
                .count()
        };
        assert_eq!(per_peer(&few), 3);
        assert_eq!(
            per_peer(&many),
            3,
            "one route, one neighbour, one FDB entry per remote host"
        );
    }

    #[test]
    fn same_state_plans_nothing() {
        let s = desired_objects(&state(&[(2, "100.64.2.0/24")], &["100.64.1.2"]));
        assert!(plan(&s, &s).is_empty());
    }

    #[test]
    fn removes_exactly_what_left() {
        let before = desired_objects(&state(
            &[(2, "100.64.2.0/24"), (3, "100.64.3.0/24")],
            &["100.64.1.2", "100.64.1.3"],
        ));
        let after = desired_objects(&state(&[(2, "100.64.2.0/24")], &["100.64.1.2"]));
        let p = plan(&after, &before);
        assert!(p.create.is_empty());
        let mac3 = Mac::for_vtep(10, "192.0.2.13".parse().unwrap());
        assert_eq!(
            p.remove,
            vec![
                Object::Endpoint {
                    vni: 10,
                    address: "100.64.1.3".parse().unwrap(),
                    id: "c-100.64.1.3".into()
                },
                Object::PeerRoute {
                    vni: 10,
                    block: "100.64.3.0/24".parse().unwrap()
                },
                Object::PeerNeighbour {
                    vni: 10,
                    ip: "100.64.3.0".parse().unwrap(),
                    mac: mac3
                },
                Object::PeerFdb {
                    vni: 10,
                    mac: mac3,
                    underlay: "192.0.2.13".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn creates_devices_before_their_contents() {
        let s = desired_objects(&state(&[(2, "100.64.2.0/24")], &["100.64.1.2"]));
        let p = plan(&s, &BTreeSet::new());
        assert!(matches!(p.create[0], Object::Vxlan { .. }));
        assert!(matches!(p.create[1], Object::Gateway { .. }));
        assert!(matches!(p.create.last().unwrap(), Object::Endpoint { .. }));
    }

    #[test]
    fn a_replaced_vxlan_gets_its_peers_again() {
        let desired = desired_objects(&state(&[(2, "100.64.2.0/24")], &[]));
        let mut observed = desired.clone();
        observed.remove(&Object::Vxlan {
            vni: 10,
            local: "192.0.2.11".parse().unwrap(),
        });
        observed.insert(Object::Vxlan {
            vni: 10,
            local: "192.0.2.99".parse().unwrap(),
        });
        let p = plan(&desired, &observed);
        assert_eq!(
            p.remove,
            vec![Object::Vxlan {
                vni: 10,
                local: "192.0.2.99".parse().unwrap()
            }]
        );
        assert_eq!(
            p.create.len(),
            5,
            "vxlan + gateway + fdb + neighbour + route: {:?}",
            p.create
        );
    }

    #[test]
    fn a_removed_network_goes_with_its_devices() {
        let observed = desired_objects(&state(&[(2, "100.64.2.0/24")], &["100.64.1.2"]));
        let p = plan(&BTreeSet::new(), &observed);
        assert_eq!(
            p.remove,
            vec![
                Object::Endpoint {
                    vni: 10,
                    address: "100.64.1.2".parse().unwrap(),
                    id: "c-100.64.1.2".into()
                },
                Object::Vxlan {
                    vni: 10,
                    local: "192.0.2.11".parse().unwrap()
                },
            ]
        );
    }
}
