//! What the store holds, key by key, and the cluster as this agent sees it: rebuilt
//! from a full read and kept current by the watch.
//!
//! Keys (under the store's prefix):
//! - `nodes/<node>`: a live agent, under its lease (gone when the lease expires);
//! - `networks/<name>`, guarded by `meta/networks` (a generation number that every
//!   create and remove bumps, so overlap checks see every other network);
//! - `blocks/<network>/<a.b.c.d_len>`: which host owns a block of the subnet,
//!   created only if absent, so no two hosts ever own the same addresses;
//! - `endpoints/<network>/<address>`: an attached namespace, written only by the
//!   host owning the block. Endpoints are not under the lease: they survive an agent
//!   restart, and other hosts answer only for endpoints of live nodes.
//! - `mesh/<address>`: a host's place on the encrypted mesh (its mesh address, taken
//!   create-if-absent like a block, its WireGuard public key and endpoint).
//! - `gone/<node>`: since when a node has been without its lease, written
//!   create-if-absent by the first agent to notice and deleted when it comes back; a
//!   node gone longer than `[store] reclaim_after_secs` loses its blocks, endpoints and
//!   mesh record in one transaction guarded by this record.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::record_check::{check_port, CheckRecord, MAX_RECORD_BYTES};
use crate::store::{Change, Loaded};

pub const NODES: &str = "nodes/";
pub const NETWORKS: &str = "networks/";
pub const NETWORKS_GUARD: &str = "meta/networks";
pub const BLOCKS: &str = "blocks/";
pub const ENDPOINTS: &str = "endpoints/";
pub const MESH: &str = "mesh/";
pub const GONE: &str = "gone/";

/// Addresses of the encrypted mesh (one per host, on `nawg0`); network subnets may
/// not overlap it.
pub const MESH_SUBNET: &str = "100.127.192.0/18";

pub fn mesh_subnet() -> Ipv4Net {
    MESH_SUBNET.parse().expect("valid mesh subnet")
}

pub fn node_key(node: &str) -> String {
    format!("{NODES}{node}")
}
pub fn network_key(name: &str) -> String {
    format!("{NETWORKS}{name}")
}
pub fn block_key(network: &str, block: Ipv4Net) -> String {
    format!(
        "{BLOCKS}{network}/{}_{}",
        block.network(),
        block.prefix_len()
    )
}
pub fn endpoint_key(network: &str, address: Ipv4Addr) -> String {
    format!("{ENDPOINTS}{network}/{address}")
}
pub fn mesh_key(address: Ipv4Addr) -> String {
    format!("{MESH}{address}")
}
pub fn gone_key(node: &str) -> String {
    format!("{GONE}{node}")
}

/// Since when a node has been without its lease, as the first agent to notice saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoneRecord {
    pub node: String,
    /// Unix seconds, by the clock of the agent that noticed.
    pub since: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshRecord {
    pub node: String,
    pub address: Ipv4Addr,
    /// WireGuard public key, base64 as `wg` writes it.
    pub public_key: String,
    /// Where its WireGuard socket listens.
    pub endpoint: std::net::SocketAddrV4,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub underlay: Ipv4Addr,
    pub version: String,
    /// Unix seconds when this agent started.
    pub started: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub name: String,
    pub subnet: Ipv4Net,
    pub vni: u32,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Prefix length of the blocks hosts take from the subnet.
    pub block_prefix: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub network: String,
    pub block: Ipv4Net,
    pub node: String,
    /// Where the owner's VXLAN endpoint is; kept even while the owner is down, so a
    /// partition heals in the datapath before the store catches up.
    pub underlay: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub network: String,
    pub address: Ipv4Addr,
    pub node: String,
    /// Stable identity of the attached namespace (`netns:NAME`, `pid:N`, container id).
    pub id: String,
    /// How the owning host reaches the namespace (`/run/netns/x`, `pid:N`).
    pub netns: String,
    /// Its own DNS name (container or namespace name), if any.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default = "yes")]
    pub in_service: bool,
    /// The Docker container this namespace belongs to (its full id), if any: its
    /// death and health events concern this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Its service's name answers one replica at a time (when any replica says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_per_answer: bool,
    /// Its named ports, answered as DNS SRV records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
}

/// A named port of an endpoint (`http:8080`, `dns:53/udp`): DNS answers
/// `_http._tcp.<service>` with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// An IANA-style service label: 1 to 15 lowercase letters, digits and '-',
    /// starting with a letter.
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// How a port is written on the command line and in the `netagent.ports` label.
pub const PORT_FORM: &str = "NAME:PORT or NAME:PORT/udp, such as http:8080 or dns:53/udp";

impl FromStr for Port {
    type Err = String;

    fn from_str(s: &str) -> Result<Port, String> {
        let bad = || format!("{s:?} is not a port; write {PORT_FORM}");
        let (name, rest) = s.trim().split_once(':').ok_or_else(bad)?;
        let (number, protocol) = match rest.split_once('/') {
            None => (rest, Protocol::Tcp),
            Some((n, "tcp")) => (n, Protocol::Tcp),
            Some((n, "udp")) => (n, Protocol::Udp),
            Some(_) => return Err(bad()),
        };
        let port = Port {
            name: name.to_owned(),
            port: number.parse().map_err(|_| bad())?,
            protocol,
        };
        check_port(&port)?;
        Ok(port)
    }
}

fn yes() -> bool {
    true
}

/// The cluster as the store describes it. Maps are keyed by the store key without
/// its kind (`nodes/h1` is `h1`; `endpoints/app/100.64.1.2` is `app/100.64.1.2`).
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub networks: BTreeMap<String, NetworkRecord>,
    pub blocks: BTreeMap<String, BlockRecord>,
    pub endpoints: BTreeMap<String, EndpointRecord>,
    pub mesh: BTreeMap<String, MeshRecord>,
    pub gone: BTreeMap<String, GoneRecord>,
    /// Value of `meta/networks` (None: no network was ever created).
    pub networks_guard: Option<Vec<u8>>,
    /// Records left out because they fail their checks, by full key: why.
    pub rejected: BTreeMap<String, String>,
    /// The store's revision this picture includes (0: unknown): a full read and
    /// every watch event after it; this host's own writes are mirrored without one.
    pub revision: i64,
}

impl Cluster {
    pub fn from_loaded(loaded: &Loaded) -> Self {
        let mut c = Cluster {
            revision: loaded.revision,
            ..Cluster::default()
        };
        for (k, v) in &loaded.pairs {
            c.set(k, Some(v));
        }
        c
    }

    /// The full keys the view holds under `prefix`, records left out included: what
    /// a prefix delete takes out of it.
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        under(&mut keys, NODES, &self.nodes, prefix);
        under(&mut keys, NETWORKS, &self.networks, prefix);
        under(&mut keys, BLOCKS, &self.blocks, prefix);
        under(&mut keys, ENDPOINTS, &self.endpoints, prefix);
        under(&mut keys, MESH, &self.mesh, prefix);
        under(&mut keys, GONE, &self.gone, prefix);
        under(&mut keys, "", &self.rejected, prefix);
        if self.networks_guard.is_some() && NETWORKS_GUARD.starts_with(prefix) {
            keys.push(NETWORKS_GUARD.to_owned());
        }
        keys.sort();
        keys.dedup();
        keys
    }

    pub fn apply(&mut self, changes: &[Change]) {
        for ch in changes {
            self.set(&ch.key, ch.value.as_deref());
        }
    }

    fn set(&mut self, key: &str, value: Option<&[u8]>) {
        self.rejected.remove(key);
        let rejected = &mut self.rejected;
        let outcome = if key == NETWORKS_GUARD {
            self.networks_guard = value.map(<[u8]>::to_vec);
            Ok(())
        } else if let Some(k) = key.strip_prefix(NODES) {
            put(&mut self.nodes, k, value)
        } else if let Some(k) = key.strip_prefix(NETWORKS) {
            put(&mut self.networks, k, value)
        } else if let Some(k) = key.strip_prefix(BLOCKS) {
            put(&mut self.blocks, k, value)
        } else if let Some(k) = key.strip_prefix(ENDPOINTS) {
            put(&mut self.endpoints, k, value)
        } else if let Some(k) = key.strip_prefix(MESH) {
            put(&mut self.mesh, k, value)
        } else if let Some(k) = key.strip_prefix(GONE) {
            put(&mut self.gone, k, value)
        } else {
            Ok(())
        };
        if let Err(why) = outcome {
            warn!(key, why, "store record left out");
            // Bounded: at most one entry per key the store holds.
            rejected.insert(key.to_owned(), why);
        }
    }

    pub fn mesh_of(&self, node: &str) -> Option<&MeshRecord> {
        self.mesh.values().find(|m| m.node == node)
    }

    pub fn is_alive(&self, node: &str) -> bool {
        self.nodes.contains_key(node)
    }

    pub fn blocks_of<'a>(&'a self, network: &'a str) -> impl Iterator<Item = &'a BlockRecord> {
        self.blocks.values().filter(move |b| b.network == network)
    }

    pub fn endpoints_of<'a>(
        &'a self,
        network: &'a str,
    ) -> impl Iterator<Item = &'a EndpointRecord> {
        self.endpoints
            .values()
            .filter(move |e| e.network == network)
    }
}

/// Decodes and checks one record into its map. A value this agent cannot read (a
/// newer agent may have written it) or that fails its checks is left out, and its
/// key's earlier record with it, rather than stopping the watch; `Err` says why.
fn put<T: for<'de> Deserialize<'de> + CheckRecord>(
    map: &mut BTreeMap<String, T>,
    key: &str,
    value: Option<&[u8]>,
) -> Result<(), String> {
    let Some(bytes) = value else {
        map.remove(key);
        return Ok(());
    };
    let record = if bytes.len() > MAX_RECORD_BYTES {
        Err(format!(
            "{} bytes, more than the {MAX_RECORD_BYTES} a record may have",
            bytes.len()
        ))
    } else {
        serde_json::from_slice::<T>(bytes)
            .map_err(|e| format!("unreadable: {e}"))
            .and_then(|r| r.check(key).map(|()| r))
    };
    match record {
        Ok(record) => {
            map.insert(key.to_owned(), record);
            Ok(())
        }
        Err(why) => {
            map.remove(key);
            Err(why)
        }
    }
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize")
}

/// Adds the keys of `map` (its keys are the full keys less `kind`) under `prefix`.
fn under<V>(keys: &mut Vec<String>, kind: &str, map: &BTreeMap<String, V>, prefix: &str) {
    let full = |k: &String| format!("{kind}{k}");
    if let Some(rest) = prefix.strip_prefix(kind) {
        let from = (std::ops::Bound::Included(rest), std::ops::Bound::Unbounded);
        keys.extend(
            map.range::<str, _>(from)
                .take_while(|(k, _)| k.starts_with(rest))
                .map(|(k, _)| full(k)),
        );
    } else if kind.starts_with(prefix) {
        keys.extend(map.keys().map(full));
    }
}
