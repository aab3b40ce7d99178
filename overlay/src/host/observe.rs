//! Reading back what the kernel holds of ours, as the plan's objects.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::Host;
use crate::constants::{ENCRYPTED_VXLAN_PORT, VXLAN_PORT};
use crate::error::Result;
use crate::naming::{host_veth_address, vxlan_vni};
use crate::netlink::Link;
use crate::plan::Object;

/// What is in the kernel now, as plan objects plus the raw links for lookups.
pub(super) struct Observed {
    pub(super) objects: BTreeSet<Object>,
    pub(super) links: HashMap<String, Link>,
    /// Our host veths that are not complete endpoints (crash mid-attach): removed.
    pub(super) orphans: Vec<Link>,
}

impl Host {
    /// Reads back every object we own in this namespace.
    pub(super) async fn observe(&self) -> Result<Observed> {
        let links: HashMap<String, Link> = self
            .nl
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        let addresses = self.nl.addresses().await?;
        let routes = self.nl.routes(true).await?;
        let neighbours = self.nl.permanent_neighbours().await?;
        let fdb = self.nl.vxlan_fdb().await?;
        let mut objects = BTreeSet::new();
        let mut orphans = Vec::new();
        for link in links.values() {
            if let (Some(vni), Some(vx)) = (vxlan_vni(&link.name), &link.vxlan) {
                let sound = vx.vni == vni
                    && (vx.port == VXLAN_PORT || vx.port == ENCRYPTED_VXLAN_PORT)
                    && !vx.learning
                    && link.group == vni;
                let local = vx.local.filter(|_| sound).unwrap_or(Ipv4Addr::UNSPECIFIED);
                objects.insert(Object::Vxlan { vni, local });
                for (_, address) in addresses.iter().filter(|(i, _)| *i == link.index) {
                    objects.insert(Object::Gateway {
                        vni,
                        address: *address,
                    });
                }
                for (_, mac, underlay) in fdb.iter().filter(|(i, ..)| *i == link.index) {
                    objects.insert(Object::PeerFdb {
                        vni,
                        mac: *mac,
                        underlay: *underlay,
                    });
                }
                for (_, ip, mac) in neighbours.iter().filter(|(i, ..)| *i == link.index) {
                    objects.insert(Object::PeerNeighbour {
                        vni,
                        ip: *ip,
                        mac: *mac,
                    });
                }
                for r in routes.iter().filter(|r| r.oif == Some(link.index)) {
                    objects.insert(Object::PeerRoute {
                        vni,
                        block: r.destination,
                    });
                }
            } else if let Some(address) = host_veth_address(&link.name) {
                // Complete = tagged with its id (the last attach step), up, in a network's
                // group, and routed; anything less is a leftover of an interrupted attach.
                let routed = routes
                    .iter()
                    .any(|r| r.oif == Some(link.index) && r.destination == Ipv4Net::from(address));
                match (&link.alias, link.up && routed && link.group != 0) {
                    (Some(id), true) => {
                        objects.insert(Object::Endpoint {
                            vni: link.group,
                            address,
                            id: id.clone(),
                        });
                    }
                    _ => orphans.push(link.clone()),
                }
            }
        }
        Ok(Observed {
            objects,
            links,
            orphans,
        })
    }
}
