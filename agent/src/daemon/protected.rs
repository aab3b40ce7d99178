//! Where containers must never reach on other hosts: every cluster host (its underlay
//! address and the encrypted mesh) and the cluster store. The overlay's firewall
//! drops overlay traffic forwarded to these; this host's own addresses are guarded
//! there already (nothing from the overlay reaches the host but replies).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use tracing::warn;

use crate::config::{Config, StoreConfig};
use crate::model::{self, Cluster};

/// The IPv4 addresses of the store's endpoints in `cfg`; names are resolved once.
pub(super) async fn store_addresses(cfg: &Config) -> Vec<Ipv4Addr> {
    let StoreConfig::Etcd { endpoints, .. } = &cfg.store else {
        return Vec::new();
    };
    let mut out = BTreeSet::new();
    for endpoint in endpoints {
        let Some((host, port)) = host_and_port(endpoint) else {
            warn!(
                endpoint,
                "cannot read the store endpoint's host; containers are not kept from it by address"
            );
            continue;
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            if let IpAddr::V4(v4) = ip {
                out.insert(v4);
            }
            continue;
        }
        let found = tokio::net::lookup_host(format!("{host}:{port}")).await;
        match found {
            Ok(found) => out.extend(found.filter_map(|a| match a.ip() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })),
            Err(e) => {
                warn!(endpoint, error = %e, "cannot resolve the store endpoint; containers are not kept from it by address")
            }
        }
    }
    out.into_iter().collect()
}

/// `http://host:port/...` → (host, port); the scheme's port when none is given.
fn host_and_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let default = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, tail) = v6.split_once(']')?;
        let port = tail
            .strip_prefix(':')
            .map_or(Some(default), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((authority.to_string(), default)),
    }
    .filter(|(host, _)| !host.is_empty())
}

/// Every host the cluster knows (live nodes and the owners of blocks) and the mesh's
/// whole subnet, plus the store's addresses.
pub(super) fn protected(cluster: &Cluster, store: &[Ipv4Addr]) -> Vec<Ipv4Net> {
    let mut addresses: BTreeSet<Ipv4Addr> = store.iter().copied().collect();
    addresses.extend(cluster.nodes.values().map(|n| n.underlay));
    addresses.extend(cluster.blocks.values().map(|b| b.underlay));
    addresses.extend(cluster.mesh.values().map(|m| m.address));
    let mut nets: Vec<Ipv4Net> = addresses.into_iter().map(Ipv4Net::from).collect();
    nets.push(model::mesh_subnet());
    Ipv4Net::aggregate(&nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts_are_read_from_urls() {
        let hp = |u: &str| host_and_port(u);
        assert_eq!(
            hp("http://192.0.2.2:2379"),
            Some(("192.0.2.2".into(), 2379))
        );
        assert_eq!(
            hp("https://etcd.example:2379/"),
            Some(("etcd.example".into(), 2379))
        );
        assert_eq!(hp("https://192.0.2.9"), Some(("192.0.2.9".into(), 443)));
        assert_eq!(
            hp("http://[2001:db8::1]:2379"),
            Some(("2001:db8::1".into(), 2379))
        );
        assert_eq!(hp("192.0.2.2:2379"), None);
        assert_eq!(hp("http://:2379"), None);
    }

    #[tokio::test]
    async fn store_addresses_come_from_the_config() {
        let cfg = Config::parse(
            "node = \"h1\"\n[store]\netcd = [\"http://192.0.2.2:2379\", \"http://192.0.2.3:2379\", \"http://[2001:db8::1]:2379\"]\n",
        )
        .unwrap();
        assert_eq!(
            store_addresses(&cfg).await,
            vec![Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)]
        );
        let local = Config::parse("node = \"h1\"\n").unwrap();
        assert!(store_addresses(&local).await.is_empty());
    }
}
