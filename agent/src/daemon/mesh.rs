//! The encrypted mesh as the agent runs it. The store has this host's public key,
//! mesh address (claimed like a block) and endpoint; the private key stays in the
//! state directory (`keys.rs`). The datapath starts when this host first holds a
//! block of an encrypted network, and its peer set follows the other hosts' records.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use netagent_overlay::{KeyPair, MeshPeer};
use tracing::{info, warn};

use super::cluster_view::{Claim, ClaimError};
use super::datapath::{Datapath, MeshDatapath};
use super::keys::{decode_key, encode_key, key_path, write_key};
use super::Agent;
use crate::api::KeyInfo;
use crate::model::{self, MeshRecord};
use crate::store::Store;

/// The mesh's state on this host.
pub struct MeshState {
    /// This host's key pair (private half: here and in its file only).
    keys: Mutex<KeyPair>,
    running: Mutex<Option<Box<dyn MeshDatapath>>>,
    /// Attach and reconcile may both start it; one does.
    starting: tokio::sync::Mutex<()>,
    /// Started again: the next reconcile applies in full (the VXLAN devices of
    /// encrypted networks went with the old device).
    restarted: AtomicBool,
    /// Whether a datapath runs, for what follows it (the UAPI socket).
    up: tokio::sync::watch::Sender<bool>,
}

impl MeshState {
    pub fn new(keys: KeyPair) -> Self {
        MeshState {
            keys: Mutex::new(keys),
            running: Mutex::new(None),
            starting: tokio::sync::Mutex::new(()),
            restarted: AtomicBool::new(false),
            up: tokio::sync::watch::Sender::new(false),
        }
    }

    /// This host's mesh address while the mesh runs.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.running.lock().unwrap().as_ref().map(|m| m.address())
    }

    pub fn public_key(&self) -> String {
        encode_key(&self.keys.lock().unwrap().public())
    }

    /// Follows whether the datapath runs.
    pub fn watch_running(&self) -> tokio::sync::watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Whether the mesh was started again since the last call.
    pub fn take_restarted(&self) -> bool {
        self.restarted.swap(false, Ordering::Relaxed)
    }

    pub fn stats(&self) -> Vec<netagent_overlay::PeerStats> {
        self.running
            .lock()
            .unwrap()
            .as_ref()
            .map(|m| m.stats())
            .unwrap_or_default()
    }

    /// The running datapath's drops by reason; nothing while none runs.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.running
            .lock()
            .unwrap()
            .as_ref()
            .map(|m| m.dropped())
            .unwrap_or_default()
    }

    fn set_peers(&self, peers: &[MeshPeer]) {
        if let Some(mesh) = self.running.lock().unwrap().as_ref() {
            mesh.set_peers(peers);
        }
    }
}

/// Every other host's mesh record as a peer of `node`, with the VNIs of the encrypted
/// networks that both hold a block of.
pub(super) fn mesh_peers(c: &model::Cluster, node: &str) -> Vec<MeshPeer> {
    let holds = |network: &str, host: &str| c.blocks_of(network).any(|b| b.node == host);
    let shared: Vec<(&str, u32)> = c
        .networks
        .values()
        .filter(|n| n.encrypted && holds(&n.name, node))
        .map(|n| (n.name.as_str(), n.vni))
        .collect();
    c.mesh
        .values()
        .filter(|m| m.node != node)
        .filter_map(|m| {
            Some(MeshPeer {
                public_key: decode_key(&m.public_key)?,
                endpoint: m.endpoint,
                address: m.address,
                vnis: shared
                    .iter()
                    .filter(|(network, _)| holds(network, &m.node))
                    .map(|(_, vni)| *vni)
                    .collect(),
            })
        })
        .collect()
}

impl<S: Store, D: Datapath> Agent<S, D> {
    /// Starts the mesh when this host holds a block of an encrypted network, and
    /// keeps its peers in line with the store (`MeshState::address` tells whether
    /// it runs).
    pub(super) async fn ensure_mesh(&self) {
        self.drop_failed_mesh().await;
        if self.mesh.address().is_some() {
            self.sync_mesh_peers();
            return;
        }
        let needed = self.view.read(|c| {
            c.networks
                .values()
                .filter(|n| n.encrypted)
                .any(|n| c.blocks_of(&n.name).any(|b| b.node == self.node.name))
        });
        if !needed {
            return;
        }
        let _starting = self.mesh.starting.lock().await;
        if self.mesh.address().is_some() {
            return;
        }
        if let Err(e) = self.start_mesh().await {
            warn!(
                error = format!("{e:#}"),
                "encrypted mesh not started; encrypted networks wait"
            );
        }
    }

    /// A datapath that stopped by itself (its device deleted under it, a thread's
    /// panic) is taken down here, so that `ensure_mesh` starts a new one.
    async fn drop_failed_mesh(&self) {
        let failed = |m: &MeshState| m.running.lock().unwrap().as_ref().and_then(|m| m.failure());
        if failed(&self.mesh).is_none() {
            return;
        }
        let _starting = self.mesh.starting.lock().await;
        let Some(why) = failed(&self.mesh) else {
            return;
        };
        let Some(old) = self.mesh.running.lock().unwrap().take() else {
            return;
        };
        warn!(
            reason = why,
            "encrypted mesh datapath stopped; starting it again"
        );
        self.mesh.up.send_replace(false);
        self.datapath.stop_mesh(old).await;
        self.mesh.restarted.store(true, Ordering::Relaxed);
    }

    async fn start_mesh(&self) -> Result<()> {
        let record = self.publish_mesh_record().await?;
        let keys = self.mesh.keys.lock().unwrap().clone();
        let reconcile = self.reconcile.clone();
        let mesh = self
            .datapath
            .start_mesh(
                keys,
                record.address,
                model::mesh_subnet().prefix_len(),
                netagent_overlay::MeshOptions {
                    listen_port: self.cfg.mesh_port,
                    tunnel_offload: self.cfg.mesh_tunnel_offload,
                },
                std::sync::Arc::new(move || reconcile.notify_one()),
            )
            .await?;
        info!(address = %record.address, public_key = record.public_key, listen = %record.endpoint, "encrypted mesh up");
        *self.mesh.running.lock().unwrap() = Some(mesh);
        self.mesh.up.send_replace(true);
        self.sync_mesh_peers();
        Ok(())
    }

    /// Puts this host's mesh record (address, public key, endpoint) in the store,
    /// taking a free mesh address the first time.
    async fn publish_mesh_record(&self) -> Result<MeshRecord> {
        let public_key = self.mesh.public_key();
        let endpoint = SocketAddrV4::new(self.node.underlay, self.cfg.mesh_port);
        let node = &self.node.name;
        let claimed = self
            .view
            .claim(8, |c| {
                let mine = c.mesh_of(node).cloned();
                let record = match &mine {
                    Some(m) => MeshRecord {
                        public_key: public_key.clone(),
                        endpoint,
                        ..m.clone()
                    },
                    None => {
                        let taken: BTreeSet<Ipv4Addr> =
                            c.mesh.values().map(|m| m.address).collect();
                        MeshRecord {
                            node: node.clone(),
                            address: model::mesh_subnet()
                                .hosts()
                                .find(|a| !taken.contains(a))
                                .ok_or_else(|| anyhow!("the mesh's addresses are all taken"))?,
                            public_key: public_key.clone(),
                            endpoint,
                        }
                    }
                };
                if mine.as_ref() == Some(&record) {
                    return Ok(Claim::Held(record));
                }
                Ok(Claim::Write {
                    key: model::mesh_key(record.address),
                    bytes: model::encode(&record),
                    only_if_absent: mine.is_none(),
                    value: record,
                })
            })
            .await;
        claimed.map_err(|e| match e {
            ClaimError::Refused(e) => e,
            ClaimError::Store(e) => anyhow!("{e}; the mesh record cannot be published"),
            e @ ClaimError::Contended(_) => anyhow!("mesh address: {e}; retrying later"),
        })
    }

    /// Every other host's mesh record becomes a peer (a changed key or endpoint is
    /// taken over; an unchanged peer keeps its session), scoped to the encrypted
    /// networks both hosts hold a block of: a network gaining or losing a host's block
    /// widens or narrows what that host may send here on the next store change.
    pub(super) fn sync_mesh_peers(&self) {
        let peers = self.view.read(|c| mesh_peers(c, &self.node.name));
        self.mesh.set_peers(&peers);
    }

    /// Replaces this host's key: saved first, then used, then published; peers take
    /// the new public key from the store and handshake again.
    pub async fn rotate_key(&self) -> Result<KeyInfo> {
        let keys = KeyPair::generate().context("cannot make a WireGuard key")?;
        write_key(&key_path(&self.cfg.state_dir), &keys).await?;
        *self.mesh.keys.lock().unwrap() = keys.clone();
        if let Some(mesh) = self.mesh.running.lock().unwrap().as_ref() {
            mesh.set_keys(keys.clone());
        }
        let public_key = encode_key(&keys.public());
        if self.view.read(|c| c.mesh_of(&self.node.name).is_some()) {
            self.publish_mesh_record().await?;
        }
        info!(public_key, "WireGuard key rotated");
        Ok(KeyInfo { public_key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use model::{BlockRecord, Cluster, NetworkRecord};

    fn network(c: &mut Cluster, name: &str, vni: u32, encrypted: bool, nodes: &[&str]) {
        let subnet: ipnet::Ipv4Net = format!("100.{}.0.0/16", 60 + vni).parse().unwrap();
        c.networks.insert(
            name.into(),
            NetworkRecord {
                name: name.into(),
                subnet,
                vni,
                encrypted,
                mtu: None,
                block_prefix: 24,
            },
        );
        for (i, node) in nodes.iter().enumerate() {
            let block = ipnet::Ipv4Net::new(
                Ipv4Addr::from(u32::from(subnet.network()) + ((i as u32 + 1) << 8)),
                24,
            )
            .unwrap();
            c.blocks.insert(
                format!("{name}/{block}"),
                BlockRecord {
                    network: name.into(),
                    block,
                    node: (*node).into(),
                    underlay: Ipv4Addr::new(192, 0, 2, 10 + i as u8),
                },
            );
        }
    }

    fn mesh(c: &mut Cluster, node: &str, last: u8) {
        let address = Ipv4Addr::new(100, 127, 192, last);
        c.mesh.insert(
            address.to_string(),
            MeshRecord {
                node: node.into(),
                address,
                public_key: encode_key(&[last; 32]),
                endpoint: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, last), 51820),
            },
        );
    }

    #[test]
    fn a_peer_is_scoped_to_the_encrypted_networks_both_hosts_hold_a_block_of() {
        let mut c = Cluster::default();
        for (node, last) in [("h1", 1), ("h2", 2), ("h3", 3)] {
            mesh(&mut c, node, last);
        }
        network(&mut c, "a", 10, true, &["h1", "h2"]);
        network(&mut c, "b", 11, true, &["h2", "h3"]);
        network(&mut c, "c", 12, true, &["h1", "h2", "h3"]);
        network(&mut c, "plain", 13, false, &["h1", "h2", "h3"]);
        let vnis = |c: &Cluster, node: &str| -> Vec<(String, Vec<u32>)> {
            mesh_peers(c, node)
                .into_iter()
                .map(|p| (p.address.to_string(), p.vnis.into_iter().collect()))
                .collect()
        };
        assert_eq!(
            vnis(&c, "h2"),
            [
                ("100.127.192.1".to_owned(), vec![10, 12]),
                ("100.127.192.3".to_owned(), vec![11, 12]),
            ]
        );
        // h1 holds no block of b: h3 is its peer for c alone.
        assert_eq!(
            vnis(&c, "h1"),
            [
                ("100.127.192.2".to_owned(), vec![10, 12]),
                ("100.127.192.3".to_owned(), vec![12]),
            ]
        );
        // h3 takes a block of a: h1's scope for it widens.
        network(&mut c, "a", 10, true, &["h1", "h2", "h3"]);
        assert_eq!(vnis(&c, "h1")[1].1, vec![10, 12]);
    }
}
