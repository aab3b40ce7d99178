//! What a store record may say. Records come from every host and from whoever can
//! write the store, so each is checked for meaning and size as it is read: one that
//! fails is left out of the cluster view (and named in `status`) instead of reaching
//! the kernel, the DNS or the mesh.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netagent_overlay::MAX_VNI;

use crate::ipam;
use crate::model::{self, BlockRecord, EndpointRecord, MeshRecord, NetworkRecord, NodeRecord};
use crate::names::check_dns_name;

/// Largest record value read from the store (a record is a few hundred bytes).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Most names one endpoint may carry besides its own and its service's.
pub const MAX_ALIASES: usize = 32;

/// A record type's rules; `key` is the store key without the kind's prefix.
pub trait CheckRecord {
    fn check(&self, key: &str) -> Result<(), String>;
}

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

/// An address another host may be reached at: a unicast address.
fn check_host_address(what: &str, a: Ipv4Addr) -> Result<(), String> {
    ensure(
        !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast()),
        || format!("{what} {a} is not a unicast host address"),
    )
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    ensure(ipam::valid_name(name), || {
        format!("{what} {name:?} is not a valid name")
    })
}

/// A record sits under the key its own fields make (`full`, with the kind's prefix).
fn check_key(key: &str, full: &str, prefix: &str) -> Result<(), String> {
    ensure(full.strip_prefix(prefix) == Some(key), || {
        format!("belongs under {full}, not under this key")
    })
}

/// A network address (host bits zero), /8 to /30.
fn check_prefix(what: &str, net: Ipv4Net) -> Result<(), String> {
    ensure(
        net == net.trunc() && (8..=30).contains(&net.prefix_len()),
        || format!("{what} {net} is not a /8 to /30 network address"),
    )
}

/// A network's subnet: a network address, /8 to /30, clear of the mesh's range.
pub fn check_subnet(subnet: Ipv4Net) -> Result<(), String> {
    check_prefix("subnet", subnet)?;
    let mesh = model::mesh_subnet();
    ensure(!subnet.contains(&mesh) && !mesh.contains(&subnet), || {
        format!("subnet {subnet} overlaps the mesh's {mesh}")
    })
}

impl CheckRecord for NodeRecord {
    fn check(&self, key: &str) -> Result<(), String> {
        check_key(key, &model::node_key(&self.name), model::NODES)?;
        check_name("node", &self.name)?;
        check_host_address("underlay", self.underlay)?;
        ensure(self.version.len() <= 64, || "version is too long".into())
    }
}

impl CheckRecord for NetworkRecord {
    fn check(&self, key: &str) -> Result<(), String> {
        check_key(key, &model::network_key(&self.name), model::NETWORKS)?;
        check_name("network", &self.name)?;
        ensure((1..=MAX_VNI).contains(&self.vni), || {
            format!("VNI {} is out of range 1..={MAX_VNI}", self.vni)
        })?;
        check_subnet(self.subnet)?;
        ensure(
            (self.subnet.prefix_len()..=30).contains(&self.block_prefix),
            || {
                format!(
                    "block size /{} does not fit subnet {}",
                    self.block_prefix, self.subnet
                )
            },
        )?;
        ensure(self.mtu.is_none_or(|m| (576..=9000).contains(&m)), || {
            format!("MTU {:?} is out of range 576..=9000", self.mtu)
        })
    }
}

impl CheckRecord for BlockRecord {
    fn check(&self, key: &str) -> Result<(), String> {
        let full = model::block_key(&self.network, self.block);
        check_key(key, &full, model::BLOCKS)?;
        check_name("network", &self.network)?;
        check_name("node", &self.node)?;
        check_prefix("block", self.block)?;
        check_host_address("underlay", self.underlay)
    }
}

impl CheckRecord for EndpointRecord {
    fn check(&self, key: &str) -> Result<(), String> {
        let full = model::endpoint_key(&self.network, self.address);
        check_key(key, &full, model::ENDPOINTS)?;
        check_name("network", &self.network)?;
        check_name("node", &self.node)?;
        ensure(self.id.len() <= 128 && self.netns.len() <= 256, || {
            "identity or namespace is too long".into()
        })?;
        ensure(self.aliases.len() <= MAX_ALIASES, || {
            format!("{} aliases, more than {MAX_ALIASES}", self.aliases.len())
        })?;
        ensure(
            self.container.as_ref().is_none_or(|c| c.len() <= 128),
            || "container id is too long".into(),
        )?;
        let names = self.name.iter().map(|n| ("name", n));
        let names = names.chain(self.service.iter().map(|s| ("service", s)));
        for (kind, n) in names.chain(self.aliases.iter().map(|a| ("alias", a))) {
            check_dns_name(kind, n)?;
        }
        Ok(())
    }
}

impl CheckRecord for MeshRecord {
    fn check(&self, key: &str) -> Result<(), String> {
        check_key(key, &model::mesh_key(self.address), model::MESH)?;
        check_name("node", &self.node)?;
        ensure(model::mesh_subnet().contains(&self.address), || {
            format!(
                "mesh address {} is outside {}",
                self.address,
                model::MESH_SUBNET
            )
        })?;
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.decode(&self.public_key);
        ensure(key.is_ok_and(|k| k.len() == 32), || {
            "public key is not 32 bytes of base64".into()
        })?;
        check_host_address("endpoint", *self.endpoint.ip())?;
        ensure(self.endpoint.port() != 0, || "endpoint port is 0".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> NetworkRecord {
        NetworkRecord {
            name: "app".into(),
            subnet: "100.64.0.0/16".parse().unwrap(),
            vni: 7,
            encrypted: false,
            mtu: None,
            block_prefix: 24,
        }
    }

    #[test]
    fn networks_with_impossible_values_are_refused() {
        assert_eq!(network().check("app"), Ok(()));
        assert!(network().check("other").is_err());
        let bad = [
            NetworkRecord {
                subnet: "0.0.0.0/0".parse().unwrap(),
                block_prefix: 24,
                ..network()
            },
            NetworkRecord {
                vni: 0,
                ..network()
            },
            NetworkRecord {
                vni: MAX_VNI + 1,
                ..network()
            },
            NetworkRecord {
                block_prefix: 31,
                ..network()
            },
            NetworkRecord {
                block_prefix: 8,
                ..network()
            },
            NetworkRecord {
                mtu: Some(70_000),
                ..network()
            },
            NetworkRecord {
                subnet: "100.127.0.0/16".parse().unwrap(),
                ..network()
            },
        ];
        for n in bad {
            assert!(n.check("app").is_err(), "{n:?}");
        }
    }

    #[test]
    fn endpoints_and_blocks_are_bounded_and_keyed() {
        let ep = EndpointRecord {
            network: "app".into(),
            address: "100.64.1.2".parse().unwrap(),
            node: "h1".into(),
            id: "ns:1".into(),
            netns: "pid:5".into(),
            name: Some("web".into()),
            service: Some("echo_api".into()),
            aliases: vec!["a".into()],
            in_service: true,
            container: None,
        };
        assert_eq!(ep.check("app/100.64.1.2"), Ok(()));
        assert!(ep.check("app/100.64.1.3").is_err());
        let many = EndpointRecord {
            aliases: (0..1000).map(|i| format!("a{i}")).collect(),
            ..ep.clone()
        };
        assert!(many.check("app/100.64.1.2").is_err());
        let dotted = EndpointRecord {
            service: Some("bad name!".into()),
            ..ep.clone()
        };
        assert!(dotted.check("app/100.64.1.2").is_err());
        let block = BlockRecord {
            network: "app".into(),
            block: "100.64.1.0/24".parse().unwrap(),
            node: "h1".into(),
            underlay: "192.0.2.11".parse().unwrap(),
        };
        assert_eq!(block.check("app/100.64.1.0_24"), Ok(()));
        let zero = BlockRecord {
            underlay: Ipv4Addr::UNSPECIFIED,
            ..block.clone()
        };
        assert!(zero.check("app/100.64.1.0_24").is_err());
        let everything = BlockRecord {
            block: "0.0.0.0/0".parse().unwrap(),
            ..block
        };
        assert!(everything.check("app/0.0.0.0_0").is_err());
    }

    #[test]
    fn mesh_records_need_a_real_key() {
        let m = MeshRecord {
            node: "h1".into(),
            address: "100.127.192.1".parse().unwrap(),
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            endpoint: "192.0.2.11:51820".parse().unwrap(),
        };
        assert_eq!(m.check("100.127.192.1"), Ok(()));
        let short = MeshRecord {
            public_key: "AAAA".into(),
            ..m.clone()
        };
        assert!(short.check("100.127.192.1").is_err());
        let outside = MeshRecord {
            address: "192.0.2.99".parse().unwrap(),
            ..m
        };
        assert!(outside.check("192.0.2.99").is_err());
    }
}
