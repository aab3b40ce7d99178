//! What a container's labels ask for: which networks, under which service name and
//! aliases. Pure; the daemon decides whether the networks exist.
//!
//! - `netagent.network=NAME[,NAME...]`: the networks to join (no label: leave alone);
//! - `netagent.service=NAME`, else Compose's `com.docker.compose.service`: the
//!   service name all replicas share (`db`, `echo_api`);
//! - `netagent.aliases=a,b`: more names.

use std::collections::HashMap;

use crate::ipam;
use crate::names::check_dns_name;

pub const NETWORK: &str = "netagent.network";
pub const SERVICE: &str = "netagent.service";
pub const ALIASES: &str = "netagent.aliases";
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub networks: Vec<String>,
    pub service: Option<String>,
    pub aliases: Vec<String>,
}

/// Whether a label key is one netagent reads.
pub fn is_ours(key: &str) -> bool {
    [NETWORK, SERVICE, ALIASES, COMPOSE_SERVICE].contains(&key)
}

/// The service name a container answers to without any netagent label.
pub fn service_of(labels: &HashMap<String, String>) -> Option<String> {
    labels
        .get(SERVICE)
        .or_else(|| labels.get(COMPOSE_SERVICE))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
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
    Ok(Some(Wanted {
        networks,
        service,
        aliases,
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
    }
}
