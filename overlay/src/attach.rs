//! Attaching a namespace to a network, routed (no bridge): the namespace gets a /32
//! and on-link routes via the gateway, the host a /32 route and a permanent neighbour
//! entry on the endpoint's veth. Every packet is routed by the host, so nothing is
//! bridged (no ARP between containers, no bridge netfilter on the path), and the
//! endpoint's veth carries the network's interface group for the firewall.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::host::Host;
use crate::naming::{docker_peer_name, host_veth_name, vxlan_name, Mac};
use crate::netlink::{Link, Netlink};
use crate::netns::Netns;
use crate::spec::{Endpoint, NetworkSpec};

impl Host {
    /// Attaches a namespace to a network already applied on this host, with the MTU
    /// of the network's device (which apply computed for its path: underlay or mesh).
    pub async fn attach(&self, spec: &NetworkSpec, ep: &Endpoint) -> Result<()> {
        spec.validate_endpoint_address(ep.address)?;
        let Some(device) = self.nl.link(&vxlan_name(spec.vni)).await? else {
            return Err(Error::UnknownNetwork {
                network: spec.name.clone(),
                vni: spec.vni,
            });
        };
        self.attach_to(spec, ep, device.mtu).await
    }

    /// Makes an endpoint's veth pair for Docker to finish: the host end routed as
    /// [`Host::attach`] does, the other end left in the host's namespace, down,
    /// under the returned name. Docker moves it into the container's namespace when
    /// that exists (after its driver's join), and sets its address and routes there.
    pub async fn prepare_for_docker(&self, spec: &NetworkSpec, ep: &Endpoint) -> Result<String> {
        spec.validate_endpoint_address(ep.address)?;
        let Some(device) = self.nl.link(&vxlan_name(spec.vni)).await? else {
            return Err(Error::UnknownNetwork {
                network: spec.name.clone(),
                vni: spec.vni,
            });
        };
        let host_name = host_veth_name(ep.address);
        let peer_name = docker_peer_name(ep.address);
        if let Some(existing) = self.nl.link(&host_name).await? {
            let same = existing.alias.as_deref() == Some(ep.id.as_str());
            if same && self.nl.link(&peer_name).await?.is_some() {
                return Ok(peer_name);
            }
            if let Some(holder) = existing.alias.filter(|_| !same) {
                return Err(Error::AddressInUse {
                    network: spec.name.clone(),
                    address: ep.address,
                    holder,
                });
            }
            self.nl.delete_link(existing.index, &host_name).await?;
        }
        if let Some(stale) = self.nl.link(&peer_name).await? {
            self.nl.delete_link(stale.index, &peer_name).await?;
        }
        let host_mac = Mac::for_ip(spec.gateway());
        self.nl
            .try_create_veth(
                &host_name,
                spec.vni,
                host_mac,
                device.mtu,
                &peer_name,
                None,
                ep.mac(),
            )
            .await?;
        let routed = async {
            self.harden_host_end(&host_name).await?;
            self.route_host_end(ep).await
        }
        .await;
        if let Err(e) = routed {
            let _ = self.detach(ep.address).await;
            return Err(e);
        }
        info!(ns = %self.ns, endpoint = %ep.id, address = %ep.address, network = %spec.name, peer = %peer_name, "prepared for Docker");
        Ok(peer_name)
    }

    /// Detaches the endpoint holding `address` (nothing to do when it is not there).
    /// Deleting the host end destroys the pair; its route and neighbour go with it.
    pub async fn detach(&self, address: Ipv4Addr) -> Result<()> {
        let name = host_veth_name(address);
        match self.nl.link(&name).await? {
            Some(link) => self.nl.delete_link(link.index, &name).await,
            None => Ok(()),
        }
    }

    /// The attach itself. Order matters for crash safety: the pair is created with its
    /// peer already inside the target, configured there, routed on the host, and only
    /// then does the host end get the endpoint id: the commit point. A host veth
    /// without its id (or its route) is an orphan that the next apply removes.
    pub(crate) async fn attach_to(
        &self,
        spec: &NetworkSpec,
        ep: &Endpoint,
        mtu: u32,
    ) -> Result<()> {
        let host_name = host_veth_name(ep.address);
        if let Some(existing) = self.nl.link(&host_name).await? {
            let same = existing.alias.as_deref() == Some(ep.id.as_str());
            if same && existing.up && existing.group == spec.vni {
                return Ok(());
            }
            if let Some(holder) = existing.alias.filter(|_| !same) {
                return Err(Error::AddressInUse {
                    network: spec.name.clone(),
                    address: ep.address,
                    holder,
                });
            }
            warn!(veth = %host_name, "removing a half-made endpoint before attaching again");
            self.nl.delete_link(existing.index, &host_name).await?;
        }
        let target = match ep.identity {
            Some(identity) => Netns::open_expecting(&ep.netns, identity)?,
            None => Netns::open(&ep.netns)?,
        };
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
        let host_mac = Mac::for_ip(spec.gateway());
        let mut ifname = None;
        for n in 0..64 {
            let candidate = format!("eth{n}");
            if existing.iter().any(|l| l.name == candidate) {
                continue;
            }
            let created = self
                .nl
                .try_create_veth(
                    &host_name,
                    spec.vni,
                    host_mac,
                    mtu,
                    &candidate,
                    Some(target_fd),
                    ep.mac(),
                )
                .await?;
            if created {
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
        let configured = async {
            self.harden_host_end(&host_name).await?;
            self.configure(spec, ep, &inner, &existing, &ifname, has_default)
                .await
        }
        .await;
        if let Err(e) = configured {
            // Undo: deleting our end destroys the pair, so nothing is left anywhere.
            let _ = self.detach(ep.address).await;
            return Err(e);
        }
        info!(ns = %self.ns, endpoint = %ep.id, address = %ep.address, network = %spec.name, %ifname, "attached");
        Ok(())
    }

    /// The host end of a container's veth takes no IPv6 (the firewall filters IPv4
    /// only; a link-local address would reach the host's services) and only sources
    /// that route back through it (a container cannot pose as a peer host).
    async fn harden_host_end(&self, host_name: &str) -> Result<()> {
        self.ns
            .write_sysctls(&[
                (format!("net.ipv6.conf.{host_name}.disable_ipv6"), "1"),
                (format!("net.ipv4.conf.{host_name}.rp_filter"), "1"),
            ])
            .await
    }

    async fn configure(
        &self,
        spec: &NetworkSpec,
        ep: &Endpoint,
        inner: &Netlink,
        existing: &[Link],
        ifname: &str,
        has_default: bool,
    ) -> Result<()> {
        let gateway = spec.gateway();
        let peer = inner
            .link(ifname)
            .await?
            .ok_or_else(|| Error::Worker(format!("{ifname} vanished from {}", ep.netns)))?;
        if let Some(lo) = existing.iter().find(|l| l.name == "lo" && !l.up) {
            inner.set_up(lo.index, "lo").await?;
        }
        inner
            .add_address(peer.index, ifname, Ipv4Net::from(ep.address))
            .await?;
        inner.set_up(peer.index, ifname).await?;
        // A permanent entry for the gateway: no ARP, and nothing for the kernel's
        // neighbour-table garbage collector to count, however many containers there are.
        inner
            .replace_neighbour(peer.index, gateway, Mac::for_ip(gateway))
            .await?;
        inner
            .replace_route(spec.subnet, gateway, peer.index, true)
            .await?;
        if !has_default && ep.default_route {
            inner
                .replace_route(Ipv4Net::default(), gateway, peer.index, true)
                .await?;
        }
        self.route_host_end(ep).await
    }

    /// The host end up, with the endpoint's neighbour entry and /32 route, and then
    /// its id: the commit point of every attach.
    async fn route_host_end(&self, ep: &Endpoint) -> Result<()> {
        let host_name = host_veth_name(ep.address);
        let host = self
            .nl
            .link(&host_name)
            .await?
            .ok_or_else(|| Error::Worker(format!("{host_name} vanished")))?;
        self.nl.set_up(host.index, &host_name).await?;
        self.nl
            .replace_neighbour(host.index, ep.address, ep.mac())
            .await?;
        self.nl
            .replace_link_route(Ipv4Net::from(ep.address), host.index)
            .await?;
        self.nl.set_alias(host.index, &host_name, &ep.id).await
    }
}
