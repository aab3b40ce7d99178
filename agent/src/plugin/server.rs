//! The plugin socket's server: HTTP/1.1 on a unix socket, one task per connection,
//! each call `POST /<Call>` with a JSON body.
//!
//! The handshake calls (`Plugin.Activate`, the capabilities, the default address
//! spaces) and the calls netagent has nothing to do for (discovery, external
//! connectivity, swarm allocation) are answered here; the rest go to the [`Driver`].
//!
//! Bounds against a hostile local client: [`MAX_CONNECTIONS`] at once (one more is
//! closed as soon as it is accepted), a head of at most 8 KiB and a body of at most
//! 1 MiB, the whole request within 10 s of its first byte, each response written
//! within 10 s, and an idle connection closed after 60 s.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::http::{Connection, Limits};
use super::protocol::{
    ActivateResponse, AddressSpaces, ErrorResponse, IpamCapabilities, NetworkCapabilities,
};
use super::{Driver, PluginError, Reply};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The address space netagent's IPAM driver names for both scopes.
pub const ADDRESS_SPACE: &str = "netagent";
/// How much of a request body a debug log line shows.
const LOGGED_BODY: usize = 2 << 10;

const LIMITS: Limits = Limits {
    max_head: 8 << 10,
    max_body: 1 << 20,
    request_timeout: Duration::from_secs(10),
    write_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
};
/// After an answer sent before the request was read whole, how long and how much
/// of the rest is read and dropped, so the client reads the answer before the close.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 << 10;

/// The serving socket. Dropping it (or [`PluginServer::close`]) stops the server,
/// ends every connection, and removes the socket file if it is still this one.
pub struct PluginServer {
    path: PathBuf,
    /// (device, inode) of the socket file bound; None: systemd's socket.
    file: Option<(u64, u64)>,
    accept: Option<JoinHandle<()>>,
}

impl PluginServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server and waits until every connection has ended.
    pub async fn close(mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        // Drop removes the file.
    }
}

impl Drop for PluginServer {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            // The connections live in the accept task's JoinSet: they end with it.
            accept.abort();
        }
        // Another server may have replaced the file since: its socket is left alone.
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.file);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), error = %e, "cannot remove the plugin socket");
            }
        }
    }
}

/// Serves Docker's network and IPAM driver API on the unix socket `path`.
pub async fn serve(path: &Path, driver: Arc<dyn Driver>) -> Result<PluginServer, PluginError> {
    serve_with(path, driver, LIMITS, LINGER).await
}

/// Serves on a socket systemd listens on for the agent (socket activation): dockerd
/// can connect from boot, before the agent runs. The file stays systemd's.
pub fn serve_inherited(
    listener: std::os::unix::net::UnixListener,
    driver: Arc<dyn Driver>,
) -> Result<PluginServer, PluginError> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned))
        .unwrap_or_default();
    let listener = UnixListener::from_std(listener).map_err(|source| PluginError::Bind {
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "Docker plugin socket passed by systemd");
    let accept = tokio::spawn(accept_loop(listener, driver, LIMITS, LINGER));
    Ok(PluginServer {
        path,
        // No file of ours: nothing is removed on close.
        file: None,
        accept: Some(accept),
    })
}

async fn serve_with(
    path: &Path,
    driver: Arc<dyn Driver>,
    limits: Limits,
    linger: Duration,
) -> Result<PluginServer, PluginError> {
    let listener = bind(path).await?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| PluginError::Bind {
        path: path.to_owned(),
        source,
    })?;
    info!(path = %path.display(), "Docker plugin socket listening");
    let accept = tokio::spawn(accept_loop(listener, driver, limits, linger));
    Ok(PluginServer {
        path: path.to_owned(),
        file: Some((meta.dev(), meta.ino())),
        accept: Some(accept),
    })
}

/// Binds `path`: its directory made if missing, a stale socket (nothing answers on
/// it) replaced, a live one left alone.
async fn bind(path: &Path) -> Result<UnixListener, PluginError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| PluginError::Directory {
                path: dir.to_owned(),
                source,
            })?;
    }
    remove_if_stale(path).await?;
    let bind_error = |source| PluginError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    // Until this, the umask's mode applies; connecting takes write permission, which
    // root's usual umask (022) gives no one else either.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

async fn remove_if_stale(path: &Path) -> Result<(), PluginError> {
    let stale_error = |source| PluginError::Stale {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale_error(e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(PluginError::NotASocket(path.to_owned()))
        }
        Ok(_) => {}
    }
    // A server that accepts nothing still completes a connect (its backlog does);
    // one whose backlog is full makes connect wait: both are live.
    match tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing a stale plugin socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(stale_error(e)),
                _ => Ok(()),
            }
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(stale_error(e)),
        Ok(Ok(_)) | Err(_) => Err(PluginError::InUse(path.to_owned())),
    }
}

async fn accept_loop(
    listener: UnixListener,
    driver: Arc<dyn Driver>,
    limits: Limits,
    linger: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        connections.spawn(serve_connection(stream, slot, driver.clone(), limits, linger));
                    }
                    Err(_) => {
                        warn!("plugin socket: already {MAX_CONNECTIONS} connections; closing a new one");
                        drop(stream);
                    }
                },
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    warn!(error = %e, "plugin socket cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Requests on one connection until it closes; `_slot` is its place among
/// [`MAX_CONNECTIONS`].
async fn serve_connection(
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
    driver: Arc<dyn Driver>,
    limits: Limits,
    linger: Duration,
) {
    let mut conn = Connection::new(stream);
    loop {
        let request = match conn.read_request(&limits).await {
            Ok(request) => request,
            Err(e) => {
                if let Some((status, message)) = e.answer(&limits) {
                    warn!(status, error = %message, "plugin socket: request refused");
                    if conn
                        .respond(&limits, status, &error_body(message), true)
                        .await
                        .is_ok()
                    {
                        close_lingering(conn.stream, linger).await;
                    }
                }
                return;
            }
        };
        let (status, body) = if request.method == "POST" {
            answer(&request.path, &request.body, driver.as_ref()).await
        } else {
            let message = format!("{} {}: plugin calls are POST", request.method, request.path);
            warn!(error = %message, "plugin socket: request refused");
            (405, error_body(message))
        };
        if conn
            .respond(&limits, status, &body, request.close)
            .await
            .is_err()
            || request.close
        {
            return;
        }
    }
}

/// After an answer to a request not read whole: our side shut, then what the
/// client still sends is read and dropped for a moment (bounded), so it reads the
/// answer rather than a reset over unread bytes.
async fn close_lingering(mut stream: UnixStream, linger: Duration) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(linger, drain).await;
}

/// The status and JSON body answering `POST <path>`.
async fn answer(path: &str, body: &[u8], driver: &dyn Driver) -> (u16, Vec<u8>) {
    let call = path.strip_prefix('/').unwrap_or(path);
    debug!(call, body = %logged(body), "plugin call");
    let (status, reply) = match call {
        "Plugin.Activate" => json(&ActivateResponse {
            implements: vec!["NetworkDriver".into(), "IpamDriver".into()],
        }),
        "NetworkDriver.GetCapabilities" => json(&NetworkCapabilities {
            scope: "local".into(),
            connectivity_scope: "local".into(),
        }),
        "IpamDriver.GetCapabilities" => json(&IpamCapabilities {
            requires_mac_address: false,
            requires_request_replay: false,
        }),
        "IpamDriver.GetDefaultAddressSpaces" => json(&AddressSpaces {
            local_default_address_space: ADDRESS_SPACE.into(),
            global_default_address_space: ADDRESS_SPACE.into(),
        }),
        "NetworkDriver.DiscoverNew"
        | "NetworkDriver.DiscoverDelete"
        | "NetworkDriver.ProgramExternalConnectivity"
        | "NetworkDriver.RevokeExternalConnectivity"
        | "NetworkDriver.AllocateNetwork"
        | "NetworkDriver.FreeNetwork" => (200, b"{}".to_vec()),
        "IpamDriver.RequestPool" => to_driver(call, body, |r| driver.request_pool(r)).await,
        "IpamDriver.ReleasePool" => to_driver(call, body, |r| driver.release_pool(r)).await,
        "IpamDriver.RequestAddress" => to_driver(call, body, |r| driver.request_address(r)).await,
        "IpamDriver.ReleaseAddress" => to_driver(call, body, |r| driver.release_address(r)).await,
        "NetworkDriver.CreateNetwork" => to_driver(call, body, |r| driver.create_network(r)).await,
        "NetworkDriver.DeleteNetwork" => to_driver(call, body, |r| driver.delete_network(r)).await,
        "NetworkDriver.CreateEndpoint" => {
            to_driver(call, body, |r| driver.create_endpoint(r)).await
        }
        "NetworkDriver.DeleteEndpoint" => {
            to_driver(call, body, |r| driver.delete_endpoint(r)).await
        }
        "NetworkDriver.EndpointOperInfo" => {
            to_driver(call, body, |r| driver.endpoint_info(r)).await
        }
        "NetworkDriver.Join" => to_driver(call, body, |r| driver.join(r)).await,
        "NetworkDriver.Leave" => to_driver(call, body, |r| driver.leave(r)).await,
        _ => (
            404,
            error_body(format!(
                "unknown call {path}; netagent serves NetworkDriver and IpamDriver"
            )),
        ),
    };
    if status != 200 {
        warn!(call, status, reply = %String::from_utf8_lossy(&reply), "plugin call failed");
    }
    (status, reply)
}

/// Decodes the request, runs the driver's handler, encodes its reply.
async fn to_driver<'d, Req, Resp>(
    call: &str,
    body: &[u8],
    handler: impl FnOnce(Req) -> Reply<'d, Resp>,
) -> (u16, Vec<u8>)
where
    Req: DeserializeOwned,
    Resp: Serialize,
{
    // Go sends an empty body for a nil request; every field then takes its default.
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    let request: Req = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => return (400, error_body(format!("{call}: malformed request: {e}"))),
    };
    // A panicking handler fails its call, not the connection's task.
    match AssertUnwindSafe(async move { handler(request).await })
        .catch_unwind()
        .await
    {
        Ok(Ok(reply)) => json(&reply),
        Ok(Err(message)) if message.is_empty() => {
            (500, error_body(format!("{call} failed (no reason given)")))
        }
        Ok(Err(message)) => (500, error_body(message)),
        Err(_) => (
            500,
            error_body(format!("{call}: internal error; see netagent's log")),
        ),
    }
}

/// 200 and the reply; `()` is sent as `{}`.
fn json<T: Serialize>(reply: &T) -> (u16, Vec<u8>) {
    match serde_json::to_vec(reply) {
        Ok(body) if body == b"null" => (200, b"{}".to_vec()),
        Ok(body) => (200, body),
        Err(e) => (500, error_body(format!("cannot encode the reply: {e}"))),
    }
}

fn error_body(err: String) -> Vec<u8> {
    serde_json::to_vec(&ErrorResponse { err }).unwrap_or_else(|_| b"{\"Err\":\"error\"}".to_vec())
}

/// The body as a log shows it: at most [`LOGGED_BODY`] bytes.
fn logged(body: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&body[..body.len().min(LOGGED_BODY)]);
    if body.len() > LOGGED_BODY {
        format!("{shown}... ({} bytes)", body.len())
    } else {
        shown.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use serde_json::{json, Value};

    use super::*;
    use crate::plugin::protocol::*;

    /// Answers from the request, so a reply shows what was decoded.
    struct FakeDriver {
        /// `Leave` waits for a permit: a handler that runs long.
        leave_gate: Semaphore,
    }

    fn fake() -> Arc<FakeDriver> {
        Arc::new(FakeDriver {
            leave_gate: Semaphore::new(0),
        })
    }

    fn ready<'a, T: Send + 'a>(r: Result<T, String>) -> Reply<'a, T> {
        Box::pin(async move { r })
    }

    impl Driver for FakeDriver {
        fn request_pool(&self, r: RequestPoolRequest) -> Reply<'_, RequestPoolResponse> {
            ready(Ok(RequestPoolResponse {
                pool_id: format!("{}/{}", r.address_space, r.pool),
                pool: r.pool,
                data: HashMap::from([("v6".to_owned(), r.v6.to_string())]),
            }))
        }
        fn release_pool(&self, r: ReleasePoolRequest) -> Reply<'_, ()> {
            if r.pool_id == "busy" {
                ready(Err("pool busy still has endpoints".into()))
            } else {
                ready(Ok(()))
            }
        }
        fn request_address(&self, r: RequestAddressRequest) -> Reply<'_, RequestAddressResponse> {
            ready(Ok(RequestAddressResponse {
                address: format!("{}/24", r.address),
                data: HashMap::new(),
            }))
        }
        fn release_address(&self, _: ReleaseAddressRequest) -> Reply<'_, ()> {
            ready(Ok(()))
        }
        fn create_network(&self, _: CreateNetworkRequest) -> Reply<'_, ()> {
            ready(Ok(()))
        }
        fn delete_network(&self, _: DeleteNetworkRequest) -> Reply<'_, ()> {
            ready(Ok(()))
        }
        fn create_endpoint(&self, _: CreateEndpointRequest) -> Reply<'_, CreateEndpointResponse> {
            ready(Ok(CreateEndpointResponse::default()))
        }
        fn delete_endpoint(&self, _: DeleteEndpointRequest) -> Reply<'_, ()> {
            panic!("a handler bug")
        }
        fn endpoint_info(&self, _: EndpointInfoRequest) -> Reply<'_, EndpointInfoResponse> {
            ready(Ok(EndpointInfoResponse::default()))
        }
        fn join(&self, r: JoinRequest) -> Reply<'_, JoinResponse> {
            ready(Ok(JoinResponse {
                interface_name: Some(InterfaceName {
                    src_name: format!("na{}", &r.endpoint_id),
                    dst_prefix: "eth".into(),
                }),
                gateway: "198.51.100.1".into(),
                ..Default::default()
            }))
        }
        fn leave(&self, _: LeaveRequest) -> Reply<'_, ()> {
            Box::pin(async move {
                let _ = self.leave_gate.acquire().await;
                Ok(())
            })
        }
    }

    /// A directory of its own under the system's temporary directory, removed after.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("na-plugin-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TestDir(dir)
        }
        fn socket(&self) -> PathBuf {
            self.0.join("plugins/netagent.sock")
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A raw HTTP client on the socket.
    struct Client {
        stream: UnixStream,
        buf: Vec<u8>,
    }

    struct Answer {
        status: u16,
        head: String,
        body: Value,
    }

    impl Client {
        async fn connect(path: &Path) -> Self {
            Client {
                stream: UnixStream::connect(path).await.unwrap(),
                buf: Vec::new(),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        async fn post(&mut self, call: &str, body: &str) -> Answer {
            let request = format!(
                "POST /{call} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            self.send(request.as_bytes()).await;
            self.answer().await.expect("an answer")
        }

        /// The next response, or `None` when the server closed first.
        async fn answer(&mut self) -> Option<Answer> {
            let head_end = loop {
                if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                if !self.fill().await {
                    return None;
                }
            };
            let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
            let status = head[9..12].parse().unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            while self.buf.len() < head_end + length {
                assert!(self.fill().await, "body cut short");
            }
            let body = serde_json::from_slice(&self.buf[head_end..head_end + length]).unwrap();
            self.buf.drain(..head_end + length);
            Some(Answer { status, head, body })
        }

        async fn fill(&mut self) -> bool {
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    true
                }
            }
        }

        /// True when the server closes the connection within `limit`.
        async fn closed_within(&mut self, limit: Duration) -> bool {
            let mut chunk = [0u8; 64];
            matches!(
                tokio::time::timeout(limit, self.stream.read(&mut chunk)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    }

    #[tokio::test]
    async fn activate_and_handshake_calls() {
        let dir = TestDir::new();
        let server = serve(&dir.socket(), fake()).await.unwrap();
        let mut c = Client::connect(server.path()).await;
        // Docker sends Activate with an empty body.
        c.send(b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\nContent-Length: 0\r\n\r\n")
            .await;
        let a = c.answer().await.unwrap();
        assert_eq!(a.status, 200);
        assert!(a
            .head
            .contains("Content-Type: application/vnd.docker.plugins.v1+json\r\n"));
        assert_eq!(
            a.body,
            json!({"Implements": ["NetworkDriver", "IpamDriver"]})
        );
        let a = c.post("NetworkDriver.GetCapabilities", "").await;
        assert_eq!(
            a.body,
            json!({"Scope": "local", "ConnectivityScope": "local"})
        );
        let a = c.post("IpamDriver.GetCapabilities", "{}").await;
        assert_eq!(
            a.body,
            json!({"RequiresMACAddress": false, "RequiresRequestReplay": false})
        );
        let a = c.post("IpamDriver.GetDefaultAddressSpaces", "").await;
        assert_eq!(
            a.body,
            json!({"LocalDefaultAddressSpace": "netagent", "GlobalDefaultAddressSpace": "netagent"})
        );
        let a = c
            .post(
                "NetworkDriver.ProgramExternalConnectivity",
                r#"{"NetworkID":"n"}"#,
            )
            .await;
        assert_eq!((a.status, a.body), (200, json!({})));
    }

    #[tokio::test]
    async fn driver_calls_round_trip_on_one_kept_alive_connection() {
        let dir = TestDir::new();
        let server = serve(&dir.socket(), fake()).await.unwrap();
        let mut c = Client::connect(server.path()).await;
        let a = c
            .post(
                "IpamDriver.RequestPool",
                r#"{"AddressSpace":"netagent","Pool":"198.51.100.0/24","SubPool":"","Options":null,"V6":false}"#,
            )
            .await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.body,
            json!({"PoolID": "netagent/198.51.100.0/24", "Pool": "198.51.100.0/24", "Data": {"v6": "false"}})
        );
        assert!(!a.head.contains("Connection: close"));
        // Same connection: a `()` reply is `{}`.
        let a = c.post("IpamDriver.ReleasePool", r#"{"PoolID":"p"}"#).await;
        assert_eq!((a.status, a.body), (200, json!({})));
        let a = c
            .post(
                "NetworkDriver.Join",
                r#"{"NetworkID":"n","EndpointID":"e1","SandboxKey":"/var/run/docker/netns/x","Options":{}}"#,
            )
            .await;
        assert_eq!(
            a.body,
            json!({"InterfaceName": {"SrcName": "nae1", "DstPrefix": "eth"}, "Gateway": "198.51.100.1", "StaticRoutes": [], "DisableGatewayService": false})
        );
        let a = c
            .post(
                "NetworkDriver.CreateEndpoint",
                r#"{"NetworkID":"n","EndpointID":"e1","Interface":{"Address":"198.51.100.2/24"}}"#,
            )
            .await;
        assert_eq!(a.body, json!({}));
        // `Connection: close` is honoured.
        c.send(b"POST /Plugin.Activate HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .await;
        let a = c.answer().await.unwrap();
        assert!(a.head.contains("Connection: close\r\n"));
        assert!(c.closed_within(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn failures_answer_err_with_the_right_status() {
        let dir = TestDir::new();
        let server = serve(&dir.socket(), fake()).await.unwrap();
        let mut c = Client::connect(server.path()).await;
        let a = c
            .post("IpamDriver.ReleasePool", r#"{"PoolID":"busy"}"#)
            .await;
        assert_eq!(a.status, 500);
        assert_eq!(a.body, json!({"Err": "pool busy still has endpoints"}));

        let a = c
            .post("IpamDriver.RequestPool", r#"{"AddressSpace":"#)
            .await;
        assert_eq!(a.status, 400);
        let err = a.body["Err"].as_str().unwrap();
        assert!(
            err.starts_with("IpamDriver.RequestPool: malformed request: "),
            "{err}"
        );
        let a = c.post("IpamDriver.RequestPool", r#"{"V6":"yes"}"#).await;
        assert_eq!(a.status, 400);

        let a = c.post("VolumeDriver.Create", "{}").await;
        assert_eq!(a.status, 404);
        assert_eq!(
            a.body,
            json!({"Err": "unknown call /VolumeDriver.Create; netagent serves NetworkDriver and IpamDriver"})
        );

        // A panicking handler fails its call; the connection goes on.
        let a = c.post("NetworkDriver.DeleteEndpoint", "{}").await;
        assert_eq!(a.status, 500);
        assert!(a.body["Err"]
            .as_str()
            .unwrap()
            .contains("NetworkDriver.DeleteEndpoint"));
        let a = c.post("Plugin.Activate", "").await;
        assert_eq!(a.status, 200);
    }

    #[tokio::test]
    async fn refuses_large_chunked_and_stalled_requests() {
        let dir = TestDir::new();
        let limits = Limits {
            request_timeout: Duration::from_millis(300),
            ..LIMITS
        };
        let linger = Duration::from_millis(100);
        let server = serve_with(&dir.socket(), fake(), limits, linger)
            .await
            .unwrap();

        let mut c = Client::connect(server.path()).await;
        c.send(
            format!(
                "POST /IpamDriver.RequestPool HTTP/1.1\r\nContent-Length: {}\r\n\r\n{{",
                2 << 20
            )
            .as_bytes(),
        )
        .await;
        let a = c.answer().await.unwrap();
        assert_eq!(a.status, 413);
        assert!(a.body["Err"].as_str().unwrap().contains("2097152 bytes"));
        assert!(c.closed_within(Duration::from_secs(1)).await);

        let mut c = Client::connect(server.path()).await;
        c.send(b"POST /NetworkDriver.Join HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            .await;
        assert_eq!(c.answer().await.unwrap().status, 411);

        let mut c = Client::connect(server.path()).await;
        let mut huge_head = b"POST /Plugin.Activate HTTP/1.1\r\nX: ".to_vec();
        huge_head.resize(9 << 10, b'a');
        c.send(&huge_head).await;
        assert_eq!(c.answer().await.unwrap().status, 431);

        // Half a head, then nothing: answered 408 and closed at the deadline.
        let started = Instant::now();
        let mut c = Client::connect(server.path()).await;
        c.send(b"POST /Plugin.Activate HTTP/1.1\r\nHost:").await;
        let a = c.answer().await.unwrap();
        assert_eq!(a.status, 408);
        assert!(c.closed_within(Duration::from_secs(1)).await);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let dir = TestDir::new();
        let limits = Limits {
            idle_timeout: Duration::from_millis(200),
            ..LIMITS
        };
        let server = serve_with(&dir.socket(), fake(), limits, LINGER)
            .await
            .unwrap();
        let mut c = Client::connect(server.path()).await;
        assert_eq!(c.post("Plugin.Activate", "").await.status, 200);
        let started = Instant::now();
        assert!(c.closed_within(Duration::from_secs(2)).await);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn the_connection_after_the_limit_is_closed_at_once() {
        let dir = TestDir::new();
        let server = serve(&dir.socket(), fake()).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut c = Client::connect(server.path()).await;
            // Answered: accepted and holding its place.
            assert_eq!(c.post("Plugin.Activate", "").await.status, 200);
            held.push(c);
        }
        let mut over = Client::connect(server.path()).await;
        assert!(over.closed_within(Duration::from_secs(1)).await);
        // One place freed: a new connection is served.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let mut c = Client::connect(server.path()).await;
            c.send(b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                .await;
            if let Some(a) = c.answer().await {
                assert_eq!(a.status, 200);
                break;
            }
            assert!(Instant::now() < deadline, "no place freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_long_call_does_not_stall_other_connections() {
        let dir = TestDir::new();
        let driver = fake();
        let server = serve(&dir.socket(), driver.clone()).await.unwrap();
        let mut slow = Client::connect(server.path()).await;
        slow.send(b"POST /NetworkDriver.Leave HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .await;
        let mut other = Client::connect(server.path()).await;
        let a = tokio::time::timeout(Duration::from_secs(1), other.post("Plugin.Activate", ""))
            .await
            .expect("answered while Leave runs");
        assert_eq!(a.status, 200);
        driver.leave_gate.add_permits(1);
        let a = slow.answer().await.unwrap();
        assert_eq!((a.status, a.body), (200, json!({})));
    }

    #[tokio::test]
    async fn socket_file_mode_liveness_and_removal() {
        let dir = TestDir::new();
        let path = dir.socket();
        let server = serve(&path, fake()).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o755);

        // A live server keeps its socket.
        let err = serve(&path, fake()).await.err().expect("refused");
        assert!(matches!(err, PluginError::InUse(_)));
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            Client::connect(&path)
                .await
                .post("Plugin.Activate", "")
                .await
                .status,
            200
        );

        // Closing removes the socket file.
        server.close().await;
        assert!(!path.exists());

        // A stale socket (its server gone, the file left) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = serve(&path, fake()).await.unwrap();
        assert_eq!(
            Client::connect(&path)
                .await
                .post("Plugin.Activate", "")
                .await
                .status,
            200
        );

        // A file that is no longer ours is left alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        drop(server);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");

        // Nor is a file that is not a socket replaced.
        let err = serve(&path, fake()).await.err().expect("refused");
        assert!(matches!(err, PluginError::NotASocket(_)), "{err}");
    }

    #[test]
    fn logged_bodies_are_truncated() {
        assert_eq!(logged(b"{}"), "{}");
        let long = vec![b'a'; 5000];
        let shown = logged(&long);
        assert!(shown.starts_with(&"a".repeat(LOGGED_BODY)));
        assert!(shown.ends_with("... (5000 bytes)"));
    }
}
