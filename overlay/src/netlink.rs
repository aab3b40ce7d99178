//! Typed, idempotent netlink operations on one namespace: the only module that builds
//! rtnetlink messages. "Already exists" on create and "not found" on delete are success.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::constants::ROUTE_PROTOCOL;
use crate::error::{Error, Result};
use crate::naming::Mac;

const EEXIST: i32 = libc::EEXIST;
const RT_TABLE_MAIN: u8 = 254;

/// What we read back about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub group: u32,
    pub up: bool,
    pub alias: Option<String>,
    pub vxlan: Option<VxlanInfo>,
}

/// The identity of a VXLAN device: changing any of these needs a new device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    pub port: u16,
    pub learning: bool,
}

/// One IPv4 route.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub destination: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

/// Netlink handle plus the namespace name for error messages.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    ns: String,
}

fn code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Netlink {
    pub fn new(handle: rtnetlink::Handle, ns: impl Into<String>) -> Self {
        Self {
            handle,
            ns: ns.into(),
        }
    }

    fn err(&self, op: &'static str, object: impl Into<String>, e: rtnetlink::Error) -> Error {
        let message = match &e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
            other => other.to_string(),
        };
        Error::Netlink {
            op,
            object: object.into(),
            ns: self.ns.clone(),
            message,
        }
    }

    // ---- links ----

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list", "links", e))?;
        Ok(msgs.iter().map(parse_link).collect())
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(m)) => Ok(Some(parse_link(&m))),
            Ok(None) => Ok(None),
            Err(e) if code(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.err("get link", name, e)),
        }
    }

    async fn add(&self, msg: LinkMessage, op: &'static str, name: &str) -> Result<()> {
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.err(op, name, e)),
        }
    }

    /// A VXLAN device with no learning and no flooding (every remote MAC is
    /// programmed), in interface group `vni`; `udp_checksum` false sends zero UDP
    /// checksums.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        underlay_index: u32,
        mac: Mac,
        mtu: u32,
        port: u16,
        udp_checksum: bool,
    ) -> Result<()> {
        let msg = LinkVxlan::new(name, vni)
            .dev(underlay_index)
            .local(local)
            .port(port)
            .udp_csum(udp_checksum)
            .learning(false)
            .address(mac.0.to_vec())
            .mtu(mtu)
            .link_group(vni)
            .up()
            .build();
        self.add(msg, "create vxlan", name).await
    }

    /// A veth pair whose peer is born inside the namespace `peer_ns_fd` (one message, so
    /// the pair never exists with both ends here). "Name taken" (in either namespace)
    /// is `Ok(false)` so the caller can pick another peer name.
    #[allow(clippy::too_many_arguments)]
    pub async fn try_create_veth(
        &self,
        name: &str,
        group: u32,
        mac: Mac,
        mtu: u32,
        peer_name: &str,
        peer_ns_fd: Option<std::os::fd::RawFd>,
        peer_mac: Mac,
    ) -> Result<bool> {
        let peer = LinkUnspec::new_with_name(peer_name);
        let peer = match peer_ns_fd {
            Some(fd) => peer.setns_by_fd(fd),
            None => peer,
        };
        let peer = peer.address(peer_mac.0.to_vec()).mtu(mtu).build();
        let msg = rtnetlink::LinkMessageBuilder::<rtnetlink::LinkVeth>::new_with_info_kind(
            InfoKind::Veth,
        )
        .name(name.to_string())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .address(mac.0.to_vec())
        .mtu(mtu)
        .link_group(group)
        .build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if code(&e) == Some(EEXIST) => Ok(false),
            Err(e) => Err(self.err("create veth", format!("{name} (peer {peer_name})"), e)),
        }
    }

    /// Turns ARP off: the device's neighbours are reached without resolution.
    pub async fn set_noarp(&self, index: u32, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).arp(false).build();
        self.set_link(msg, "set arp off", name).await
    }

    pub async fn set_up(&self, index: u32, name: &str) -> Result<()> {
        self.set_link(
            LinkUnspec::new_with_index(index).up().build(),
            "set up",
            name,
        )
        .await
    }

    /// Sets the alias (the kernel ignores an alias given at creation).
    pub async fn set_alias(&self, index: u32, name: &str, alias: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).alias(alias).build();
        self.set_link(msg, "set alias", name).await
    }

    pub async fn set_mtu(&self, index: u32, name: &str, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.set_link(msg, "set mtu", name).await
    }

    async fn set_link(&self, msg: LinkMessage, op: &'static str, name: &str) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| self.err(op, name, e))
    }

    pub async fn delete_link(&self, index: u32, name: &str) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Err(e) if code(&e) != Some(libc::ENODEV) => Err(self.err("delete link", name, e)),
            _ => Ok(()),
        }
    }

    // ---- addresses ----

    /// IPv4 addresses as `(link index, address/prefix)`.
    pub async fn addresses(&self) -> Result<Vec<(u32, Ipv4Net)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list", "addresses", e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => {
                        Ipv4Net::new(*ip, m.header.prefix_len)
                            .ok()
                            .map(|n| (m.header.index, n))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    pub async fn delete_address(&self, index: u32, name: &str, addr: Ipv4Net) -> Result<()> {
        let mut msg = netlink_packet_route::address::AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = index;
        msg.header.prefix_len = addr.prefix_len();
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(addr.addr())));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr.addr())));
        match self.handle.address().del(msg).execute().await {
            Err(e) if code(&e) != Some(libc::EADDRNOTAVAIL) => {
                Err(self.err("delete address", format!("{addr} on {name}"), e))
            }
            _ => Ok(()),
        }
    }

    pub async fn add_address(&self, index: u32, name: &str, addr: Ipv4Net) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
        {
            Err(e) if code(&e) != Some(EEXIST) => {
                Err(self.err("add address", format!("{addr} on {name}"), e))
            }
            _ => Ok(()),
        }
    }

    // ---- routes ----

    /// IPv4 routes of the main table, all or only those stamped with our protocol.
    pub async fn routes(&self, only_ours: bool) -> Result<Vec<Route>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list", "routes", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.table == RT_TABLE_MAIN)
            .filter(|m| !only_ours || m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL))
            .filter_map(parse_route)
            .collect())
    }

    /// `ip route replace DST via GW dev OIF [onlink] proto 78`.
    pub async fn replace_route(
        &self,
        destination: Ipv4Net,
        gateway: Ipv4Addr,
        oif: u32,
        onlink: bool,
    ) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.network(), destination.prefix_len())
            .gateway(gateway)
            .output_interface(oif)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        if onlink {
            b = b.onlink();
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("replace route", format!("{destination} via {gateway}"), e))
    }

    /// `ip route replace DST dev OIF scope link proto 78`: a directly attached endpoint.
    pub async fn replace_link_route(&self, destination: Ipv4Net, oif: u32) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.network(), destination.prefix_len())
            .output_interface(oif)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("replace route", format!("{destination} dev {oif}"), e))
    }

    pub async fn delete_route(&self, route: &Route) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.destination.network(), route.destination.prefix_len())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        if let Some(gw) = route.gateway {
            b = b.gateway(gw);
        }
        if let Some(oif) = route.oif {
            b = b.output_interface(oif);
        }
        match self.handle.route().del(b.build()).execute().await {
            Err(e) if code(&e) != Some(libc::ESRCH) => {
                Err(self.err("delete route", route.destination.to_string(), e))
            }
            _ => Ok(()),
        }
    }

    // ---- neighbours (ARP) ----

    /// Permanent IPv4 neighbours of every interface, as `(ifindex, ip, mac)`: one dump
    /// for the whole namespace, however many devices the caller looks at.
    pub async fn permanent_neighbours(&self) -> Result<Vec<(u32, Ipv4Addr, Mac)>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list", "neighbours", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.state == NeighbourState::Permanent)
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                })?;
                Some((m.header.ifindex, ip, lladdr(m)?))
            })
            .collect())
    }

    pub async fn replace_neighbour(&self, index: u32, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("replace neighbour", format!("{ip} lladdr {mac}"), e))
    }

    pub async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(msg).execute().await {
            Err(e) if code(&e) != Some(libc::ENOENT) => {
                Err(self.err("delete neighbour", ip.to_string(), e))
            }
            _ => Ok(()),
        }
    }

    // ---- FDB entries of a VXLAN device ----

    /// FDB entries that carry a remote address (those of VXLAN devices), as
    /// `(ifindex, mac, remote)`: one dump for the whole namespace.
    pub async fn vxlan_fdb(&self) -> Result<Vec<(u32, Mac, Ipv4Addr)>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list", "fdb", e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                // The bridge family carries NDA_DST undecoded.
                let dst = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    _ => None,
                })?;
                Some((m.header.ifindex, lladdr(m)?, dst))
            })
            .collect())
    }

    /// `bridge fdb replace MAC dev VX dst IP self permanent`.
    pub async fn replace_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| self.err("replace fdb", format!("{mac} dst {dst}"), e))
    }

    pub async fn delete_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        match self.handle.neighbours().del(msg).execute().await {
            Err(e) if code(&e) != Some(libc::ENOENT) => {
                Err(self.err("delete fdb", format!("{mac} dst {dst}"), e))
            }
            _ => Ok(()),
        }
    }
}

fn lladdr(m: &NeighbourMessage) -> Option<Mac> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => Mac::from_slice(b),
        _ => None,
    })
}

fn parse_route(m: &RouteMessage) -> Option<Route> {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some(Route {
        destination: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
        gateway,
        oif,
    })
}

fn parse_link(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        group: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        alias: None,
        vxlan: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(v) => link.mtu = *v,
            LinkAttribute::Address(b) => link.mac = Mac::from_slice(b),
            LinkAttribute::Group(g) => link.group = *g,
            LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Vxlan(v)) = info {
                        link.vxlan = Some(parse_vxlan(v));
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn parse_vxlan(attrs: &[InfoVxlan]) -> VxlanInfo {
    let mut info = VxlanInfo {
        vni: 0,
        local: None,
        port: 0,
        learning: true,
    };
    for a in attrs {
        match a {
            InfoVxlan::Id(v) => info.vni = *v,
            InfoVxlan::Local(ip) => info.local = Some(*ip),
            InfoVxlan::Port(p) => info.port = *p,
            InfoVxlan::Learning(l) => info.learning = *l,
            _ => {}
        }
    }
    info
}
