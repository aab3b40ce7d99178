//! The cluster store: a small key-value interface that both etcd (many hosts) and a
//! local file (one host) provide. Keys are relative to the store's prefix; values are
//! JSON. Everything the agent knows about the cluster is rebuilt from `load` plus the
//! changes `watch` delivers, so a restart or a reconnect never trusts a stale cache.

mod backoff;
mod etcd;
mod etcd_credentials;
mod local;

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub use etcd::EtcdStore;
pub use etcd_credentials::{ClientCertificate, EtcdCredentials, EtcdUser};
pub use local::LocalStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster store {endpoint} unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("local store {path}: {reason}")]
    Local { path: String, reason: String },
    /// A certificate, key or password file the etcd connection needs.
    #[error("{key} {path}: {reason}")]
    Credentials {
        key: &'static str,
        path: String,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Every key under the prefix, at one revision.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub revision: i64,
    pub pairs: Vec<(String, Vec<u8>)>,
}

/// One key changed: `value` None means deleted (or its lease expired).
#[derive(Clone, Debug)]
pub struct Change {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// What a watch delivers: a full picture first (and again after every reconnect,
/// since changes may have been missed), then changes in revision order.
#[derive(Debug)]
pub enum StoreEvent {
    Reset(Loaded),
    /// Changes up to and including `revision`.
    Changes {
        revision: i64,
        changes: Vec<Change>,
    },
}

/// A condition a transaction checks before writing.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key holds exactly this value.
    Value(String, Vec<u8>),
}

#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub put: Vec<(String, Vec<u8>)>,
    pub delete: Vec<String>,
    /// Keys deleted together with everything under them.
    pub delete_prefix: Vec<String>,
}

impl Txn {
    pub fn when(mut self, c: Compare) -> Self {
        self.when.push(c);
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.put.push((key.into(), value));
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.delete.push(key.into());
        self
    }
    pub fn delete_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.delete_prefix.push(prefix.into());
        self
    }
}

/// Health as `netagent status` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreHealth {
    pub kind: String,
    pub location: String,
    pub connected: bool,
    /// Last error while disconnected.
    pub error: Option<String>,
    /// How the store is reached; None from an agent too old to say.
    #[serde(default)]
    pub transport: Option<StoreTransport>,
    /// Times the connection came back after being lost.
    #[serde(default)]
    pub reconnects: u64,
    /// Whether it was ever connected (a first connection is not a reconnect).
    #[serde(default)]
    pub ever_connected: bool,
}

/// How the agent reaches its store, for `status` and the start-up warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreTransport {
    /// The embedded file store: nothing crosses the network.
    Local,
    /// etcd over plain `http://`: whoever reaches the endpoint reads and writes the
    /// cluster, and the underlay sees every record.
    Plaintext,
    /// etcd over TLS, its certificate checked against `ca_file`, no client certificate.
    Tls,
    /// etcd over TLS with this host's client certificate.
    MutualTls,
}

pub trait Store: Send + Sync + 'static {
    /// Every key under the prefix and the revision it was read at.
    fn load(&self) -> impl Future<Output = Result<Loaded>> + Send;

    /// Writes `put`/`delete` if every `when` holds: the store's revision after the
    /// write, or None if a condition did not hold.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Starts delivering the store's contents and changes; reconnects by itself,
    /// resuming after the last change delivered where the store still has the
    /// history, and otherwise beginning again with a fresh `Reset`.
    fn watch(&self) -> mpsc::Receiver<StoreEvent>;

    /// Keeps `key` present while this agent lives, under a lease of `ttl` where the
    /// store has leases; re-registers by itself after an outage outlived the lease.
    fn register(&self, key: String, value: Vec<u8>, ttl: Duration);

    /// Health for `status`: connected or why not.
    fn health(&self) -> watch::Receiver<StoreHealth>;
}
