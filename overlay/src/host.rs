//! One host's overlay, driven by intent: `apply` a whole desired state, or attach
//! and detach one endpoint (`attach`). Everything is idempotent and adopts what an
//! earlier process left. Reading the kernel back is `observe`'s, removing all of
//! ours `reset`'s.

mod observe;
mod reset;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tracing::{debug, info};

use crate::constants::{
    ENCRYPTED_VXLAN_PORT, MAX_MESH_MTU, MESH_INTERFACE, VXLAN_OVERHEAD, VXLAN_PORT,
    WIREGUARD_OVERHEAD,
};
use crate::error::{Error, Result};
use crate::firewall::{self, FirewallSpec, LastApplied};
use crate::firewall_guard::{self, FirewallGuard};
use crate::naming::{vxlan_name, Mac};
use crate::netlink::{Link, Netlink, Route};
use crate::netns::{Netns, NetnsRef};
use crate::plan::{desired_objects, plan, Object};
use crate::spec::{HostState, NetworkSpec, NetworkState};
use crate::wireguard::{KeyPair, Mesh, MeshOptions, OnFailure};

fn vxlan_port(spec: &NetworkSpec) -> u16 {
    if spec.encrypted {
        ENCRYPTED_VXLAN_PORT
    } else {
        VXLAN_PORT
    }
}

/// What an `apply` changed; empty when the kernel already matched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub created: Vec<String>,
    pub removed: Vec<String>,
    pub adjusted: Vec<String>,
    pub firewall_changed: bool,
}

impl ApplyReport {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty()
            && self.removed.is_empty()
            && self.adjusted.is_empty()
            && !self.firewall_changed
    }
}

/// The underlay interface VXLAN rides on.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub address: Ipv4Addr,
    pub index: u32,
    pub name: String,
    pub mtu: u32,
}

impl Underlay {
    /// MTU of every overlay device: the underlay's minus VXLAN's overhead.
    pub fn overlay_mtu(&self) -> u32 {
        self.mtu.saturating_sub(VXLAN_OVERHEAD)
    }
}

/// A host's network namespace with a netlink socket inside it.
pub struct Host {
    pub(crate) ns: Netns,
    pub(crate) nl: Netlink,
    /// The firewall table as last applied, for [`Host::guard_firewall`].
    firewall: Arc<LastApplied>,
}

impl Host {
    pub async fn open(reference: &NetnsRef) -> Result<Self> {
        let ns = Netns::open(reference)?;
        let nl = Netlink::new(ns.netlink().await?, ns.to_string());
        Ok(Self {
            ns,
            nl,
            firewall: Arc::default(),
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Finds the underlay interface by name, or by the address it holds.
    pub async fn underlay(&self, address: Ipv4Addr, interface: Option<&str>) -> Result<Underlay> {
        let not_found = || Error::NoUnderlay {
            address,
            ns: self.ns.to_string(),
        };
        let links = self.nl.links().await?;
        let link = match interface {
            Some(name) => links.into_iter().find(|l| l.name == name),
            None => {
                let addresses = self.nl.addresses().await?;
                let index = addresses
                    .iter()
                    .find(|(_, a)| a.addr() == address)
                    .map(|(i, _)| *i);
                links.into_iter().find(|l| Some(l.index) == index)
            }
        }
        .ok_or_else(not_found)?;
        Ok(Underlay {
            address,
            index: link.index,
            name: link.name,
            mtu: link.mtu,
        })
    }

    /// Makes the kernel match `state`: creates what is missing, removes what is ours
    /// and no longer wanted, leaves everything else untouched. Work that can proceed
    /// does; every failure is reported together at the end.
    pub async fn apply(&self, state: &HostState) -> Result<ApplyReport> {
        state.validate()?;
        let underlay = self
            .underlay(state.underlay_address, state.underlay_interface.as_deref())
            .await?;
        // Encrypted networks hang off the mesh device instead.
        let mesh = match state.mesh_address {
            Some(a) if state.networks.iter().any(|n| n.network.encrypted) => {
                Some(self.underlay(a, Some(MESH_INTERFACE)).await?)
            }
            _ => None,
        };
        let via = |spec: &NetworkSpec| match (&mesh, spec.encrypted) {
            (Some(m), true) => m,
            _ => &underlay,
        };
        self.ns.write_sysctl("net.ipv4.ip_forward", "1").await?;
        let mut observed = self.observe().await?;
        let plan = plan(&desired_objects(state), &observed.objects);
        let mut report = ApplyReport::default();
        let mut errors = Vec::new();
        for object in &plan.remove {
            match self.remove_object(object, &observed.links).await {
                Ok(()) => report.removed.push(format!("{object:?}")),
                Err(e) => errors.push(e),
            }
        }
        for orphan in &observed.orphans {
            match self.nl.delete_link(orphan.index, &orphan.name).await {
                Ok(()) => report.removed.push(format!("orphan veth {}", orphan.name)),
                Err(e) => errors.push(e),
            }
        }
        let networks: HashMap<u32, &NetworkState> =
            state.networks.iter().map(|n| (n.network.vni, n)).collect();
        for object in &plan.create {
            let net = networks[&object.vni()];
            match self
                .create_object(object, net, via(&net.network), &mut observed.links)
                .await
            {
                Ok(()) => report.created.push(format!("{object:?}")),
                Err(e) => errors.push(e),
            }
        }
        for net in &state.networks {
            let mtu = net.network.mtu_over(via(&net.network).overlay_mtu());
            let name = vxlan_name(net.network.vni);
            if let Some(link) = observed.links.get(&name).filter(|l| l.mtu != mtu) {
                self.nl.set_mtu(link.index, &name, mtu).await?;
                report
                    .adjusted
                    .push(format!("{name} mtu {} -> {mtu}", link.mtu));
            }
        }
        report.firewall_changed =
            firewall::sync(&self.ns, &FirewallSpec::of(state), &self.firewall).await?;
        if !report.is_empty() {
            info!(ns = %self.ns, created = report.created.len(), removed = report.removed.len(),
                  firewall = report.firewall_changed, "overlay applied");
        }
        Error::collect(errors)?;
        Ok(report)
    }

    async fn create_object(
        &self,
        object: &Object,
        net: &NetworkState,
        underlay: &Underlay,
        links: &mut HashMap<String, Link>,
    ) -> Result<()> {
        let spec = &net.network;
        let mtu = spec.mtu_over(underlay.overlay_mtu());
        let vx_name = vxlan_name(spec.vni);
        debug!(ns = %self.ns, ?object, "create");
        match object {
            Object::Vxlan { vni, local } => {
                if let Some(old) = links.remove(&vx_name) {
                    // A device with the wrong identity was planned for removal; make sure.
                    self.nl.delete_link(old.index, &vx_name).await?;
                }
                let mac = Mac::for_vtep(*vni, *local);
                self.nl
                    .create_vxlan(
                        &vx_name,
                        *vni,
                        *local,
                        underlay.index,
                        mac,
                        mtu,
                        vxlan_port(spec),
                        // Over the mesh, WireGuard authenticates every byte; without
                        // a UDP checksum the kernel hands the mesh whole TCP bursts
                        // inside VXLAN (its TAP offers tunnel GSO without checksum).
                        !spec.encrypted,
                    )
                    .await?;
                // The firewall filters IPv4 only: no IPv6 from the overlay at all.
                self.ns
                    .write_sysctl(&format!("net.ipv6.conf.{vx_name}.disable_ipv6"), "1")
                    .await?;
                if let Some(l) = self.nl.link(&vx_name).await? {
                    links.insert(vx_name, l);
                }
            }
            Object::Gateway { address, .. } => {
                let vx = index_of(links, &vx_name)?;
                self.nl.add_address(vx, &vx_name, *address).await?;
            }
            Object::PeerFdb { mac, underlay, .. } => {
                let vx = index_of(links, &vx_name)?;
                self.nl.replace_fdb(vx, *mac, *underlay).await?;
            }
            Object::PeerNeighbour { ip, mac, .. } => {
                let vx = index_of(links, &vx_name)?;
                self.nl.replace_neighbour(vx, *ip, *mac).await?;
            }
            Object::PeerRoute { block, .. } => {
                let vx = index_of(links, &vx_name)?;
                self.nl
                    .replace_route(*block, block.network(), vx, true)
                    .await?;
            }
            Object::Endpoint { address, .. } => {
                let ep = net
                    .endpoints
                    .iter()
                    .find(|e| e.address == *address)
                    .expect("planned endpoints come from the state");
                self.attach_to(spec, ep, mtu).await?;
            }
        }
        Ok(())
    }

    async fn remove_object(&self, object: &Object, links: &HashMap<String, Link>) -> Result<()> {
        debug!(ns = %self.ns, ?object, "remove");
        if let Object::Endpoint { address, .. } = object {
            return self.detach(*address).await;
        }
        let name = vxlan_name(object.vni());
        // Everything else lives on the VXLAN device; gone with it if it is gone.
        let Some(vx) = links.get(&name).map(|l| l.index) else {
            return Ok(());
        };
        match object {
            Object::Vxlan { .. } => self.nl.delete_link(vx, &name).await,
            Object::Gateway { address, .. } => self.nl.delete_address(vx, &name, *address).await,
            Object::PeerFdb { mac, underlay, .. } => self.nl.delete_fdb(vx, *mac, *underlay).await,
            Object::PeerNeighbour { ip, .. } => self.nl.delete_neighbour(vx, *ip).await,
            Object::PeerRoute { block, .. } => {
                let route = Route {
                    destination: *block,
                    gateway: Some(block.network()),
                    oif: Some(vx),
                };
                self.nl.delete_route(&route).await
            }
            Object::Endpoint { .. } => unreachable!("handled above"),
        }
    }

    /// Starts the encrypted mesh here: the device with `address/prefix`, its MTU the
    /// underlay's less WireGuard's overhead, no ARP (every peer is reached through the
    /// datapath, which reads frames addressed to the device itself), and the datapath
    /// threads.
    pub async fn start_mesh(
        &self,
        keys: KeyPair,
        underlay: &Underlay,
        address: Ipv4Addr,
        prefix: u8,
        options: MeshOptions,
        on_failure: OnFailure,
    ) -> Result<Mesh> {
        let mtu = underlay
            .mtu
            .saturating_sub(WIREGUARD_OVERHEAD)
            .min(MAX_MESH_MTU);
        let listen = std::net::SocketAddrV4::new(underlay.address, options.listen_port);
        let mesh = Mesh::start(
            &self.ns,
            keys,
            address,
            listen,
            options.tunnel_offload,
            on_failure,
        )
        .await?;
        let link = self
            .nl
            .link(MESH_INTERFACE)
            .await?
            .ok_or_else(|| Error::Mesh {
                message: format!("{MESH_INTERFACE} vanished after creation"),
            })?;
        let net = Ipv4Net::new(address, prefix).map_err(|e| Error::Mesh {
            message: e.to_string(),
        })?;
        self.nl.set_mtu(link.index, MESH_INTERFACE, mtu).await?;
        self.nl.set_noarp(link.index, MESH_INTERFACE).await?;
        self.nl.add_address(link.index, MESH_INTERFACE, net).await?;
        self.nl.set_up(link.index, MESH_INTERFACE).await?;
        Ok(mesh)
    }

    /// Keeps the firewall table that `apply` put here in place: another program
    /// that deletes or changes it (a firewall reload flushing the ruleset) has it
    /// restored within 100 ms. Runs until the returned guard is dropped.
    pub async fn guard_firewall(&self) -> Result<FirewallGuard> {
        firewall_guard::start(&self.ns, self.firewall.clone()).await
    }

    /// Lets overlay traffic through the FORWARD chain of a dockerd on this host (whose
    /// policy is DROP); nothing to do where no dockerd manages iptables.
    pub async fn open_docker_forward(&self) -> Result<firewall::DockerForward> {
        firewall::open_docker_forward(&self.ns).await
    }
}

fn index_of(links: &HashMap<String, Link>, name: &str) -> Result<u32> {
    links
        .get(name)
        .map(|l| l.index)
        .ok_or_else(|| Error::Worker(format!("{name} is missing after creation")))
}
