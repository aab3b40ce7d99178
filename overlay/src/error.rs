//! The overlay crate's error type: every variant names the object, the namespace and
//! the operation, so a log line alone says what failed where.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid desired state: {0}")]
    Invalid(String),

    #[error("process {pid} not found: its network namespace cannot be opened (has the container exited?)")]
    NoSuchProcess { pid: u32 },

    #[error("network namespace {path} cannot be opened: {source}")]
    OpenNetns {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot listen on {addr} in namespace {ns}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        ns: String,
        source: std::io::Error,
    },

    #[error("entering network namespace {ns} failed: {source}")]
    EnterNetns { ns: String, source: nix::Error },

    #[error("{op} {object} in namespace {ns}: {message}")]
    Netlink {
        op: &'static str,
        object: String,
        ns: String,
        message: String,
    },

    #[error("network {network:?}: address {address} is already attached as endpoint {holder:?}; detach it first")]
    AddressInUse {
        network: String,
        address: std::net::Ipv4Addr,
        holder: String,
    },

    #[error("network {network:?} (VNI {vni}) is not set up on this host; apply it first")]
    UnknownNetwork { network: String, vni: u32 },

    #[error("underlay interface for {address} not found in namespace {ns}; give underlay_interface or add the address")]
    NoUnderlay {
        address: std::net::Ipv4Addr,
        ns: String,
    },

    #[error("encrypted mesh: {message}")]
    Mesh { message: String },

    #[error("firewall (nft) in namespace {ns}: {message}")]
    Firewall { ns: String, message: String },

    #[error("sysctl {key} in namespace {ns}: {source}")]
    Sysctl {
        key: String,
        ns: String,
        source: std::io::Error,
    },

    #[error("{count} operations failed: {}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Many { count: usize, errors: Vec<Error> },

    #[error("container file {path}: {why}; left untouched")]
    ContainerFile { path: String, why: String },

    #[error("namespace {ns} is no longer the one attached (identity {expected}, now {found}): the process exited and its pid was reused")]
    NetnsChanged {
        ns: String,
        expected: u64,
        found: u64,
    },

    #[error("namespace worker thread failed: {0}")]
    Worker(String),
}

impl Error {
    /// Folds a list of errors from a best-effort pass into one, or `Ok` when empty.
    pub fn collect(mut errors: Vec<Error>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            count => Err(Error::Many { count, errors }),
        }
    }
}
