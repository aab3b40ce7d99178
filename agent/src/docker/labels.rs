//! What a container's labels ask for: which networks, under which service name and
//! aliases. Pure; the daemon decides whether the networks exist.
//!
//! - `netagent.network=NAME[,NAME...]`: the networks to join (no label: leave alone);
//! - `netagent.service=NAME`, else Compose's `com.docker.compose.service`: the
//!   service name all replicas share (`db`, `echo_api`);
//! - `netagent.aliases=a,b`: more names;
//! - `netagent.dns=one-per-answer`: the service's name answers one replica at a time;
//! - `netagent.ports=http:8080,dns:53/udp`: named ports, answered as DNS SRV records.

use std::collections::HashMap;

use crate::ipam;
use crate::model::{Port, PORT_FORM};
use crate::names::check_dns_name;
use crate::record_check::check_ports;

pub const NETWORK: &str = "netagent.network";
pub const SERVICE: &str = "netagent.service";
pub const ALIASES: &str = "netagent.aliases";
pub const DNS: &str = "netagent.dns";
pub const PORTS: &str = "netagent.ports";
/// The one value of `netagent.dns` (rotation of every replica is the default).
pub const ONE_PER_ANSWER: &str = "one-per-answer";
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub networks: Vec<String>,
    pub service: Option<String>,
    pub aliases: Vec<String>,
    /// `netagent.dns=one-per-answer`.
    pub one_per_answer: bool,
    /// `netagent.ports`.
    pub ports: Vec<Port>,
}

/// Whether a label key is one netagent reads.
pub fn is_ours(key: &str) -> bool {
    [NETWORK, SERVICE, ALIASES, DNS, PORTS, COMPOSE_SERVICE].contains(&key)
}

/// The service name a container answers to without any netagent label.
pub fn service_of(labels: &HashMap<String, String>) -> Option<String> {
    labels
        .get(SERVICE)
        .or_else(|| labels.get(COMPOSE_SERVICE))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The ports of `netagent.ports` (none without the label). `Err`: what is wrong,
/// naming the label and the form expected.
pub fn ports_of(labels: &HashMap<String, String>) -> Result<Vec<Port>, String> {
    let Some(raw) = labels.get(PORTS) else {
        return Ok(Vec::new());
    };
    let mut ports: Vec<Port> = Vec::new();
    for item in split(PORTS, raw)? {
        let port: Port = item
            .parse()
            .map_err(|e| format!("label {PORTS}={raw:?}: {e}"))?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    check_ports(&ports).map_err(|e| {
        format!("label {PORTS}={raw:?}: {e}; write a comma-separated list of {PORT_FORM}")
    })?;
    Ok(ports)
}

/// `Ok(None)`: no `netagent.network` label. `Err`: what is wrong, naming the label.
pub fn wanted(labels: &HashMap<String, String>) -> Result<Option<Wanted>, String> {
    let Some(raw) = labels.get(NETWORK) else {
        return Ok(None);
    };
    let mut networks = Vec::new();
    for n in split(NETWORK, raw)? {
        if !ipam::valid_name(&n) {
            return Err(format!(
                "label {NETWORK}={raw:?}: {n:?} is not a network name (letters, digits, '_', '-', '.')"
            ));
        }
        if !networks.contains(&n) {
            networks.push(n);
        }
    }
    let service = service_of(labels);
    if let Some(s) = &service {
        check_dns_name("service", s).map_err(|e| format!("label {SERVICE}: {e}"))?;
    }
    let mut aliases = Vec::new();
    if let Some(raw) = labels.get(ALIASES) {
        for a in split(ALIASES, raw)? {
            check_dns_name("alias", &a).map_err(|e| format!("label {ALIASES}={raw:?}: {e}"))?;
            if !aliases.contains(&a) {
                aliases.push(a);
            }
        }
    }
    let one_per_answer = match labels.get(DNS).map(|v| v.trim()) {
        None => false,
        Some(ONE_PER_ANSWER) => true,
        Some(other) => {
            return Err(format!(
                "label {DNS}={other:?}: the only mode is {ONE_PER_ANSWER:?} (leave the label out for every replica per answer)"
            ))
        }
    };
    let ports = ports_of(labels)?;
    Ok(Some(Wanted {
        networks,
        service,
        aliases,
        one_per_answer,
        ports,
    }))
}

/// A comma-separated list with no empty entry (`a,,b` and `a,` are mistakes).
fn split(label: &str, raw: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> = raw.split(',').map(|s| s.trim().to_owned()).collect();
    if items.iter().any(String::is_empty) {
        return Err(format!(
            "label {label}={raw:?} has an empty entry; write names separated by single commas"
        ));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_networks_service_and_aliases() {
        assert_eq!(wanted(&labels(&[("other", "x")])), Ok(None));
        let w = wanted(&labels(&[
            (NETWORK, "app-net, backend,app-net"),
            (COMPOSE_SERVICE, "echo_api"),
            (ALIASES, "api,echo"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.networks, ["app-net", "backend"]);
        assert_eq!(w.service.as_deref(), Some("echo_api"));
        assert_eq!(w.aliases, ["api", "echo"]);
        // Our label wins over Compose's.
        let w = wanted(&labels(&[
            (NETWORK, "app"),
            (COMPOSE_SERVICE, "web"),
            (SERVICE, "db"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.service.as_deref(), Some("db"));
        assert!(!w.one_per_answer);
        let w = wanted(&labels(&[(NETWORK, "app"), (DNS, " one-per-answer")]))
            .unwrap()
            .unwrap();
        assert!(w.one_per_answer);
    }

    #[test]
    fn reads_ports() {
        let w = wanted(&labels(&[
            (NETWORK, "app"),
            (PORTS, "http:8080, metrics:9100,dns:53/udp,http:8080"),
        ]))
        .unwrap()
        .unwrap();
        let ports: Vec<(&str, u16, crate::model::Protocol)> = w
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        use crate::model::Protocol::{Tcp, Udp};
        assert_eq!(
            ports,
            [
                ("http", 8080, Tcp),
                ("metrics", 9100, Tcp),
                ("dns", 53, Udp)
            ]
        );
        assert!(is_ours(PORTS));
        assert_eq!(ports_of(&labels(&[])), Ok(vec![]));
    }

    #[test]
    fn names_what_is_wrong_with_ports() {
        for (value, why) in [
            (
                "http",
                "\"http\" is not a port; write NAME:PORT or NAME:PORT/udp",
            ),
            ("http:80,", "has an empty entry"),
            ("http:0", "port \"http\" is 0"),
            ("http:65536", "is not a port"),
            ("http:80/sctp", "is not a port"),
            ("HTTP:80", "is not a service name"),
            ("http:80,http:81", "port \"http\" is named twice"),
        ] {
            let e = wanted(&labels(&[(NETWORK, "app"), (PORTS, value)])).unwrap_err();
            assert!(e.contains("label netagent.ports"), "{e}");
            assert!(e.contains(why), "{value}: {e}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("p{i}:{}", 1000 + i)).collect();
        let e = ports_of(&labels(&[(PORTS, &many.join(","))])).unwrap_err();
        assert!(e.contains("17 ports, more than 16"), "{e}");
    }

    #[test]
    fn names_what_is_wrong() {
        let e = wanted(&labels(&[(NETWORK, "app,,b")])).unwrap_err();
        assert!(
            e.contains("netagent.network=\"app,,b\" has an empty entry"),
            "{e}"
        );
        let e = wanted(&labels(&[(NETWORK, "app"), (ALIASES, "a,")])).unwrap_err();
        assert!(
            e.contains("netagent.aliases=\"a,\" has an empty entry"),
            "{e}"
        );
        let e = wanted(&labels(&[(NETWORK, "app"), (ALIASES, "a b")])).unwrap_err();
        assert!(e.contains("alias \"a b\" is not a usable DNS name"), "{e}");
        let e = wanted(&labels(&[(NETWORK, "app/x")])).unwrap_err();
        assert!(e.contains("\"app/x\" is not a network name"), "{e}");
        let e = wanted(&labels(&[(NETWORK, "app"), (SERVICE, "my db")])).unwrap_err();
        assert!(e.contains("label netagent.service"), "{e}");
        let e = wanted(&labels(&[(NETWORK, "app"), (DNS, "round-robin")])).unwrap_err();
        assert!(
            e.contains("label netagent.dns=\"round-robin\": the only mode is \"one-per-answer\""),
            "{e}"
        );
    }

    /// Container labels are written by whoever starts a container: any map of
    /// strings reaches `wanted`.
    mod fuzz {
        use proptest::prelude::*;
        use proptest::test_runner::Config;

        use super::*;
        use crate::names::documented::{dns_ok, network_ok};

        /// Items of a list label as the user wrote them, trimmed.
        fn items(raw: &str) -> Vec<&str> {
            raw.split(',').map(str::trim).collect()
        }

        /// A list entry: good names, near misses, whitespace, Unicode, long ones.
        fn entry() -> impl Strategy<Value = String> {
            prop_oneof![
                6 => prop::sample::select(vec![
                    "app-net", "backend", "db", "echo_api", "a.b", "x", "1", "App_Net",
                ])
                .prop_map(String::from),
                2 => prop::sample::select(vec![
                    "", " ", "-a", ".", "_", "a b", "a/b", "a\tb", "é", "ａ", "a\u{0}b",
                    "\u{2003}db\u{2003}", "a,b", " db ", "\n",
                ])
                .prop_map(String::from),
                2 => "[a-z0-9_.-]{60,70}",
                2 => any::<String>(),
            ]
        }

        fn list() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => proptest::collection::vec(entry(), 1..5).prop_map(|v| v.join(",")),
                1 => "[ ,a-z]{0,20}",
                1 => any::<String>(),
                1 => "[a-z]{1,8}".prop_map(|s| s.repeat(2_000)),
            ]
        }

        fn label_map() -> impl Strategy<Value = HashMap<String, String>> {
            let key = prop_oneof![
                Just(NETWORK.to_string()),
                Just(SERVICE.to_string()),
                Just(ALIASES.to_string()),
                Just(COMPOSE_SERVICE.to_string()),
                Just(DNS.to_string()),
                Just(PORTS.to_string()),
                Just("netagent.networks".to_string()),
                any::<String>(),
            ];
            proptest::collection::hash_map(key, list(), 0..6)
        }

        proptest! {
            #![proptest_config(Config {
                cases: 20_000,
                failure_persistence: None,
                ..Config::default()
            })]

            #[test]
            fn fuzz_labels(labels in label_map()) {
                let service = service_of(&labels);
                if let Some(s) = &service {
                    prop_assert!(!s.is_empty() && s.trim() == s);
                }
                for k in labels.keys() {
                    let _ = is_ours(k);
                }
                match wanted(&labels) {
                    Ok(None) => prop_assert!(!labels.contains_key(NETWORK)),
                    Err(e) => prop_assert!(e.contains("label netagent."), "{}", e),
                    Ok(Some(w)) => {
                        let raw = &labels[NETWORK];
                        prop_assert!(!w.networks.is_empty());
                        let mut want: Vec<&str> = Vec::new();
                        for n in items(raw) {
                            if !want.contains(&n) {
                                want.push(n);
                            }
                        }
                        prop_assert_eq!(&w.networks, &want);
                        prop_assert!(w.networks.iter().all(|n| network_ok(n)), "{:?}", w.networks);
                        prop_assert_eq!(&w.service, &service);
                        prop_assert!(w.service.iter().all(|s| dns_ok(s)));
                        let want: Vec<&str> = labels.get(ALIASES).map(|r| items(r)).unwrap_or_default();
                        prop_assert!(w.aliases.iter().all(|a| dns_ok(a) && want.contains(&a.as_str())));
                        prop_assert!(want.iter().all(|a| w.aliases.iter().any(|b| b == a)));
                        let mut unique = w.aliases.clone();
                        unique.sort();
                        unique.dedup();
                        prop_assert_eq!(unique.len(), w.aliases.len());
                        prop_assert!(w.ports.len() <= 16 && w.ports.iter().all(|p| p.port != 0));
                        prop_assert_eq!(w.ports.is_empty(), !labels.contains_key(PORTS));
                        prop_assert_eq!(
                            w.one_per_answer,
                            labels.get(DNS).is_some_and(|v| v.trim() == ONE_PER_ANSWER)
                        );
                    }
                }
            }
        }
    }
}
