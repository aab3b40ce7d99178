//! What a store record may say. Records come from every host and from whoever can
//! write the store, so each is checked for meaning and size as it is read: one that
//! fails is left out of the cluster view (and named in `status`) instead of reaching
//! the kernel, the DNS or the mesh.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netagent_overlay::MAX_VNI;

use crate::ipam;
use crate::model::{
    self, BlockRecord, EndpointRecord, GoneRecord, MeshRecord, NetworkRecord, NodeRecord, Port,
};
use crate::names::check_dns_name;

/// Largest record value read from the store (a record is a few hundred bytes).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Most names one endpoint may carry besides its own and its service's.
pub const MAX_ALIASES: usize = 32;

/// Most named ports one endpoint may carry.
pub const MAX_PORTS: usize = 16;

/// A port's name is a DNS label under `_` (RFC 6335's service names): 1 to 15
/// lowercase letters, digits and '-', starting with a letter. Port 0 is no port.
pub fn check_port(p: &Port) -> Result<(), String> {
    let n = p.name.as_bytes();
    ensure(
        (1..=15).contains(&n.len())
            && n[0].is_ascii_lowercase()
            && n.iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'),
        || {
            format!(
                "port name {:?} is not a service name: use 1 to 15 lowercase letters, digits or '-', starting with a letter",
                p.name
            )
        },
    )?;
    ensure(p.port != 0, || format!("port {:?} is 0", p.name))
}

/// An endpoint's ports: at most [`MAX_PORTS`], each valid, each name and protocol
/// once (one SRV name cannot point at two ports of one endpoint).
pub fn check_ports(ports: &[Port]) -> Result<(), String> {
    ensure(ports.len() <= MAX_PORTS, || {
        format!("{} ports, more than {MAX_PORTS}", ports.len())
    })?;
    for (i, p) in ports.iter().enumerate() {
        check_port(p)?;
        ensure(
            !ports[..i]
                .iter()
                .any(|q| q.name == p.name && q.protocol == p.protocol),
            || format!("port {:?} is named twice", p.name),
        )?;
    }
    Ok(())
}

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
        check_ports(&self.ports)
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

/// How far ahead of this host's clock a gone record's time may be: clocks differ a
/// little, but a time far ahead would put off the node's reclaim for as long.
pub const MAX_GONE_AHEAD_SECS: u64 = 3600;

impl CheckRecord for GoneRecord {
    fn check(&self, key: &str) -> Result<(), String> {
        check_key(key, &model::gone_key(&self.node), model::GONE)?;
        check_name("node", &self.node)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ensure(self.since <= now + MAX_GONE_AHEAD_SECS, || {
            format!(
                "gone since {} is more than {MAX_GONE_AHEAD_SECS} s ahead of this host's clock ({now})",
                self.since
            )
        })
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
            one_per_answer: false,
            ports: vec!["http:8080".parse().unwrap(), "dns:53/udp".parse().unwrap()],
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
    fn endpoints_with_hostile_ports_are_refused() {
        let ep = EndpointRecord {
            network: "app".into(),
            address: "100.64.1.2".parse().unwrap(),
            node: "h1".into(),
            id: "ns:1".into(),
            netns: "pid:5".into(),
            name: Some("web".into()),
            service: None,
            aliases: vec![],
            in_service: true,
            container: None,
            one_per_answer: false,
            ports: (0..MAX_PORTS)
                .map(|i| Port {
                    name: format!("p{i}"),
                    port: 1000 + i as u16,
                    protocol: model::Protocol::Tcp,
                })
                .collect(),
        };
        assert_eq!(ep.check("app/100.64.1.2"), Ok(()));
        let port = |name: &str, port: u16| Port {
            name: name.into(),
            port,
            protocol: model::Protocol::Tcp,
        };
        let mut too_many = ep.clone();
        too_many.ports.push(port("extra", 1));
        let e = too_many.check("app/100.64.1.2").unwrap_err();
        assert!(e.contains("17 ports, more than 16"), "{e}");
        for bad in [
            port("HTTP", 80),
            port("_http", 80),
            port("http.x", 80),
            port("1http", 80),
            port("", 80),
            port("a-very-long-service", 80),
            port("http", 0),
            port("p0", 1),
        ] {
            let hostile = EndpointRecord {
                ports: [&ep.ports[..1], &[bad.clone()][..]].concat(),
                ..ep.clone()
            };
            assert!(hostile.check("app/100.64.1.2").is_err(), "{bad:?}");
        }
        // The same name over UDP is another SRV name.
        let udp = EndpointRecord {
            ports: vec![
                port("dns", 53),
                Port {
                    protocol: model::Protocol::Udp,
                    ..port("dns", 53)
                },
            ],
            ..ep
        };
        assert_eq!(udp.check("app/100.64.1.2"), Ok(()));
        // Records from before ports read as records without any.
        let old =
            r#"{"network":"app","address":"100.64.1.2","node":"h1","id":"ns:1","netns":"pid:5"}"#;
        let old: EndpointRecord = serde_json::from_str(old).unwrap();
        assert!(old.ports.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("ports"));
    }

    #[test]
    fn ports_are_written_name_colon_number() {
        let p: Port = "dns:53/udp".parse().unwrap();
        assert_eq!(
            (p.name.as_str(), p.port, p.protocol),
            ("dns", 53, model::Protocol::Udp)
        );
        let p: Port = " http:8080/tcp".parse().unwrap();
        assert_eq!((p.port, p.protocol), (8080, model::Protocol::Tcp));
        for bad in [
            "http",
            "http:",
            "http:99999",
            "http:80/sctp",
            ":80",
            "Http:80",
            "http:0",
        ] {
            assert!(bad.parse::<Port>().is_err(), "{bad}");
        }
        let e = "http".parse::<Port>().unwrap_err();
        assert!(e.contains("NAME:PORT"), "{e}");
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

    #[test]
    fn gone_records_are_keyed_and_not_far_ahead() {
        let g = GoneRecord {
            node: "h3".into(),
            since: 1_700_000_000,
        };
        assert_eq!(g.check("h3"), Ok(()));
        assert!(g.check("h1").is_err());
        let bad_name = GoneRecord {
            node: "../h3".into(),
            ..g.clone()
        };
        assert!(bad_name.check("../h3").is_err());
        // A time far ahead would put the reclaim off for ever.
        let ahead = GoneRecord {
            since: u64::MAX,
            ..g
        };
        let e = ahead.check("h3").unwrap_err();
        assert!(e.contains("ahead of this host's clock"), "{e}");
    }

    /// Records come from whoever can write the store: any key, any bytes. Whatever
    /// the cluster view keeps must satisfy every rule, restated here independently.
    mod fuzz {
        use std::collections::BTreeMap;
        use std::net::SocketAddrV4;

        use base64::Engine as _;
        use proptest::prelude::*;
        use proptest::test_runner::Config;
        use serde_json::Value;

        use crate::names::documented::{dns_ok, network_ok};

        use super::*;
        use crate::model::{Cluster, NETWORKS_GUARD};
        use crate::store::Change;

        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                30 => prop::sample::select(vec!["app", "h1", "backend", "a.b", "x", "echo_api"])
                    .prop_map(String::from),
                2 => prop::sample::select(vec![
                    "", "-a", ".", "a/b", "a b", "é", "app/100.64.1.2", "../x", "a\u{0}",
                ])
                .prop_map(String::from),
                1 => "[a-z0-9_.-]{60,70}",
                1 => any::<String>(),
            ]
        }

        fn address() -> impl Strategy<Value = Ipv4Addr> {
            prop_oneof![
                8 => prop::sample::select(vec![
                    [100, 64, 1, 2], [100, 127, 192, 1], [192, 0, 2, 11], [100, 127, 255, 255],
                ])
                .prop_map(Ipv4Addr::from),
                1 => prop::sample::select(vec![
                    [0, 0, 0, 0], [127, 0, 0, 1], [255, 255, 255, 255], [224, 0, 0, 1],
                ])
                .prop_map(Ipv4Addr::from),
                1 => any::<u32>().prop_map(Ipv4Addr::from),
            ]
        }

        fn net() -> impl Strategy<Value = Ipv4Net> {
            (
                address(),
                prop_oneof![Just(16u8), Just(24), 0u8..=32],
                any::<bool>(),
            )
                .prop_map(|(a, len, trunc)| {
                    let n = Ipv4Net::new(a, len).expect("prefix up to 32");
                    if trunc {
                        n.trunc()
                    } else {
                        n
                    }
                })
        }

        /// Good port names, near misses, and any number.
        fn port() -> impl Strategy<Value = Port> {
            let name = prop_oneof![
                4 => "[a-z][a-z0-9-]{0,14}",
                1 => prop::sample::select(vec!["", "HTTP", "_x", "1a", "a.b", "sixteen-letters!"])
                    .prop_map(String::from),
                1 => any::<String>(),
            ];
            let protocol = prop_oneof![Just(model::Protocol::Tcp), Just(model::Protocol::Udp)];
            (name, prop_oneof![8 => 1u16.., 1 => Just(0u16)], protocol).prop_map(
                |(name, port, protocol)| Port {
                    name,
                    port,
                    protocol,
                },
            )
        }

        fn public_key() -> impl Strategy<Value = String> {
            let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), 32).prop_map(b64),
                1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(b64),
                1 => any::<String>(),
            ]
        }

        fn to<T: serde::Serialize>(record: &T) -> Value {
            serde_json::to_value(record).expect("records serialize")
        }

        /// A record of any kind with fields over their whole types, as JSON.
        fn record() -> impl Strategy<Value = Value> {
            prop_oneof![
                (name(), address(), ".{0,70}", any::<u64>()).prop_map(
                    |(name, underlay, version, started)| to(&NodeRecord {
                        name,
                        underlay,
                        version,
                        started,
                    })
                ),
                (
                    name(),
                    net(),
                    prop_oneof![
                        8 => 1u32..100,
                        1 => Just(MAX_VNI),
                        1 => Just(MAX_VNI + 1),
                        1 => Just(0),
                        1 => any::<u32>()
                    ],
                    any::<bool>(),
                    prop::option::of(prop_oneof![
                        Just(576u32),
                        Just(1450),
                        Just(9001),
                        any::<u32>()
                    ]),
                    prop_oneof![8 => 16u8..=31, 1 => any::<u8>()],
                )
                    .prop_map(
                        |(name, subnet, vni, encrypted, mtu, block_prefix)| {
                            to(&NetworkRecord {
                                name,
                                subnet,
                                vni,
                                encrypted,
                                mtu,
                                block_prefix,
                            })
                        }
                    ),
                (name(), net(), name(), address()).prop_map(|(network, block, node, underlay)| {
                    to(&BlockRecord {
                        network,
                        block,
                        node,
                        underlay,
                    })
                }),
                (
                    (name(), address(), name(), ".{0,140}", ".{0,260}"),
                    (
                        prop::option::of(name()),
                        prop::option::of(name()),
                        prop_oneof![
                            8 => proptest::collection::vec(name(), 0..4),
                            1 => proptest::collection::vec(name(), 30..40),
                        ],
                        any::<bool>(),
                        prop::option::of(".{0,140}"),
                        prop_oneof![
                            8 => proptest::collection::vec(port(), 0..3),
                            1 => proptest::collection::vec(port(), 15..18),
                        ],
                    ),
                )
                    .prop_map(
                        |(
                            (network, address, node, id, netns),
                            (n, service, aliases, in_service, container, ports),
                        )| {
                            to(&EndpointRecord {
                                network,
                                address,
                                node,
                                id,
                                netns,
                                name: n,
                                service,
                                aliases,
                                in_service,
                                container,
                                one_per_answer: false,
                                ports,
                            })
                        }
                    ),
                (
                    name(),
                    address(),
                    public_key(),
                    address(),
                    prop_oneof![1 => Just(0u16), 8 => any::<u16>()]
                )
                    .prop_map(|(node, address, public_key, ip, port)| to(
                        &MeshRecord {
                            node,
                            address,
                            public_key,
                            endpoint: SocketAddrV4::new(ip, port),
                        }
                    )),
                (
                    name(),
                    prop_oneof![4 => 0u64..2_000_000_000, 1 => any::<u64>()]
                )
                    .prop_map(|(node, since)| to(&GoneRecord { node, since })),
            ]
        }

        /// JSON text that no field type expects, or expects at its edge.
        const ODD: &[&str] = &[
            "18446744073709551616",
            "1e400",
            "-1",
            "4294967296",
            "256",
            "0",
            "0.5",
            "null",
            "\"x\"",
            "[]",
            "{}",
            "true",
            "\"100.64.0.0/33\"",
            "\"1.2.3.4:0\"",
            "\"\"",
            "\"100.64.1.2\"",
            "\"::1\"",
            "[\"a\",1]",
            "{\"a\":{\"b\":[]}}",
        ];

        /// The store key a record's own fields make (empty when it has none).
        fn own_key(v: &Value) -> String {
            let s = |f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_owned();
            if v.get("since").is_some() {
                format!("{GONE}{}", s("node"))
            } else if v.get("public_key").is_some() {
                format!("{MESH}{}", s("address"))
            } else if v.get("netns").is_some() {
                format!("{ENDPOINTS}{}/{}", s("network"), s("address"))
            } else if v.get("block").is_some() {
                let b = s("block").replace('/', "_");
                format!("{BLOCKS}{}/{b}", s("network"))
            } else if v.get("vni").is_some() {
                format!("{NETWORKS}{}", s("name"))
            } else {
                format!("{NODES}{}", s("name"))
            }
        }

        use crate::model::{BLOCKS, ENDPOINTS, GONE, MESH, NETWORKS, NODES};

        /// One write to the store.
        fn change() -> impl Strategy<Value = (String, Option<Vec<u8>>)> {
            let prefix = prop::sample::select(vec![
                NODES,
                NETWORKS,
                BLOCKS,
                ENDPOINTS,
                MESH,
                GONE,
                NETWORKS_GUARD,
                "meta/",
                "",
                "networks",
                "nodes/nodes/",
            ]);
            let edit = prop_oneof![
                6 => Just(None),
                2 => (any::<prop::sample::Index>(), prop::sample::select(ODD))
                    .prop_map(|(i, v)| Some((i, Some(v.to_string())))),
                1 => any::<prop::sample::Index>().prop_map(|i| Some((i, None))),
            ];
            let value = prop_oneof![
                8 => (record(), edit, prop::bool::weighted(0.1)).prop_map(|(v, edit, extra)| {
                    let Value::Object(fields) = v else { unreachable!("records are objects") };
                    let mut raw: Vec<(String, String)> =
                        fields.into_iter().map(|(k, v)| (k, v.to_string())).collect();
                    match edit {
                        Some((i, Some(odd))) => i.get_mut(&mut raw).1 = odd,
                        Some((i, None)) => {
                            let at = i.index(raw.len());
                            raw.remove(at);
                        }
                        None => {}
                    }
                    if extra {
                        raw.push(("newer_field".into(), "[1,2,3]".into()));
                    }
                    let body: Vec<String> =
                        raw.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                    Some(format!("{{{}}}", body.join(",")).into_bytes())
                }),
                1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Some),
                1 => Just(None),
                1 => (1usize..3).prop_map(|n| Some(vec![b' '; MAX_RECORD_BYTES - 1 + n])),
            ];
            let key = prop_oneof![
                // Under the key its fields make: the way to get accepted.
                6 => Just(None),
                2 => (prefix, ".{0,30}").prop_map(|(p, rest)| Some(format!("{p}{rest}"))),
            ];
            (value, key).prop_map(|(value, key)| {
                let key = key.unwrap_or_else(|| {
                    value
                        .as_deref()
                        .and_then(|v| serde_json::from_slice::<Value>(v).ok())
                        .map_or_else(|| format!("{NODES}x"), |v| own_key(&v))
                });
                (key, value)
            })
        }

        fn unicast(a: Ipv4Addr) -> bool {
            let o = a.octets();
            o != [0; 4] && o[0] != 127 && !(224..=239).contains(&o[0]) && o != [255; 4]
        }

        fn prefix_ok(n: Ipv4Net) -> bool {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(n.prefix_len()))
                .unwrap_or(0);
            (8..=30).contains(&n.prefix_len()) && u32::from(n.addr()) & !mask == 0
        }

        /// Every rule, restated, for everything the view kept.
        fn assert_view(c: &Cluster) -> Result<(), TestCaseError> {
            let mesh: Ipv4Net = "100.127.192.0/18".parse().unwrap();
            for (k, n) in &c.nodes {
                prop_assert_eq!(k, &n.name);
                prop_assert!(network_ok(&n.name) && unicast(n.underlay) && n.version.len() <= 64);
            }
            for (k, n) in &c.networks {
                prop_assert_eq!(k, &n.name);
                prop_assert!(network_ok(&n.name));
                prop_assert!((1..(1 << 24)).contains(&n.vni), "{:?}", n);
                prop_assert!(prefix_ok(n.subnet), "{:?}", n);
                prop_assert!(!mesh.contains(&n.subnet.addr()) && !n.subnet.contains(&mesh.addr()));
                prop_assert!(n.block_prefix >= n.subnet.prefix_len() && n.block_prefix <= 30);
                prop_assert!(n.mtu.is_none_or(|m| (576..=9000).contains(&m)));
            }
            for (k, b) in &c.blocks {
                let addr = b.block.addr();
                prop_assert_eq!(k, &format!("{}/{addr}_{}", b.network, b.block.prefix_len()));
                prop_assert!(network_ok(&b.network) && network_ok(&b.node));
                prop_assert!(prefix_ok(b.block) && unicast(b.underlay), "{:?}", b);
            }
            for (k, e) in &c.endpoints {
                prop_assert_eq!(k, &format!("{}/{}", e.network, e.address));
                prop_assert!(network_ok(&e.network) && network_ok(&e.node));
                prop_assert!(e.id.len() <= 128 && e.netns.len() <= 256);
                prop_assert!(e.container.as_ref().is_none_or(|c| c.len() <= 128));
                prop_assert!(e.aliases.len() <= 32);
                prop_assert!(e.ports.len() <= 16);
                for (i, p) in e.ports.iter().enumerate() {
                    let n = p.name.as_bytes();
                    prop_assert!((1..=15).contains(&n.len()) && n[0].is_ascii_lowercase());
                    prop_assert!(n
                        .iter()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
                    prop_assert!(p.port != 0);
                    prop_assert!(e.ports[..i]
                        .iter()
                        .all(|q| (&q.name, q.protocol) != (&p.name, p.protocol)));
                }
                let names = e.name.iter().chain(&e.service).chain(&e.aliases);
                prop_assert!(names.into_iter().all(|n| dns_ok(n)), "{:?}", e);
            }
            for (k, m) in &c.mesh {
                prop_assert_eq!(k, &m.address.to_string());
                prop_assert!(network_ok(&m.node) && mesh.contains(&m.address));
                let key = base64::engine::general_purpose::STANDARD.decode(&m.public_key);
                prop_assert!(key.is_ok_and(|k| k.len() == 32));
                prop_assert!(unicast(*m.endpoint.ip()) && m.endpoint.port() != 0);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            for (k, g) in &c.gone {
                prop_assert_eq!(k, &g.node);
                prop_assert!(network_ok(&g.node) && g.since <= now + 3600, "{:?}", g);
            }
            Ok(())
        }

        /// Whether the view holds `key` (under its kind, without the prefix), and
        /// the record there is what `bytes` say.
        fn holds(c: &Cluster, key: &str, bytes: &[u8]) -> Option<bool> {
            fn same<T: PartialEq + for<'de> serde::Deserialize<'de>>(
                map: &BTreeMap<String, T>,
                k: &str,
                bytes: &[u8],
            ) -> Option<bool> {
                let r = map.get(k)?;
                Some(serde_json::from_slice::<T>(bytes).is_ok_and(|d| &d == r))
            }
            if let Some(k) = key.strip_prefix(NODES) {
                same(&c.nodes, k, bytes)
            } else if let Some(k) = key.strip_prefix(NETWORKS) {
                same(&c.networks, k, bytes)
            } else if let Some(k) = key.strip_prefix(BLOCKS) {
                same(&c.blocks, k, bytes)
            } else if let Some(k) = key.strip_prefix(ENDPOINTS) {
                same(&c.endpoints, k, bytes)
            } else if let Some(k) = key.strip_prefix(MESH) {
                same(&c.mesh, k, bytes)
            } else if let Some(k) = key.strip_prefix(GONE) {
                same(&c.gone, k, bytes)
            } else {
                None
            }
        }

        fn kinds(c: &Cluster) -> usize {
            c.nodes.len()
                + c.networks.len()
                + c.blocks.len()
                + c.endpoints.len()
                + c.mesh.len()
                + c.gone.len()
        }

        proptest! {
            #![proptest_config(Config {
                cases: 8_000,
                failure_persistence: None,
                ..Config::default()
            })]

            /// Writes and deletions in any order: the view keeps exactly the last
            /// value of each key when it passes its checks, names it as rejected
            /// otherwise, and everything it keeps satisfies every rule.
            #[test]
            fn fuzz_store_records(changes in proptest::collection::vec(change(), 1..10)) {
                let changes: Vec<Change> = changes
                    .into_iter()
                    .map(|(key, value)| Change { key, value })
                    .collect();
                let mut c = Cluster::default();
                c.apply(&changes);
                assert_view(&c)?;
                let mut last: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
                for ch in &changes {
                    last.insert(&ch.key, ch.value.as_deref());
                }
                let mut kept = 0;
                for (key, value) in &last {
                    let rejected = c.rejected.contains_key(*key);
                    if *key == NETWORKS_GUARD {
                        prop_assert_eq!(c.networks_guard.as_deref(), *value);
                        continue;
                    }
                    let Some(bytes) = value else {
                        prop_assert!(!rejected);
                        continue;
                    };
                    match holds(&c, key, bytes) {
                        Some(same) => {
                            prop_assert!(same && !rejected, "{} kept something else", key);
                            prop_assert!(bytes.len() <= MAX_RECORD_BYTES);
                            kept += 1;
                        }
                        None => {
                            let kind = [NODES, NETWORKS, BLOCKS, ENDPOINTS, MESH, GONE]
                                .iter()
                                .any(|p| key.starts_with(p));
                            prop_assert_eq!(rejected, kind, "{}", key);
                        }
                    }
                }
                prop_assert_eq!(kinds(&c), kept, "records under keys never written");
                // The same writes in one full read agree.
                let loaded = crate::store::Loaded {
                    revision: 1,
                    pairs: last
                        .iter()
                        .filter_map(|(k, v)| Some((k.to_string(), (*v)?.to_vec())))
                        .collect(),
                };
                let full = Cluster::from_loaded(&loaded);
                prop_assert_eq!(kinds(&full), kept);
                // Keys, not reasons: a reason may quote this host's clock, which
                // can tick between the two.
                prop_assert!(full.rejected.keys().eq(c.rejected.keys()));
            }
        }
    }
}
