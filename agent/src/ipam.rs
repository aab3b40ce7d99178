//! Address management, pure: which block a host takes, which address an endpoint
//! gets, and whether a new network may exist beside the others. The store's
//! create-if-absent transactions make the choices safe between hosts; these
//! functions only choose.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::NetworkRecord;

/// Smallest subnet a network may have: four blocks of /28.
pub const SMALLEST_SUBNET: u8 = 26;

/// First VNI handed out when none is asked for (leaves the low range to others).
pub const FIRST_AUTO_VNI: u32 = 1000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("network name {0:?} is invalid: use 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or digit")]
    BadName(String),
    #[error("subnet {given} has host bits set; did you mean {suggest}?")]
    HostBits { given: Ipv4Net, suggest: Ipv4Net },
    #[error("subnet {0} is too small; use /{SMALLEST_SUBNET} or larger (e.g. {1})")]
    TooSmall(Ipv4Net, Ipv4Net),
    #[error("network {name:?} already exists (subnet {subnet}); remove it first with: netagent network rm {name}")]
    Duplicate { name: String, subnet: Ipv4Net },
    #[error(
        "subnet {subnet} overlaps network {other:?} ({other_subnet}); pick a subnet outside it"
    )]
    Overlap {
        subnet: Ipv4Net,
        other: String,
        other_subnet: Ipv4Net,
    },
    #[error("VNI {vni} is out of range 1..=16777215")]
    VniRange { vni: u32 },
    #[error("VNI {vni} is already used by network {other:?}; omit --vni to get a free one")]
    VniTaken { vni: u32, other: String },
    #[error("block size /{block} does not fit subnet {subnet}: it must be between /{} and /30", subnet.prefix_len())]
    BlockSize { block: u8, subnet: Ipv4Net },
    #[error("MTU {0} is out of range 576..=9000")]
    Mtu(u32),
    #[error("subnet {0} overlaps the encrypted mesh's addresses ({1}); pick a subnet outside it")]
    MeshOverlap(Ipv4Net, Ipv4Net),
}

/// Docker-compatible network names; they also appear in store keys and DNS names.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.is_empty()
        && name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Block size when the user gives none: /24 where the subnet has room for 16 of
/// them, else a quarter of the subnet.
pub fn default_block_prefix(subnet: Ipv4Net) -> u8 {
    if subnet.prefix_len() <= 20 {
        24
    } else {
        (subnet.prefix_len() + 2).min(28)
    }
}

/// A network as `netagent network create` asks for it (also the API request).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NewNetwork {
    pub name: String,
    pub subnet: Ipv4Net,
    #[serde(default)]
    pub vni: Option<u32>,
    #[serde(default)]
    pub block_prefix: Option<u8>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub encrypted: bool,
}

/// Checks a new network against the existing ones and fills in VNI and block size.
pub fn plan_network<'a>(
    new: &NewNetwork,
    existing: impl Iterator<Item = &'a NetworkRecord> + Clone,
) -> Result<NetworkRecord, IpamError> {
    if !valid_name(&new.name) {
        return Err(IpamError::BadName(new.name.clone()));
    }
    let subnet = new.subnet;
    if subnet != subnet.trunc() {
        return Err(IpamError::HostBits {
            given: subnet,
            suggest: subnet.trunc(),
        });
    }
    if subnet.prefix_len() > SMALLEST_SUBNET {
        let bigger = Ipv4Net::new(subnet.network(), SMALLEST_SUBNET).expect("valid prefix");
        return Err(IpamError::TooSmall(subnet, bigger.trunc()));
    }
    if let Some(n) = existing.clone().find(|n| n.name == new.name) {
        return Err(IpamError::Duplicate {
            name: n.name.clone(),
            subnet: n.subnet,
        });
    }
    let mesh = crate::model::mesh_subnet();
    if mesh.contains(&subnet.network()) || subnet.contains(&mesh.network()) {
        return Err(IpamError::MeshOverlap(subnet, mesh));
    }
    if let Some(n) = existing
        .clone()
        .find(|n| n.subnet.contains(&subnet.network()) || subnet.contains(&n.subnet.network()))
    {
        return Err(IpamError::Overlap {
            subnet,
            other: n.name.clone(),
            other_subnet: n.subnet,
        });
    }
    let used: BTreeSet<u32> = existing.clone().map(|n| n.vni).collect();
    let vni = match new.vni {
        Some(v) if v == 0 || v > netagent_overlay::MAX_VNI => {
            return Err(IpamError::VniRange { vni: v })
        }
        Some(v) => {
            if let Some(n) = existing.clone().find(|n| n.vni == v) {
                return Err(IpamError::VniTaken {
                    vni: v,
                    other: n.name.clone(),
                });
            }
            v
        }
        None => (FIRST_AUTO_VNI..)
            .find(|v| !used.contains(v))
            .expect("fewer networks than VNIs"),
    };
    let block_prefix = new
        .block_prefix
        .unwrap_or_else(|| default_block_prefix(subnet));
    if block_prefix < subnet.prefix_len() || block_prefix > 30 {
        return Err(IpamError::BlockSize {
            block: block_prefix,
            subnet,
        });
    }
    if let Some(m) = new.mtu.filter(|m| !(576..=9000).contains(m)) {
        return Err(IpamError::Mtu(m));
    }
    Ok(NetworkRecord {
        name: new.name.clone(),
        subnet,
        vni,
        encrypted: new.encrypted,
        mtu: new.mtu,
        block_prefix,
    })
}

/// The first block of the subnet nobody holds.
pub fn free_block(network: &NetworkRecord, taken: &BTreeSet<Ipv4Net>) -> Option<Ipv4Net> {
    network
        .subnet
        .subnets(network.block_prefix)
        .ok()?
        .find(|b| !taken.contains(b))
}

/// The lowest address of a block that is neither its network, gateway, broadcast
/// nor taken.
/// Refuses an address a container may not have in `block`: outside it, or the
/// block's network, gateway or broadcast address.
pub fn check_in_block(network: &str, block: Ipv4Net, address: Ipv4Addr) -> Result<(), String> {
    let first = Ipv4Addr::from(u32::from(block.network()) + 2);
    let last = Ipv4Addr::from(u32::from(block.broadcast()).saturating_sub(1));
    if address < first || address > last {
        return Err(format!(
            "address {address} is not in this host's block {block} of network {network:?}; give one from {first} to {last}, or none"
        ));
    }
    Ok(())
}

pub fn free_address(block: Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(block.network()) + 2;
    let last = u32::from(block.broadcast()).checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|a| !taken.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, subnet: &str, vni: u32) -> NetworkRecord {
        NetworkRecord {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            vni,
            encrypted: false,
            mtu: None,
            block_prefix: 24,
        }
    }

    fn new(name: &str, subnet: &str) -> NewNetwork {
        NewNetwork {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            vni: None,
            block_prefix: None,
            mtu: None,
            encrypted: false,
        }
    }

    #[test]
    fn refuses_what_cannot_coexist() {
        let existing = [net("app-net", "100.64.0.0/16", 1000)];
        let plan = |n: NewNetwork| plan_network(&n, existing.iter()).map(|r| r.name);
        let e = plan(new("app-net", "100.65.0.0/16")).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        let e = plan(new("other", "100.64.128.0/24")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 100.64.128.0/24 overlaps network \"app-net\" (100.64.0.0/16); pick a subnet outside it"
        );
        let e = plan(new("other", "100.64.0.0/12")).unwrap_err();
        assert!(matches!(e, IpamError::Overlap { .. }), "{e}");
        let e = plan(new("other", "100.127.0.0/16")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 100.127.0.0/16 overlaps the encrypted mesh's addresses (100.127.192.0/18); pick a subnet outside it"
        );
        let e = plan(new("other", "100.66.0.1/16")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 100.66.0.1/16 has host bits set; did you mean 100.66.0.0/16?"
        );
        let e = plan(new("bad name", "100.66.0.0/16")).unwrap_err();
        assert!(matches!(e, IpamError::BadName(_)));
        let e = plan(new("tiny", "100.66.0.0/28")).unwrap_err();
        assert!(matches!(e, IpamError::TooSmall(..)), "{e}");
        let mut n = new("v", "100.66.0.0/16");
        n.vni = Some(1000);
        assert!(matches!(plan(n).unwrap_err(), IpamError::VniTaken { .. }));
        let mut n = new("v", "100.66.0.0/16");
        n.vni = Some(1 << 24);
        assert!(matches!(plan(n).unwrap_err(), IpamError::VniRange { .. }));
    }

    #[test]
    fn fills_in_vni_and_block_size() {
        let existing = [
            net("a", "100.64.0.0/16", 1000),
            net("b", "100.65.0.0/16", 1002),
        ];
        let r = plan_network(&new("c", "100.66.0.0/24"), existing.iter()).unwrap();
        assert_eq!((r.vni, r.block_prefix), (1001, 26));
        let r = plan_network(&new("d", "100.80.0.0/12"), existing.iter()).unwrap();
        assert_eq!(r.block_prefix, 24);
    }

    #[test]
    fn blocks_and_addresses_skip_what_is_taken() {
        let n = net("a", "100.64.0.0/16", 1000);
        let taken: BTreeSet<Ipv4Net> = ["100.64.0.0/24".parse().unwrap()].into();
        assert_eq!(
            free_block(&n, &taken),
            Some("100.64.1.0/24".parse().unwrap())
        );
        let block: Ipv4Net = "100.64.1.0/30".parse().unwrap();
        // .0 network, .1 gateway, .3 broadcast: only .2 is an endpoint address.
        assert_eq!(
            free_address(block, &BTreeSet::new()),
            Some("100.64.1.2".parse().unwrap())
        );
        let full: BTreeSet<Ipv4Addr> = ["100.64.1.2".parse().unwrap()].into();
        assert_eq!(free_address(block, &full), None);
        let small = NetworkRecord {
            block_prefix: 25,
            ..net("s", "100.64.0.0/24", 1)
        };
        let both: BTreeSet<Ipv4Net> = [
            "100.64.0.0/25".parse().unwrap(),
            "100.64.0.128/25".parse().unwrap(),
        ]
        .into();
        assert_eq!(free_block(&small, &both), None);
    }
}
