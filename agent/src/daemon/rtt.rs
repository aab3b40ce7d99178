//! Round-trip times to peers, for `peers`, the metrics and the live page: one ICMP
//! probe over the overlay to a gateway of each peer. Probing every peer on every
//! round made the probes grow with the square of the cluster (at 100 hosts, 5,000
//! probes a second between them); each round now probes a bounded share of the
//! peers in turn, so a host's cost stays flat and a peer's figure is refreshed
//! every `ceil(peers / PER_ROUND)` rounds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use netagent_overlay::block_gateway;

use super::datapath::Datapath;
use super::Agent;
use crate::store::Store;

/// Time between rounds.
const ROUND: Duration = Duration::from_secs(2);
/// Peers probed per round: up to 16 peers each is measured every round.
const PER_ROUND: usize = 16;

impl<S: Store, D: Datapath> Agent<S, D> {
    pub(super) async fn rtt_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(ROUND);
        // The last peer probed: the next round starts after it.
        let mut after = String::new();
        loop {
            tick.tick().await;
            let peers = self.peer_gateways();
            let round = next_round(&peers, &after, PER_ROUND);
            if let Some((name, _)) = round.last() {
                after = name.clone();
            }
            let measured = self
                .datapath
                .rtt(
                    round.iter().map(|(_, g)| *g).collect(),
                    Duration::from_secs(1),
                )
                .await;
            let mut rtt = self.rtt.lock().unwrap();
            // Figures of peers that left go; the others keep theirs until probed again.
            rtt.retain(|node, _| peers.contains_key(node));
            for (node, gateway) in &round {
                match measured.get(gateway) {
                    Some(d) => rtt.insert(node.clone(), d.as_secs_f64() * 1000.0),
                    None => rtt.remove(node),
                };
            }
        }
    }

    /// One overlay gateway of every live peer sharing a network with this host, by
    /// peer name.
    fn peer_gateways(&self) -> BTreeMap<String, Ipv4Addr> {
        self.view.read(|c| {
            let mine: BTreeSet<&str> = c
                .blocks
                .values()
                .filter(|b| b.node == self.node.name)
                .map(|b| b.network.as_str())
                .collect();
            let mut gateways = BTreeMap::new();
            for b in c.blocks.values() {
                if b.node != self.node.name
                    && mine.contains(b.network.as_str())
                    && c.is_alive(&b.node)
                {
                    gateways
                        .entry(b.node.clone())
                        .or_insert_with(|| block_gateway(&b.block));
                }
            }
            gateways
        })
    }
}

/// The next `n` peers after `after` in name order, wrapping around.
fn next_round(
    peers: &BTreeMap<String, Ipv4Addr>,
    after: &str,
    n: usize,
) -> Vec<(String, Ipv4Addr)> {
    use std::ops::Bound::{Excluded, Unbounded};
    peers
        .range::<str, _>((Excluded(after), Unbounded))
        .chain(peers.iter())
        .take(n.min(peers.len()))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_take_every_peer_in_turn_and_never_one_twice() {
        let peers: BTreeMap<String, Ipv4Addr> = (0..5)
            .map(|i| (format!("h{i}"), Ipv4Addr::new(192, 0, 2, i)))
            .collect();
        let names = |r: Vec<(String, Ipv4Addr)>| r.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(next_round(&peers, "", 2)), ["h0", "h1"]);
        assert_eq!(names(next_round(&peers, "h1", 2)), ["h2", "h3"]);
        assert_eq!(names(next_round(&peers, "h3", 2)), ["h4", "h0"]);
        // A peer that left is no anchor: the round goes on after its place.
        assert_eq!(names(next_round(&peers, "h25", 2)), ["h3", "h4"]);
        // Fewer peers than a round: each once.
        assert_eq!(
            names(next_round(&peers, "h2", 16)),
            ["h3", "h4", "h0", "h1", "h2"]
        );
        assert!(next_round(&BTreeMap::new(), "", 16).is_empty());
    }
}
