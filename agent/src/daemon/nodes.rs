//! The nodes the store knows of, and what a dead one leaves behind. A node is up while
//! its lease key `nodes/<node>` lives and gone without it; a gone node keeps its
//! blocks, endpoints and mesh record (a restart finds its addresses again) until an
//! operator removes them (`node rm`) or it has been gone `[store] reclaim_after_secs`.
//!
//! Since when a node is gone is agreed through `gone/<node>`: the first agent to see
//! the node without its lease writes it, create-if-absent, and any agent deletes it
//! once the node is back. Removal and reclaim are guarded transactions: the node key
//! must still be absent, so a node coming back at that moment keeps what it holds;
//! a reclaim also needs the gone record unchanged, so agents racing reclaim once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Result};
use tracing::{debug, info, warn};

use super::datapath::Datapath;
use super::Agent;
use crate::api::{NodeBlock, NodeEndpoint, NodeInfo, NodeState};
use crate::config::StoreConfig;
use crate::model::{self, Cluster, GoneRecord, MeshRecord};
use crate::store::{self, Compare, Store, Txn};

/// How often gone nodes are looked for (in the cached view: no store read unless
/// something is to be written).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Most operations in one store transaction: etcd refuses more than 128 by default.
/// A node with more records loses them in several transactions, each guarded.
const MAX_TXN_OPS: usize = 100;
/// Bytes of keys and compared values in one transaction: etcd refuses requests over
/// 1.5 MiB by default (`--max-request-bytes`).
const MAX_TXN_BYTES: usize = 1 << 20;

/// The store as read for one decision: its checked records, and the exact bytes of
/// each gone record (by node), which a guard compares.
pub(super) struct Fresh {
    pub cluster: Cluster,
    pub gone_raw: BTreeMap<String, Vec<u8>>,
    /// Every record's bytes as read: a deletion is guarded on them, so a block
    /// another host claimed since the read is never taken from it.
    pub raw: BTreeMap<String, Vec<u8>>,
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every node with a node key, a block, an endpoint, a mesh record or a gone record.
fn known_nodes(c: &Cluster) -> BTreeSet<String> {
    let mut known: BTreeSet<String> = c.nodes.keys().cloned().collect();
    known.extend(c.blocks.values().map(|b| b.node.clone()));
    known.extend(c.endpoints.values().map(|e| e.node.clone()));
    known.extend(c.mesh.values().map(|m| m.node.clone()));
    known.extend(c.gone.keys().cloned());
    known
}

/// The keys of what `node` holds: endpoints first, then blocks, then its mesh record
/// (a removal in several steps takes the addresses' users before the addresses).
fn holdings(c: &Cluster, node: &str) -> Vec<String> {
    let endpoints = c
        .endpoints
        .values()
        .filter(|e| e.node == node)
        .map(|e| model::endpoint_key(&e.network, e.address));
    let blocks = c
        .blocks
        .values()
        .filter(|b| b.node == node)
        .map(|b| model::block_key(&b.network, b.block));
    let mesh = c
        .mesh
        .values()
        .filter(|m| m.node == node)
        .map(|m| model::mesh_key(m.address));
    endpoints.chain(blocks).chain(mesh).collect()
}

fn node_info(c: &Cluster, name: &str, now: u64, reclaim_after: Option<Duration>) -> NodeInfo {
    let record = c.nodes.get(name);
    let gone_since = match record {
        Some(_) => None,
        None => c.gone.get(name).map(|g| g.since),
    };
    let blocks: Vec<&model::BlockRecord> = c.blocks.values().filter(|b| b.node == name).collect();
    let mesh = c.mesh_of(name);
    NodeInfo {
        name: name.to_owned(),
        state: if record.is_some() {
            NodeState::Up
        } else {
            NodeState::Gone
        },
        started: record.map(|n| n.started),
        gone_since,
        reclaim_in_secs: gone_since
            .zip(reclaim_after)
            .map(|(since, after)| after.as_secs().saturating_sub(now.saturating_sub(since))),
        underlay: record
            .map(|n| n.underlay)
            .or_else(|| blocks.first().map(|b| b.underlay))
            .or_else(|| mesh.map(|m| *m.endpoint.ip())),
        blocks: blocks
            .iter()
            .map(|b| NodeBlock {
                network: b.network.clone(),
                block: b.block,
            })
            .collect(),
        endpoints: c
            .endpoints
            .values()
            .filter(|e| e.node == name)
            .map(|e| NodeEndpoint {
                network: e.network.clone(),
                address: e.address,
                name: e.name.clone(),
            })
            .collect(),
        mesh_address: mesh.map(|m| m.address),
    }
}

/// What the gone-node pass found in the view.
#[derive(Default)]
struct GoneWork {
    /// Gone, and no agent has noted since when.
    unnoted: Vec<String>,
    /// Gone, with a gone record that fails its checks: noted again.
    unreadable: Vec<String>,
    /// Back (or this host): their gone record goes.
    back: Vec<String>,
    /// Gone longer than the reclaim delay.
    due: Vec<String>,
}

impl<S: Store, D: Datapath> Agent<S, D> {
    /// Every node the store knows of, as this host's view has them.
    pub fn list_nodes(&self) -> Vec<NodeInfo> {
        let now = unix_now();
        self.view.read(|c| {
            known_nodes(c)
                .iter()
                .map(|n| node_info(c, n, now, self.cfg.reclaim_after))
                .collect()
        })
    }

    /// Removes a gone node's blocks, endpoints, mesh record and gone record from the
    /// store; every agent drops its routes and names through the watch.
    pub async fn remove_node(&self, name: &str) -> Result<NodeInfo> {
        if name == self.node.name {
            bail!(
                "{name:?} is this host, and its agent holds its records; run this from another host once this agent is stopped and its lease expired, or stop the agent and run: netagent reset"
            );
        }
        let fresh = self
            .read_fresh()
            .await
            .map_err(|e| anyhow!("{e}; nodes cannot be removed while the store is away"))?;
        let c = &fresh.cluster;
        if !known_nodes(c).contains(name) {
            bail!("node {name:?} is not known to the store; see the nodes it knows with: netagent node ls");
        }
        if c.is_alive(name) {
            bail!(
                "node {name:?} is up (its lease in the store lives); stop the agent on {name}, or wait for its lease to expire ({} s after its agent stopped), then run this again",
                self.lease_ttl().as_secs()
            );
        }
        let info = node_info(c, name, unix_now(), self.cfg.reclaim_after);
        let guard = vec![Compare::Absent(model::node_key(name))];
        if !self.forget_node(&fresh, name, guard).await? {
            bail!("node {name:?} came back while being removed; it keeps what it holds");
        }
        info!(
            node = name,
            blocks = ?info.blocks.iter().map(|b| b.block).collect::<Vec<_>>(),
            endpoints = ?info.endpoints.iter().map(|e| e.address).collect::<Vec<_>>(),
            "node removed: its blocks, endpoints and mesh record are gone from the store"
        );
        Ok(info)
    }

    /// Notes nodes that went, forgets the note of nodes that came back, and reclaims
    /// what nodes gone too long hold, for ever.
    pub(super) async fn gone_nodes_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut mesh_address_taken = false;
        loop {
            tick.tick().await;
            self.follow_gone_nodes().await;
            self.restore_own_mesh_record(&mut mesh_address_taken).await;
        }
    }

    async fn follow_gone_nodes(&self) {
        let now = unix_now();
        let work = self.view.read(|c| self.gone_work(c, now));
        for node in &work.back {
            let txn = Txn::default().delete(model::gone_key(node));
            if let Err(e) = self.view.commit(txn).await {
                debug!(node, error = %e, "cannot forget that the node was gone yet");
            }
        }
        for node in &work.unnoted {
            self.note_gone(node, now, None).await;
        }
        if work.unreadable.is_empty() && work.due.is_empty() {
            return;
        }
        let fresh = match self.read_fresh().await {
            Ok(fresh) => fresh,
            Err(e) => {
                debug!(error = %e, "cannot read the store for gone nodes yet");
                return;
            }
        };
        for node in &work.unreadable {
            if let Some(raw) = fresh.gone_raw.get(node) {
                warn!(
                    node,
                    "unreadable gone record (see status); noting the node gone from now"
                );
                self.note_gone(node, now, Some(raw.clone())).await;
            }
        }
        let Some(after) = self.cfg.reclaim_after else {
            return;
        };
        for node in &work.due {
            if let Err(e) = self.reclaim(&fresh, node, after, now).await {
                warn!(node, error = %e, "cannot reclaim the gone node's addresses yet");
            }
        }
    }

    fn gone_work(&self, c: &Cluster, now: u64) -> GoneWork {
        let mut work = GoneWork::default();
        let me = self.node.name.as_str();
        let unreadable = |n: &str| c.rejected.contains_key(&model::gone_key(n));
        for node in known_nodes(c) {
            let noted = c.gone.get(&node);
            if node == me || c.is_alive(&node) {
                if noted.is_some() || unreadable(&node) {
                    work.back.push(node);
                }
            } else if unreadable(&node) {
                work.unreadable.push(node);
            } else if let Some(g) = noted {
                let due = self
                    .cfg
                    .reclaim_after
                    .is_some_and(|after| now >= g.since.saturating_add(after.as_secs()));
                if due {
                    work.due.push(node);
                }
            } else {
                work.unnoted.push(node);
            }
        }
        // An unreadable gone record of a node known by nothing else.
        for key in c.rejected.keys() {
            if let Some(node) = key.strip_prefix(model::GONE) {
                if !work.back.iter().chain(&work.unreadable).any(|n| n == node)
                    && node != me
                    && !c.is_alive(node)
                {
                    work.unreadable.push(node.to_owned());
                }
            }
        }
        work
    }

    /// Writes since when `node` is gone, if no agent did and it is still gone
    /// (`replacing`: the unreadable record there now).
    async fn note_gone(&self, node: &str, now: u64, replacing: Option<Vec<u8>>) {
        let key = model::gone_key(node);
        let record = GoneRecord {
            node: node.to_owned(),
            since: now,
        };
        let guard = match replacing {
            Some(raw) => Compare::Value(key.clone(), raw),
            None => Compare::Absent(key.clone()),
        };
        let txn = Txn::default()
            .when(guard)
            .when(Compare::Absent(model::node_key(node)))
            .put(key, model::encode(&record));
        match self.view.commit(txn).await {
            Ok(true) => match self.cfg.reclaim_after {
                Some(after) => info!(
                    node,
                    "node gone (its lease expired); its addresses are reclaimed if it is not back within {} s",
                    after.as_secs()
                ),
                None => info!(node, "node gone (its lease expired)"),
            },
            // Another agent noted it first, or it is back.
            Ok(false) => {}
            Err(e) => debug!(node, error = %e, "cannot note the node gone yet"),
        }
    }

    /// Reclaims what `node` holds if `fresh` shows it gone for longer than `after`.
    /// Returns the node as it was when this agent did it; None when it was not due
    /// or another agent (or the node's return) came first.
    pub(super) async fn reclaim(
        &self,
        fresh: &Fresh,
        node: &str,
        after: Duration,
        now: u64,
    ) -> store::Result<Option<NodeInfo>> {
        let c = &fresh.cluster;
        let (Some(gone), Some(raw)) = (c.gone.get(node), fresh.gone_raw.get(node)) else {
            return Ok(None);
        };
        if node == self.node.name
            || c.is_alive(node)
            || now < gone.since.saturating_add(after.as_secs())
        {
            return Ok(None);
        }
        let info = node_info(c, node, now, None);
        let guard = vec![
            Compare::Absent(model::node_key(node)),
            Compare::Value(model::gone_key(node), raw.clone()),
        ];
        if !self.forget_node(fresh, node, guard).await? {
            return Ok(None);
        }
        info!(
            node,
            gone_for_secs = now.saturating_sub(gone.since),
            blocks = ?info.blocks.iter().map(|b| b.block).collect::<Vec<_>>(),
            endpoints = ?info.endpoints.iter().map(|e| e.address).collect::<Vec<_>>(),
            "reclaimed a gone node's blocks, endpoints and mesh record"
        );
        Ok(Some(info))
    }

    /// Deletes what `node` holds and its gone record, each transaction under
    /// `guard`. Beyond [`MAX_TXN_OPS`] or [`MAX_TXN_BYTES`] the first transactions take endpoints and
    /// blocks (deleting them twice is harmless); the last one, with the gone record,
    /// decides. False: a guard failed.
    async fn forget_node(
        &self,
        fresh: &Fresh,
        node: &str,
        guard: Vec<Compare>,
    ) -> store::Result<bool> {
        let mut keys = holdings(&fresh.cluster, node);
        let gone = model::gone_key(node);
        keys.push(gone.clone());
        // Batches within etcd's operation count and request size (each compare
        // carries its record's bytes); the gone record, last, is in the last batch.
        let room = MAX_TXN_OPS - guard.len();
        let mut batches: Vec<&[String]> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, key) in keys.iter().enumerate() {
            let size = key.len() * 2 + fresh.raw.get(key).map_or(0, Vec::len);
            if i > start && (i - start == room || bytes + size > MAX_TXN_BYTES) {
                batches.push(&keys[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        batches.push(&keys[start..]);
        for batch in batches {
            let mut txn = Txn {
                when: guard.clone(),
                ..Txn::default()
            };
            for key in batch {
                if let Some(bytes) = fresh.raw.get(key).filter(|_| *key != gone) {
                    txn = txn.when(Compare::Value(key.clone(), bytes.clone()));
                }
                txn = txn.delete(key.clone());
            }
            if !self.view.commit(txn).await? {
                return Ok(false);
            }
        }
        // The watch says so too; this host need not wait for it.
        self.publish_dns();
        self.reconcile.notify_one();
        Ok(true)
    }

    /// The store as it is now, with the gone records' bytes.
    pub(super) async fn read_fresh(&self) -> store::Result<Fresh> {
        let loaded = self.view.store().load().await?;
        let gone_raw = loaded
            .pairs
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(model::GONE)?.to_owned(), v.clone())))
            .collect();
        Ok(Fresh {
            cluster: Cluster::from_loaded(&loaded),
            gone_raw,
            raw: loaded.pairs.into_iter().collect(),
        })
    }

    /// A mesh running here whose record left the store (this host was reclaimed
    /// while cut off from it) is published again at its address, if still free.
    /// `taken`: the address was found taken, and said so once.
    async fn restore_own_mesh_record(&self, taken: &mut bool) {
        let Some(address) = self.mesh.address() else {
            return;
        };
        if self.view.read(|c| c.mesh_of(&self.node.name).is_some()) {
            return;
        }
        let key = model::mesh_key(address);
        let record = MeshRecord {
            node: self.node.name.clone(),
            address,
            public_key: self.mesh.public_key(),
            endpoint: SocketAddrV4::new(self.node.underlay, self.cfg.mesh_port),
        };
        let txn = Txn::default()
            .when(Compare::Absent(key.clone()))
            .put(key, model::encode(&record));
        match self.view.commit(txn).await {
            Ok(true) => {
                *taken = false;
                info!(%address, "this host's mesh record had left the store; published again");
            }
            Ok(false) if !*taken => {
                *taken = true;
                warn!(%address, "this host's mesh address went to another host while this one was away; restart the agent to take a new one");
            }
            Ok(false) => {}
            Err(e) => debug!(error = %e, "cannot publish this host's mesh record yet"),
        }
    }

    /// How long a stopped agent's lease outlives it.
    fn lease_ttl(&self) -> Duration {
        match &self.cfg.store {
            StoreConfig::Etcd { lease_ttl, .. } => *lease_ttl,
            StoreConfig::Local => Duration::from_secs(5),
        }
    }
}
