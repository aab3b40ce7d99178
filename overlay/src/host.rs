//! One host's overlay, driven by intent: `apply` a whole desired state, or the single
//! operations it is made of (`ensure_network`, `set_peers`, `attach`, `detach`,
//! `remove_network`). Everything is idempotent and adopts what an earlier process left.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::firewall;
use crate::naming::{bridge_name, host_veth_address, host_veth_name, vxlan_name, Mac};
use crate::netlink::{Link, Netlink};
use crate::netns::{Netns, NetnsRef};
use crate::plan::{desired_objects, plan, Object};
use crate::spec::{block_gateway, Endpoint, HostState, NetworkSpec, NetworkState, Peer};

/// VXLAN over IPv4 adds 50 bytes (outer IP 20, UDP 8, VXLAN 8, inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

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

/// What is in the kernel now, as plan objects plus the raw links for lookups.
struct Observed {
    objects: BTreeSet<Object>,
    links: HashMap<String, Link>,
    /// Our host veths that are not complete endpoints (crash mid-attach): removed.
    orphans: Vec<Link>,
}

/// A host's network namespace with a netlink socket inside it.
pub struct Host {
    ns: Netns,
    nl: Netlink,
}

impl Host {
    pub async fn open(reference: &NetnsRef) -> Result<Self> {
        let ns = Netns::open(reference)?;
        let nl = Netlink::new(ns.netlink().await?, ns.to_string());
        Ok(Self { ns, nl })
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
        let link = match interface {
            Some(name) => self.nl.link(name).await?.ok_or_else(not_found)?,
            None => {
                let index = self
                    .nl
                    .addresses()
                    .await?
                    .into_iter()
                    .find(|(_, a)| a.addr() == address)
                    .map(|(i, _)| i)
                    .ok_or_else(not_found)?;
                self.nl
                    .links()
                    .await?
                    .into_iter()
                    .find(|l| l.index == index)
                    .ok_or_else(not_found)?
            }
        };
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
                .create_object(object, net, &underlay, &mut observed.links)
                .await
            {
                Ok(()) => report.created.push(format!("{object:?}")),
                Err(e) => errors.push(e),
            }
        }
        let mtu = underlay.overlay_mtu();
        for net in &state.networks {
            for name in [bridge_name(net.network.vni), vxlan_name(net.network.vni)] {
                let Some(link) = self.nl.link(&name).await? else {
                    continue;
                };
                if link.mtu != mtu {
                    self.nl.set_mtu(link.index, &name, mtu).await?;
                    report
                        .adjusted
                        .push(format!("{name} mtu {} -> {mtu}", link.mtu));
                }
            }
        }
        let specs: Vec<NetworkSpec> = state.networks.iter().map(|n| n.network.clone()).collect();
        report.firewall_changed = firewall::sync(&self.ns, &specs).await?;
        if !report.is_empty() {
            info!(ns = %self.ns, created = report.created.len(), removed = report.removed.len(),
                  firewall = report.firewall_changed, "overlay applied");
        }
        Error::collect(errors)?;
        Ok(report)
    }

    /// Reads back every object we own in this namespace.
    async fn observe(&self) -> Result<Observed> {
        let links: HashMap<String, Link> = self
            .nl
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        let by_index: HashMap<u32, &Link> = links.values().map(|l| (l.index, l)).collect();
        let addresses = self.nl.addresses().await?;
        let routes = self.nl.routes(true).await?;
        let mut objects = BTreeSet::new();
        let mut orphans = Vec::new();
        for link in links.values() {
            let kind = link.kind.as_deref();
            if let (Some(vni), Some("bridge")) = (vni_of(&link.name, "nab"), kind) {
                objects.insert(Object::Bridge { vni });
                for (_, address) in addresses.iter().filter(|(i, _)| *i == link.index) {
                    objects.insert(Object::Gateway {
                        vni,
                        address: *address,
                    });
                }
            } else if let (Some(vni), Some(vx)) = (vni_of(&link.name, "nax"), &link.vxlan) {
                let sound = vx.vni == vni && vx.port == 4789 && !vx.learning;
                let local = vx.local.filter(|_| sound).unwrap_or(Ipv4Addr::UNSPECIFIED);
                objects.insert(Object::Vxlan { vni, local });
                for (mac, underlay) in self.nl.vxlan_fdb(link.index).await? {
                    objects.insert(Object::PeerFdb { vni, mac, underlay });
                }
                for (ip, mac) in self.nl.permanent_neighbours(link.index).await? {
                    objects.insert(Object::PeerNeighbour { vni, ip, mac });
                }
                for r in routes.iter().filter(|r| r.oif == Some(link.index)) {
                    objects.insert(Object::PeerRoute {
                        vni,
                        block: r.destination,
                    });
                }
            } else if let Some(address) = host_veth_address(&link.name) {
                let bridge = link.controller.and_then(|c| by_index.get(&c));
                let vni = bridge.and_then(|b| vni_of(&b.name, "nab"));
                match (vni, &link.alias, link.up) {
                    (Some(vni), Some(id), true) => {
                        objects.insert(Object::Endpoint {
                            vni,
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

    async fn create_object(
        &self,
        object: &Object,
        net: &NetworkState,
        underlay: &Underlay,
        links: &mut HashMap<String, Link>,
    ) -> Result<()> {
        let spec = &net.network;
        let mtu = underlay.overlay_mtu();
        let vni = spec.vni;
        debug!(ns = %self.ns, ?object, "create");
        match object {
            Object::Bridge { vni } => {
                let name = bridge_name(*vni);
                self.nl
                    .create_bridge(&name, Mac::for_ip(spec.gateway()), mtu)
                    .await?;
                self.refresh(&name, links).await?;
            }
            Object::Vxlan { vni, local } => {
                let name = vxlan_name(*vni);
                if let Some(old) = links.get(&name) {
                    // A device with the wrong identity was planned for removal; make sure.
                    self.nl.delete_link(old.index, &name).await?;
                }
                self.nl
                    .create_vxlan(
                        &name,
                        *vni,
                        *local,
                        underlay.index,
                        Mac::for_vtep(*vni, *local),
                        mtu,
                    )
                    .await?;
                self.refresh(&name, links).await?;
            }
            Object::Gateway { address, .. } => {
                let br = index_of(links, &bridge_name(vni))?;
                self.nl.add_address(br, &bridge_name(vni), *address).await?;
            }
            Object::PeerFdb { mac, underlay, .. } => {
                let vx = index_of(links, &vxlan_name(vni))?;
                self.nl.replace_fdb(vx, *mac, *underlay).await?;
            }
            Object::PeerNeighbour { ip, mac, .. } => {
                let vx = index_of(links, &vxlan_name(vni))?;
                self.nl.replace_neighbour(vx, *ip, *mac).await?;
            }
            Object::PeerRoute { block, .. } => {
                let vx = index_of(links, &vxlan_name(vni))?;
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
                let br =
                    links
                        .get(&bridge_name(vni))
                        .cloned()
                        .ok_or_else(|| Error::UnknownNetwork {
                            network: spec.name.clone(),
                            vni,
                        })?;
                self.attach_to(spec, ep, &br, mtu).await?;
            }
        }
        Ok(())
    }

    async fn remove_object(&self, object: &Object, links: &HashMap<String, Link>) -> Result<()> {
        debug!(ns = %self.ns, ?object, "remove");
        let vni = object.vni();
        let link = |name: String| links.get(&name).map(|l| (l.index, name));
        match object {
            Object::Bridge { .. } => {
                if let Some((i, n)) = link(bridge_name(vni)) {
                    self.nl.delete_link(i, &n).await?;
                }
            }
            Object::Vxlan { .. } => {
                if let Some((i, n)) = link(vxlan_name(vni)) {
                    self.nl.delete_link(i, &n).await?;
                }
            }
            Object::Gateway { address, .. } => {
                if let Some((i, n)) = link(bridge_name(vni)) {
                    self.nl.delete_address(i, &n, *address).await?;
                }
            }
            Object::PeerFdb { mac, underlay, .. } => {
                if let Some((i, _)) = link(vxlan_name(vni)) {
                    self.nl.delete_fdb(i, *mac, *underlay).await?;
                }
            }
            Object::PeerNeighbour { ip, .. } => {
                if let Some((i, _)) = link(vxlan_name(vni)) {
                    self.nl.delete_neighbour(i, *ip).await?;
                }
            }
            Object::PeerRoute { block, .. } => {
                if let Some((i, _)) = link(vxlan_name(vni)) {
                    let route = crate::netlink::Route {
                        destination: *block,
                        gateway: Some(block.network()),
                        oif: Some(i),
                    };
                    self.nl.delete_route(&route).await?;
                }
            }
            Object::Endpoint { address, .. } => self.detach_address(vni, *address).await?,
        }
        Ok(())
    }

    async fn refresh(&self, name: &str, links: &mut HashMap<String, Link>) -> Result<()> {
        if let Some(l) = self.nl.link(name).await? {
            links.insert(name.to_string(), l);
        }
        Ok(())
    }

    // ---- single intent operations ----

    /// Bridge, gateway and VXLAN device of one network (no peers, no endpoints).
    pub async fn ensure_network(&self, underlay: &Underlay, spec: &NetworkSpec) -> Result<()> {
        spec.validate()?;
        self.ns.write_sysctl("net.ipv4.ip_forward", "1").await?;
        let net = NetworkState {
            network: spec.clone(),
            peers: vec![],
            endpoints: vec![],
        };
        let mut observed = self.observe().await?;
        let wanted = desired_objects(&HostState {
            underlay_address: underlay.address,
            underlay_interface: None,
            networks: vec![net.clone()],
        });
        let mine: BTreeSet<Object> = observed
            .objects
            .iter()
            .filter(|o| {
                o.vni() == spec.vni
                    && matches!(
                        o,
                        Object::Bridge { .. } | Object::Vxlan { .. } | Object::Gateway { .. }
                    )
            })
            .cloned()
            .collect();
        let p = plan(&wanted, &mine);
        for o in &p.remove {
            self.remove_object(o, &observed.links).await?;
        }
        for o in &p.create {
            self.create_object(o, &net, underlay, &mut observed.links)
                .await?;
        }
        Ok(())
    }

    /// Programs exactly `peers` for a network: one route, neighbour and FDB entry each.
    pub async fn set_peers(
        &self,
        underlay: &Underlay,
        spec: &NetworkSpec,
        peers: &[Peer],
    ) -> Result<()> {
        let net = NetworkState {
            network: spec.clone(),
            peers: peers.to_vec(),
            endpoints: vec![],
        };
        let mut observed = self.observe().await?;
        let wanted: BTreeSet<Object> = desired_objects(&HostState {
            underlay_address: underlay.address,
            underlay_interface: None,
            networks: vec![net.clone()],
        })
        .into_iter()
        .filter(|o| {
            matches!(
                o,
                Object::PeerFdb { .. } | Object::PeerNeighbour { .. } | Object::PeerRoute { .. }
            )
        })
        .collect();
        let mine: BTreeSet<Object> = observed
            .objects
            .iter()
            .filter(|o| o.vni() == spec.vni && wanted_kind_peer(o))
            .cloned()
            .collect();
        let p = plan(&wanted, &mine);
        for o in &p.remove {
            self.remove_object(o, &observed.links).await?;
        }
        for o in &p.create {
            self.create_object(o, &net, underlay, &mut observed.links)
                .await?;
        }
        Ok(())
    }

    /// Attaches a namespace to a network already ensured on this host.
    pub async fn attach(
        &self,
        underlay: &Underlay,
        spec: &NetworkSpec,
        ep: &Endpoint,
    ) -> Result<()> {
        spec.validate_endpoint_address(ep.address)?;
        let bridge =
            self.nl
                .link(&bridge_name(spec.vni))
                .await?
                .ok_or_else(|| Error::UnknownNetwork {
                    network: spec.name.clone(),
                    vni: spec.vni,
                })?;
        self.attach_to(spec, ep, &bridge, underlay.overlay_mtu())
            .await
    }

    /// Detaches the endpoint holding `address` (nothing to do when it is not there).
    pub async fn detach(&self, spec: &NetworkSpec, address: Ipv4Addr) -> Result<()> {
        self.detach_address(spec.vni, address).await
    }

    /// Removes a network's endpoints, devices and everything on them.
    pub async fn remove_network(&self, vni: u32) -> Result<()> {
        let observed = self.observe().await?;
        let mut errors = Vec::new();
        for o in observed.objects.iter().rev().filter(|o| o.vni() == vni) {
            if matches!(
                o,
                Object::Endpoint { .. } | Object::Vxlan { .. } | Object::Bridge { .. }
            ) {
                if let Err(e) = self.remove_object(o, &observed.links).await {
                    errors.push(e);
                }
            }
        }
        Error::collect(errors)
    }

    /// Removes every object and rule we own here (uninstall, tests).
    pub async fn reset(&self) -> Result<()> {
        let observed = self.observe().await?;
        let mut errors = Vec::new();
        for link in observed.links.values().filter(|l| {
            vni_of(&l.name, "nab").is_some()
                || vni_of(&l.name, "nax").is_some()
                || host_veth_address(&l.name).is_some()
        }) {
            if let Err(e) = self.nl.delete_link(link.index, &link.name).await {
                errors.push(e);
            }
        }
        if let Err(e) = firewall::remove(&self.ns).await {
            errors.push(e);
        }
        Error::collect(errors)
    }

    async fn detach_address(&self, vni: u32, address: Ipv4Addr) -> Result<()> {
        let name = host_veth_name(address);
        if let Some(link) = self.nl.link(&name).await? {
            self.nl.delete_link(link.index, &name).await?;
        }
        if let Some(bridge) = self.nl.link(&bridge_name(vni)).await? {
            self.nl.delete_neighbour(bridge.index, address).await?;
        }
        Ok(())
    }

    /// The attach itself. Order matters for crash safety: the pair is created with its
    /// peer already inside the target, configured there, and only then does the host
    /// end get its id and come up; a host veth without both is an orphan.
    async fn attach_to(
        &self,
        spec: &NetworkSpec,
        ep: &Endpoint,
        bridge: &Link,
        mtu: u32,
    ) -> Result<()> {
        let host_name = host_veth_name(ep.address);
        if let Some(existing) = self.nl.link(&host_name).await? {
            let same = existing.alias.as_deref() == Some(ep.id.as_str());
            if same && existing.up && existing.controller == Some(bridge.index) {
                return Ok(());
            }
            if !same && existing.alias.is_some() {
                return Err(Error::AddressInUse {
                    network: spec.name.clone(),
                    address: ep.address,
                    holder: existing.alias.clone().unwrap_or_default(),
                });
            }
            warn!(veth = %host_name, "removing a half-made endpoint before attaching again");
            self.nl.delete_link(existing.index, &host_name).await?;
        }
        let target = Netns::open(&ep.netns)?;
        let Some(target_fd) = target.fd() else {
            return Err(Error::Invalid(
                "an endpoint cannot be the host's own namespace".into(),
            ));
        };
        let inner = Netlink::new(target.netlink().await?, target.to_string());
        let existing = inner.links().await?;
        let has_default = inner
            .routes(false)
            .await?
            .iter()
            .any(|r| r.destination.prefix_len() == 0);
        let mut ifname = None;
        for n in 0..64 {
            let candidate = format!("eth{n}");
            if existing.iter().any(|l| l.name == candidate) {
                continue;
            }
            if self
                .nl
                .try_create_veth(
                    &host_name,
                    bridge.index,
                    mtu,
                    &candidate,
                    target_fd,
                    ep.mac(),
                )
                .await?
            {
                ifname = Some(candidate);
                break;
            }
            if self.nl.link(&host_name).await?.is_some() {
                return Err(Error::AddressInUse {
                    network: spec.name.clone(),
                    address: ep.address,
                    holder: "a concurrent attach".into(),
                });
            }
        }
        let ifname = ifname.ok_or_else(|| {
            Error::Invalid(format!("namespace {} has no free eth<N> name", ep.netns))
        })?;
        let configured = self
            .configure_endpoint(spec, ep, bridge, &inner, &existing, &ifname, has_default)
            .await;
        if let Err(e) = configured {
            // Undo: deleting our end destroys the pair, so nothing is left in the target.
            if let Some(l) = self.nl.link(&host_name).await.ok().flatten() {
                let _ = self.nl.delete_link(l.index, &host_name).await;
            }
            let _ = self.nl.delete_neighbour(bridge.index, ep.address).await;
            return Err(e);
        }
        info!(ns = %self.ns, endpoint = %ep.id, address = %ep.address, network = %spec.name, %ifname, "attached");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn configure_endpoint(
        &self,
        spec: &NetworkSpec,
        ep: &Endpoint,
        bridge: &Link,
        inner: &Netlink,
        existing: &[Link],
        ifname: &str,
        has_default: bool,
    ) -> Result<()> {
        let gateway = block_gateway(&spec.block);
        let peer = inner
            .link(ifname)
            .await?
            .ok_or_else(|| Error::Worker(format!("{ifname} vanished from {}", ep.netns)))?;
        if let Some(lo) = existing.iter().find(|l| l.name == "lo" && !l.up) {
            inner.set_up(lo.index, "lo").await?;
        }
        let address = Ipv4Net::new(ep.address, spec.block.prefix_len()).expect("valid prefix");
        inner.add_address(peer.index, ifname, address).await?;
        inner.set_up(peer.index, ifname).await?;
        // A permanent entry for the gateway: no ARP, and nothing for the kernel's
        // neighbour-table garbage collector to count, however many containers there are.
        inner
            .replace_neighbour(peer.index, gateway, Mac::for_ip(gateway))
            .await?;
        if spec.subnet != spec.block {
            inner
                .replace_route(spec.subnet, gateway, peer.index, false)
                .await?;
        }
        if !has_default {
            inner
                .replace_route(Ipv4Net::default(), gateway, peer.index, false)
                .await?;
        }
        self.nl
            .replace_neighbour(bridge.index, ep.address, ep.mac())
            .await?;
        let host = self
            .nl
            .link(&host_veth_name(ep.address))
            .await?
            .ok_or_else(|| Error::Worker(format!("{} vanished", host_veth_name(ep.address))))?;
        // The commit point: an endpoint is complete once its host end carries the id
        // and is up; anything short of that is an orphan for the next apply to remove.
        self.nl.set_alias_up(host.index, &host.name, &ep.id).await
    }
}

fn wanted_kind_peer(o: &Object) -> bool {
    matches!(
        o,
        Object::PeerFdb { .. } | Object::PeerNeighbour { .. } | Object::PeerRoute { .. }
    )
}

fn vni_of(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.parse().ok()
}

fn index_of(links: &HashMap<String, Link>, name: &str) -> Result<u32> {
    links
        .get(name)
        .map(|l| l.index)
        .ok_or_else(|| Error::Worker(format!("{name} is missing after creation")))
}
