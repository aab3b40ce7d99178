//! Deterministic names and MAC addresses for everything the overlay creates.
//!
//! Names and MACs are functions of the desired state (VNI, IP), never random: a new
//! process recognises what an old one made, and peers can compute each other's VTEP
//! MACs without asking. All device names start with `na` so ownership is visible in
//! `ip link` and in firewall rules, and fit in IFNAMSIZ (15).

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// VXLAN device of a network on this host.
pub fn vxlan_name(vni: u32) -> String {
    format!("nax{vni}")
}

/// The VNI encoded in a VXLAN device name, if it is one of ours.
pub fn vxlan_vni(name: &str) -> Option<u32> {
    name.strip_prefix("nax")?.parse().ok()
}

/// Host side of an endpoint's veth pair: the endpoint's address in hex, unique on the
/// host because subnets of different networks never overlap.
pub fn host_veth_name(address: Ipv4Addr) -> String {
    format!("nav{:08x}", u32::from(address))
}

/// The container end of a Docker endpoint's pair while it waits in the host's
/// namespace for Docker to move it into the container (where it becomes `ethN`).
pub fn docker_peer_name(address: Ipv4Addr) -> String {
    format!("nad{:08x}", u32::from(address))
}

/// The endpoint address encoded in a host veth name, if it is one of ours.
pub fn host_veth_address(name: &str) -> Option<Ipv4Addr> {
    let hex = name.strip_prefix("nav")?;
    (hex.len() == 8)
        .then(|| u32::from_str_radix(hex, 16).ok())
        .flatten()
        .map(Ipv4Addr::from)
}

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Endpoint MACs: locally administered, `02:4e` then the IPv4 address (as Docker
    /// does with `02:42`), so a MAC is unique wherever its IP is. The host ends of a
    /// network's veths all use the gateway's: each veth is its own link, and containers
    /// hold a permanent neighbour entry for the gateway with that MAC.
    pub fn for_ip(ip: Ipv4Addr) -> Self {
        let o = ip.octets();
        Self([0x02, 0x4e, o[0], o[1], o[2], o[3]])
    }

    /// The VXLAN device MAC of a host for a network: unique per underlay address on
    /// that network's VXLAN segment, which is all that is required of it.
    pub fn for_vtep(vni: u32, underlay: Ipv4Addr) -> Self {
        let o = underlay.octets();
        Self([0x06, (vni & 0xff) as u8, o[0], o[1], o[2], o[3]])
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let parts: Vec<u8> = s
            .split(':')
            .map(|p| u8::from_str_radix(p, 16))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
        Self::from_slice(&parts).ok_or_else(|| format!("{s:?} is not a MAC address"))
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_round_trip() {
        assert!(vxlan_name(16_777_215).len() <= 15);
        assert_eq!(vxlan_vni(&vxlan_name(300)), Some(300));
        assert_eq!(vxlan_vni("nav644003c8"), None);
        let ip = Ipv4Addr::new(100, 64, 3, 200);
        let name = host_veth_name(ip);
        assert_eq!(name, "nav644003c8");
        assert_eq!(host_veth_address(&name), Some(ip));
        assert_eq!(host_veth_address("nax42"), None);
        assert_eq!(host_veth_address("navzzzzzzzz"), None);
    }

    #[test]
    fn macs_are_unicast_local_and_parse() {
        let m = Mac::for_ip(Ipv4Addr::new(100, 64, 1, 2));
        assert_eq!(m.to_string(), "02:4e:64:40:01:02");
        assert_eq!(m.0[0] & 1, 0, "unicast");
        assert_eq!(m.0[0] & 2, 2, "locally administered");
        let v = Mac::for_vtep(300, Ipv4Addr::new(192, 0, 2, 11));
        assert_eq!(v.to_string(), "06:2c:c0:00:02:0b");
        assert_eq!(Mac::try_from(v.to_string()).unwrap(), v);
        assert!(Mac::try_from("zz".to_string()).is_err());
    }
}
