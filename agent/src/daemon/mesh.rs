//! The encrypted mesh as the agent runs it. This host's WireGuard key lives in the
//! state directory (mode 0600) and nowhere else: not in a log, the API or the store;
//! the store has the public key, the mesh address (taken create-if-absent, like a
//! block) and the endpoint. The datapath starts when this host first holds a block
//! of an encrypted network, and its peer set follows the other hosts' records.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use netagent_overlay::{KeyPair, MeshPeer};
use tracing::{info, warn};

use super::Agent;
use crate::model::{self, MeshRecord};
use crate::store::{Change, Compare, Store, Txn};

const KEY_FILE: &str = "wireguard.key";

pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEY_FILE)
}

/// This host's key pair: read from the state directory, or made and saved on the
/// first start.
pub(super) async fn load_or_create_key(state_dir: &Path) -> Result<KeyPair> {
    let path = key_path(state_dir);
    match tokio::fs::read_to_string(&path).await {
        Ok(text) => {
            tighten_key_mode(&path).await?;
            let bytes = decode_key(text.trim()).ok_or_else(|| {
                    anyhow!(
                        "{} is not a WireGuard private key (base64 of 32 bytes); remove it to have a new one made",
                        path.display()
                    )
                })?;
            Ok(KeyPair::from_private(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keys = KeyPair::generate().context("cannot make a WireGuard key")?;
            write_key(&path, &keys).await?;
            info!(path = %path.display(), "made this host's WireGuard key");
            Ok(keys)
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

/// A key file that others may read (copied in, or restored from a backup) is made
/// root's alone again, with a warning: the key may have leaked and can be rotated.
async fn tighten_key_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = tokio::fs::metadata(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "WireGuard key file was readable by others; made 0600 (rotate it with: netagent rotate-key)"
        );
        tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .await
            .with_context(|| format!("cannot make {} mode 0600", path.display()))?;
    }
    Ok(())
}

/// Writes the private key readable by root alone, replacing the file whole.
async fn write_key(path: &Path, keys: &KeyPair) -> Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("new");
    let _ = tokio::fs::remove_file(&tmp).await;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    tokio::io::AsyncWriteExt::write_all(&mut f, B64.encode(keys.private_bytes()).as_bytes())
        .await?;
    f.sync_all().await?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

pub fn encode_key(key: &[u8; 32]) -> String {
    B64.encode(key)
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    B64.decode(text).ok()?.try_into().ok()
}

/// Every other host's mesh record as a peer of `node`, with the VNIs of the encrypted
/// networks that both hold a block of.
fn mesh_peers(c: &model::Cluster, node: &str) -> Vec<MeshPeer> {
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

impl<S: Store> Agent<S> {
    /// This host's mesh address while the mesh runs.
    pub(super) fn mesh_address(&self) -> Option<Ipv4Addr> {
        self.mesh.lock().unwrap().as_ref().map(|m| m.address)
    }

    /// Starts the mesh when this host holds a block of an encrypted network, and
    /// keeps its peers in line with the store (`mesh_address` tells whether it runs).
    pub(super) async fn ensure_mesh(&self) {
        self.drop_failed_mesh().await;
        if self.mesh_address().is_some() {
            self.sync_mesh_peers();
            return;
        }
        let needed = {
            let c = self.cluster.read().unwrap();
            c.networks
                .values()
                .filter(|n| n.encrypted)
                .any(|n| c.blocks_of(&n.name).any(|b| b.node == self.node.name))
        };
        if !needed {
            return;
        }
        // Attach and reconcile may both get here first; one starts it.
        let _starting = self.mesh_starting.lock().await;
        if self.mesh_address().is_some() {
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
        let failure = self.mesh.lock().unwrap().as_ref().and_then(|m| m.failure());
        let Some(why) = failure else {
            return;
        };
        let _starting = self.mesh_starting.lock().await;
        let Some(old) = self.mesh.lock().unwrap().take() else {
            return;
        };
        warn!(
            reason = why,
            "encrypted mesh datapath stopped; starting it again"
        );
        // Dropping joins the datapath threads: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        self.mesh_restarted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn start_mesh(&self) -> Result<()> {
        let record = self.publish_mesh_record().await?;
        let keys = self.keys.lock().unwrap().clone();
        let mesh = self
            .host
            .start_mesh(
                keys,
                &self.underlay,
                record.address,
                model::mesh_subnet().prefix_len(),
                netagent_overlay::MeshOptions {
                    listen_port: self.cfg.mesh_port,
                    tunnel_offload: self.cfg.mesh_tunnel_offload,
                },
                {
                    let reconcile = self.reconcile.clone();
                    std::sync::Arc::new(move || reconcile.notify_one())
                },
            )
            .await?;
        info!(address = %record.address, public_key = record.public_key, listen = %record.endpoint, "encrypted mesh up");
        *self.mesh.lock().unwrap() = Some(mesh);
        self.sync_mesh_peers();
        Ok(())
    }

    /// Puts this host's mesh record (address, public key, endpoint) in the store,
    /// taking a free mesh address the first time.
    async fn publish_mesh_record(&self) -> Result<MeshRecord> {
        let public_key = encode_key(&self.keys.lock().unwrap().public());
        let endpoint = SocketAddrV4::new(self.node.underlay, self.cfg.mesh_port);
        for _ in 0..8 {
            let (mine, taken) = {
                let c = self.cluster.read().unwrap();
                let taken: BTreeSet<Ipv4Addr> = c.mesh.values().map(|m| m.address).collect();
                (c.mesh_of(&self.node.name).cloned(), taken)
            };
            let record = match &mine {
                Some(m) => MeshRecord {
                    public_key: public_key.clone(),
                    endpoint,
                    ..m.clone()
                },
                None => MeshRecord {
                    node: self.node.name.clone(),
                    address: model::mesh_subnet()
                        .hosts()
                        .find(|a| !taken.contains(a))
                        .ok_or_else(|| anyhow!("the mesh's addresses are all taken"))?,
                    public_key: public_key.clone(),
                    endpoint,
                },
            };
            if mine.as_ref() == Some(&record) {
                return Ok(record);
            }
            let key = model::mesh_key(record.address);
            let bytes = model::encode(&record);
            let mut txn = Txn::default().put(key.clone(), bytes.clone());
            if mine.is_none() {
                txn = txn.when(Compare::Absent(key.clone()));
            }
            if self
                .store
                .txn(txn)
                .await
                .map_err(|e| anyhow!("{e}; the mesh record cannot be published"))?
            {
                self.cluster.write().unwrap().apply(&[Change {
                    key,
                    value: Some(bytes),
                }]);
                return Ok(record);
            }
            let loaded = self.store.load().await?;
            *self.cluster.write().unwrap() = model::Cluster::from_loaded(&loaded);
        }
        bail!("could not take a mesh address after 8 tries (hosts racing); retrying later")
    }

    /// Every other host's mesh record becomes a peer (a changed key or endpoint is
    /// taken over; an unchanged peer keeps its session), scoped to the encrypted
    /// networks both hosts hold a block of: a network gaining or losing a host's block
    /// widens or narrows what that host may send here on the next store change.
    pub(super) fn sync_mesh_peers(&self) {
        let peers: Vec<MeshPeer> = {
            let c = self.cluster.read().unwrap();
            mesh_peers(&c, &self.node.name)
        };
        if let Some(mesh) = self.mesh.lock().unwrap().as_ref() {
            mesh.set_peers(&peers);
        }
    }

    /// Replaces this host's key: saved first, then used, then published; peers take
    /// the new public key from the store and handshake again.
    pub async fn rotate_key(&self) -> Result<serde_json::Value> {
        let keys = KeyPair::generate().context("cannot make a WireGuard key")?;
        write_key(&key_path(&self.cfg.state_dir), &keys).await?;
        *self.keys.lock().unwrap() = keys.clone();
        if let Some(mesh) = self.mesh.lock().unwrap().as_ref() {
            mesh.set_keys(keys.clone());
        }
        let public_key = encode_key(&keys.public());
        let published = self
            .cluster
            .read()
            .unwrap()
            .mesh_of(&self.node.name)
            .is_some();
        if published {
            self.publish_mesh_record().await?;
        }
        info!(public_key, "WireGuard key rotated");
        Ok(serde_json::json!({ "public_key": public_key }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_file_others_can_read_is_made_root_only_and_still_loads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("netagent-key-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = load_or_create_key(&dir).await.unwrap();
        let path = key_path(&dir);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let again = load_or_create_key(&dir).await.unwrap();
        assert_eq!(again.public(), first.public());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
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
