//! Docker's legacy plugin API for a network driver and an IPAM driver, served on a
//! unix socket (e.g. `/run/docker/plugins/netagent.sock`).
//!
//! dockerd finds a plugin by the socket's name in its plugin directory, so
//! `docker network create -d netagent --ipam-driver netagent` works with no
//! `docker plugin install`: the agent already runs on the host, and a managed plugin
//! would be a second copy of it in a container.
//!
//! [`protocol`] holds the JSON bodies exactly as libnetwork sends and expects them;
//! [`server`] is the HTTP/1.1 server, which answers the handshake calls itself and
//! hands every other call to a [`Driver`]. Every call is bounded against a hostile
//! local client (connections, head and body sizes, deadlines): see [`server`].

mod http;
pub mod protocol;
pub mod server;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use protocol::{
    CreateEndpointRequest, CreateEndpointResponse, CreateNetworkRequest, DeleteEndpointRequest,
    DeleteNetworkRequest, EndpointInfoRequest, EndpointInfoResponse, JoinRequest, JoinResponse,
    LeaveRequest, ReleaseAddressRequest, ReleasePoolRequest, RequestAddressRequest,
    RequestAddressResponse, RequestPoolRequest, RequestPoolResponse,
};

/// Why the plugin socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "a plugin server already answers on {0}; stop it (another netagent?) or choose another socket path"
    )]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another socket path")]
    NotASocket(PathBuf),
    #[error("cannot create the plugin socket directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot check or remove the old plugin socket {path}: {source}")]
    Stale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on the plugin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a driver call answers: the reply, or the message Docker shows the user
/// (as `<Call>: <message>`).
pub type Reply<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// The calls Docker makes that the agent itself answers. `()` replies are sent as `{}`.
pub trait Driver: Send + Sync + 'static {
    fn request_pool(&self, r: RequestPoolRequest) -> Reply<'_, RequestPoolResponse>;
    fn release_pool(&self, r: ReleasePoolRequest) -> Reply<'_, ()>;
    fn request_address(&self, r: RequestAddressRequest) -> Reply<'_, RequestAddressResponse>;
    fn release_address(&self, r: ReleaseAddressRequest) -> Reply<'_, ()>;
    fn create_network(&self, r: CreateNetworkRequest) -> Reply<'_, ()>;
    fn delete_network(&self, r: DeleteNetworkRequest) -> Reply<'_, ()>;
    fn create_endpoint(&self, r: CreateEndpointRequest) -> Reply<'_, CreateEndpointResponse>;
    fn delete_endpoint(&self, r: DeleteEndpointRequest) -> Reply<'_, ()>;
    fn endpoint_info(&self, r: EndpointInfoRequest) -> Reply<'_, EndpointInfoResponse>;
    fn join(&self, r: JoinRequest) -> Reply<'_, JoinResponse>;
    fn leave(&self, r: LeaveRequest) -> Reply<'_, ()>;
}
