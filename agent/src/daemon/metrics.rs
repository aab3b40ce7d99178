//! The agent's metrics in the Prometheus text format, gathered at scrape time from
//! the parts that own them: the DNS server's counters (`netagent_dns::metrics`,
//! named after CoreDNS's), the cluster view, the reconciler, the mesh datapath
//! (named after Calico Felix's WireGuard series), the store and Docker links.
//!
//! Every label is bounded by the cluster, never by what a container sends: peers
//! and networks by the store's records, DNS types and codes by fixed lists,
//! upstreams by the configuration.

mod exposition;
mod histogram;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use exposition::{Exposition, Kind};
pub use histogram::Histogram;

use crate::api::PeerState;
use crate::store::{Store, StoreHealth};

use super::{Agent, Datapath};

impl<S: Store, D: Datapath> Agent<S, D> {
    /// Every series, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        let mut e = Exposition::default();
        build_info(&mut e);
        store(&mut e, &self.view.store().health().borrow());
        if let Some(docker) = &self.docker {
            e.family(
                "netagent_docker_connected",
                Kind::Gauge,
                "Whether the Docker engine answers (1) or not (0); absent when Docker integration is off.",
            );
            e.sample(
                "netagent_docker_connected",
                &[],
                bool_value(docker.status().connected),
            );
        }
        self.cluster_metrics(&mut e);
        self.reconcile_metrics(&mut e);
        self.mesh_metrics(&mut e);
        dns(&mut e, &netagent_dns::metrics::stats());
        e.finish()
    }

    fn cluster_metrics(&self, e: &mut Exposition) {
        let peers = self.peers();
        e.family(
            "netagent_peers",
            Kind::Gauge,
            "Other hosts of the cluster, by whether their lease in the store lives.",
        );
        for (state, name) in [(PeerState::Up, "up"), (PeerState::Down, "down")] {
            let n = peers.iter().filter(|p| p.state == state).count();
            e.sample("netagent_peers", &[("state", name)], n as f64);
        }
        e.family(
            "netagent_peer_rtt_seconds",
            Kind::Gauge,
            "Round trip to each live peer's gateway over the overlay, last probe.",
        );
        for p in &peers {
            if let Some(ms) = p.rtt_ms {
                e.sample(
                    "netagent_peer_rtt_seconds",
                    &[("peer", &p.name)],
                    ms / 1000.0,
                );
            }
        }
        let mut endpoints: BTreeMap<String, usize> = self
            .view
            .read(|c| c.networks.keys().map(|n| (n.clone(), 0)).collect());
        for ep in self.local.snapshot().values() {
            *endpoints.entry(ep.record.network.clone()).or_default() += 1;
        }
        e.family(
            "netagent_endpoints",
            Kind::Gauge,
            "Endpoints attached on this host, by network.",
        );
        for (network, n) in &endpoints {
            e.sample("netagent_endpoints", &[("network", network)], *n as f64);
        }
        let blocks = self.view.read(|c| {
            let mut blocks: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
            for b in c.blocks.values() {
                let state = if b.node == self.node.name {
                    "local"
                } else if c.is_alive(&b.node) {
                    "remote"
                } else {
                    "stale"
                };
                *blocks.entry((b.network.clone(), state)).or_default() += 1;
            }
            blocks
        });
        e.family(
            "netagent_blocks",
            Kind::Gauge,
            "Address blocks by network: held by this host (local), by a live peer (remote), or by a host whose lease expired (stale).",
        );
        for ((network, state), n) in &blocks {
            e.sample(
                "netagent_blocks",
                &[("network", network), ("state", state)],
                *n as f64,
            );
        }
    }

    fn reconcile_metrics(&self, e: &mut Exposition) {
        let (bounds, counts, sum) = self.reconciler.durations.get();
        e.family(
            "netagent_reconcile_duration_seconds",
            Kind::Histogram,
            "Time to make the kernel match the desired state, per datapath apply.",
        );
        e.histogram(
            "netagent_reconcile_duration_seconds",
            &[],
            bounds,
            &counts,
            sum,
        );
        e.family(
            "netagent_reconcile_errors_total",
            Kind::Counter,
            "Datapath applies that failed (retried on the next pass).",
        );
        let errors = self.reconciler.errors.load(Ordering::Relaxed);
        e.sample("netagent_reconcile_errors_total", &[], errors as f64);
    }

    /// The mesh's series, while its datapath runs.
    fn mesh_metrics(&self, e: &mut Exposition) {
        let dropped = self.mesh.dropped();
        if dropped.is_empty() {
            return;
        }
        let peers: Vec<_> = self
            .peers()
            .into_iter()
            .filter_map(|p| Some((p.name, p.mesh?)))
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        e.family(
            "netagent_mesh_peer_last_handshake_seconds",
            Kind::Gauge,
            "Unix time of the last completed WireGuard handshake with each peer (0: none yet).",
        );
        for (peer, m) in &peers {
            let at = m.handshake_secs.map_or(0, |ago| now.saturating_sub(ago));
            e.sample(
                "netagent_mesh_peer_last_handshake_seconds",
                &[("peer", peer)],
                at as f64,
            );
        }
        e.family(
            "netagent_mesh_peer_receive_bytes_total",
            Kind::Counter,
            "Bytes received from each mesh peer since the mesh started.",
        );
        for (peer, m) in &peers {
            e.sample(
                "netagent_mesh_peer_receive_bytes_total",
                &[("peer", peer)],
                m.rx_bytes as f64,
            );
        }
        e.family(
            "netagent_mesh_peer_transmit_bytes_total",
            Kind::Counter,
            "Bytes sent to each mesh peer since the mesh started.",
        );
        for (peer, m) in &peers {
            e.sample(
                "netagent_mesh_peer_transmit_bytes_total",
                &[("peer", peer)],
                m.tx_bytes as f64,
            );
        }
        e.family(
            "netagent_mesh_dropped_datagrams_total",
            Kind::Counter,
            "Received WireGuard datagrams (or packets inside) dropped since the mesh started, by reason.",
        );
        for (reason, n) in dropped {
            e.sample(
                "netagent_mesh_dropped_datagrams_total",
                &[("reason", reason)],
                n as f64,
            );
        }
    }
}

/// What can be said before the agent has read the store.
pub fn starting_metrics_text(health: &StoreHealth) -> String {
    let mut e = Exposition::default();
    build_info(&mut e);
    store(&mut e, health);
    e.finish()
}

fn build_info(e: &mut Exposition) {
    e.family(
        "netagent_build_info",
        Kind::Gauge,
        "Always 1; the agent's version as a label.",
    );
    e.sample(
        "netagent_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
}

fn store(e: &mut Exposition, health: &StoreHealth) {
    e.family(
        "netagent_store_connected",
        Kind::Gauge,
        "Whether the cluster store is reachable (1) or not (0).",
    );
    e.sample(
        "netagent_store_connected",
        &[],
        bool_value(health.connected),
    );
    e.family(
        "netagent_store_reconnects_total",
        Kind::Counter,
        "Times the connection to the cluster store came back after being lost.",
    );
    e.sample(
        "netagent_store_reconnects_total",
        &[],
        health.reconnects as f64,
    );
}

fn dns(e: &mut Exposition, s: &netagent_dns::metrics::DnsStats) {
    e.family(
        "netagent_dns_requests_total",
        Kind::Counter,
        "DNS queries received at 127.0.0.11, by transport and query type (types outside a fixed list are \"other\").",
    );
    for (proto, qtype, n) in &s.requests {
        e.sample(
            "netagent_dns_requests_total",
            &[("proto", proto), ("type", qtype)],
            *n as f64,
        );
    }
    e.family(
        "netagent_dns_responses_total",
        Kind::Counter,
        "DNS responses sent, by response code.",
    );
    for (rcode, n) in &s.responses {
        e.sample(
            "netagent_dns_responses_total",
            &[("rcode", rcode)],
            *n as f64,
        );
    }
    e.family(
        "netagent_dns_request_duration_seconds",
        Kind::Histogram,
        "Time from reading a DNS query to sending its response (a batch's answers share one time).",
    );
    e.histogram(
        "netagent_dns_request_duration_seconds",
        &[],
        &netagent_dns::metrics::DURATION_BUCKETS,
        &s.duration_buckets,
        s.duration_sum_seconds,
    );
    e.family(
        "netagent_dns_forward_requests_total",
        Kind::Counter,
        "Queries sent to upstream resolvers, by upstream and the response code that came back (\"timeout\" or \"error\" when none did).",
    );
    for (to, rcode, n) in &s.forwards {
        e.sample(
            "netagent_dns_forward_requests_total",
            &[("to", to), ("rcode", rcode)],
            *n as f64,
        );
    }
    e.family(
        "netagent_dns_cache_hits_total",
        Kind::Counter,
        "Forwarded names answered from the forwarder's cache.",
    );
    e.sample("netagent_dns_cache_hits_total", &[], s.cache_hits as f64);
    e.family(
        "netagent_dns_cache_misses_total",
        Kind::Counter,
        "Forwarded names not in the forwarder's cache.",
    );
    e.sample(
        "netagent_dns_cache_misses_total",
        &[],
        s.cache_misses as f64,
    );
}

fn bool_value(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starting_page_says_the_store_and_the_version() {
        let health = StoreHealth {
            kind: "etcd".into(),
            location: "https://192.0.2.1:2379".into(),
            connected: false,
            error: Some("refused".into()),
            transport: None,
            reconnects: 3,
            ever_connected: true,
        };
        let text = starting_metrics_text(&health);
        assert!(text.contains("\nnetagent_store_connected 0\n"), "{text}");
        assert!(
            text.contains("\nnetagent_store_reconnects_total 3\n"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "netagent_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("# TYPE netagent_store_reconnects_total counter\n"));
    }

    #[test]
    fn every_dns_family_has_help_type_and_bounded_samples() {
        let mut e = Exposition::default();
        dns(&mut e, &netagent_dns::metrics::stats());
        let text = e.finish();
        for family in [
            "netagent_dns_requests_total",
            "netagent_dns_responses_total",
            "netagent_dns_request_duration_seconds",
            "netagent_dns_forward_requests_total",
            "netagent_dns_cache_hits_total",
            "netagent_dns_cache_misses_total",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        assert!(text.contains("netagent_dns_requests_total{proto=\"udp\",type=\"other\"} "));
        assert!(text.contains("netagent_dns_request_duration_seconds_bucket{le=\"0.00025\"} "));
        assert!(text.contains("netagent_dns_request_duration_seconds_bucket{le=\"8.192\"} "));
        assert!(text.contains("netagent_dns_request_duration_seconds_bucket{le=\"+Inf\"} "));
    }
}
