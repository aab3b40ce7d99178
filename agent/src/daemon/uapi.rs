//! WireGuard's cross-platform UAPI (<https://www.wireguard.com/xplatform/>) on a unix
//! socket, read-only: `wg show` and WireGuard exporters read the mesh's peers from it
//! while the mesh runs. `get=1` is answered from the mesh's stats; `set=1` is refused
//! (the store decides the peers, and `netagent rotate-key` the key). The private key
//! is never written: the interface's public key is in `netagent status`.
//!
//! Root only (mode 0600, as the API). Another process answering on the path keeps
//! it; a stale socket file is replaced; the file goes when serving stops.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netagent_overlay::PeerStats;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::datapath::Datapath;
use super::Agent;
use crate::store::Store;

/// Clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 16;
/// Longest line of a request (a `get=1` is 6 bytes).
const MAX_LINE: usize = 4 << 10;
/// Longest request read whole (a refused `set=1` is read to its end before the answer).
const MAX_REQUEST: usize = 64 << 10;
/// Time a client has to send one request.
const REQUEST_TIME: Duration = Duration::from_secs(2);
/// The datapath's persistent keepalive (`overlay`'s `wireguard/peers.rs`).
const KEEPALIVE_SECS: u16 = 10;

/// A refused request's errno, negated as `wg set` reads it (and wireguard-go
/// writes it): `wg` says "Operation not permitted".
const EPERM: i32 = 1;
const EINVAL: i32 = 22;

impl<S: Store, D: Datapath> Agent<S, D> {
    /// Serves the UAPI socket (`[mesh] uapi_socket`) whenever the mesh runs.
    pub(super) async fn uapi_loop(self: Arc<Self>) {
        let Some(path) = self.cfg.mesh_uapi_socket.clone() else {
            return;
        };
        let mut running = self.mesh.watch_running();
        loop {
            if running.wait_for(|up| *up).await.is_err() {
                return;
            }
            let bound = match bind_uapi(&path).await {
                Ok(bound) => bound,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot serve WireGuard's UAPI (wg show); set [mesh] uapi_socket to another path, or \"\" to turn it off");
                    None
                }
            };
            let serving = async {
                match &bound {
                    Some(b) => {
                        info!(path = %path.display(), "WireGuard UAPI (wg show) served, read-only");
                        let agent = self.clone();
                        serve_uapi(&b.listener, move || agent.uapi_get()).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = serving => {}
                stopped = running.wait_for(|up| !*up) => if stopped.is_err() { return },
            }
            drop(bound);
        }
    }

    /// The answer to `get=1`: the mesh as it is now.
    fn uapi_get(&self) -> String {
        get_response(self.cfg.mesh_port, &self.mesh.stats(), SystemTime::now())
    }
}

/// A bound UAPI socket; its file is removed on drop unless another took its path.
struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` mode 0600; None (with a warning) when another process answers there
/// or something that is not a socket is in the way.
async fn bind_uapi(path: &Path) -> io::Result<Option<BoundSocket>> {
    match UnixStream::connect(path).await {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
                warn!(path = %path.display(), "not serving WireGuard's UAPI (wg show): the path is not a socket; left alone. Set [mesh] uapi_socket to another path");
                return Ok(None);
            }
            // A socket nobody answers on: left by a process that is gone.
        }
        // A full backlog is someone's too.
        Ok(_) => return Ok(warn_taken(path)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(warn_taken(path)),
        Err(e) => return Err(e),
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    // Bound inside a directory only root can enter, made 0600 there, then renamed
    // over the path (replacing a stale socket): never reachable with looser modes.
    let private = dir.join(format!(".netagent-uapi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("uapi.sock");
    let bound = (|| -> io::Result<BoundSocket> {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(BoundSocket {
            listener,
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
        })
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map(Some)
}

fn warn_taken(path: &Path) -> Option<BoundSocket> {
    warn!(path = %path.display(), "not serving WireGuard's UAPI (wg show): another process answers on this socket; left alone. Set [mesh] uapi_socket to another path, or \"\" to turn it off");
    None
}

/// Accepts clients for ever, at most [`MAX_CLIENTS`] at once.
async fn serve_uapi<F>(listener: &UnixListener, get: F)
where
    F: Fn() -> String + Clone + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let get = get.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    serve_client(stream, get).await;
                });
            }
            Err(e) => {
                warn!(error = %e, "WireGuard UAPI accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client(stream: UnixStream, get: impl Fn() -> String) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let request = match tokio::time::timeout(REQUEST_TIME, read_request(&mut reader)).await {
            Ok(Ok(Some(request))) => request,
            // Closed, too slow, or an I/O error: nothing more to answer.
            _ => return,
        };
        let (reply, more) = match request {
            Request::Get => (get(), true),
            Request::Set => (errno(-EPERM), true),
            Request::Invalid => (errno(-EINVAL), false),
        };
        // A client that stops reading loses its slot after the same limit.
        let written = tokio::time::timeout(REQUEST_TIME, write.write_all(reply.as_bytes())).await;
        if !matches!(written, Ok(Ok(()))) || !more {
            return;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Get,
    Set,
    Invalid,
}

/// Reads one request: its operation line, then lines up to the empty one. None: the
/// client closed before a request.
async fn read_request(reader: &mut (impl AsyncBufRead + Unpin)) -> io::Result<Option<Request>> {
    let mut line = Vec::new();
    let mut total = 0;
    let mut operation = None;
    loop {
        line.clear();
        let n = reader
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        total += n;
        if n == 0 {
            return Ok(operation.map(|_| Request::Invalid));
        }
        if !line.ends_with(b"\n") || total > MAX_REQUEST {
            return Ok(Some(Request::Invalid));
        }
        let text = &line[..line.len() - 1];
        match operation {
            None => {
                operation = Some(match text {
                    b"get=1" => Request::Get,
                    b"set=1" => Request::Set,
                    _ => return Ok(Some(Request::Invalid)),
                })
            }
            Some(op) if text.is_empty() => return Ok(Some(op)),
            // A get has no arguments.
            Some(Request::Get) => return Ok(Some(Request::Invalid)),
            Some(op) => operation = Some(op),
        }
    }
}

fn errno(n: i32) -> String {
    format!("errno={n}\n\n")
}

/// The `get=1` answer: the device, each peer (keys in hex, as UAPI has them), then
/// `errno=0` and the empty line. No private key.
fn get_response(listen_port: u16, peers: &[PeerStats], now: SystemTime) -> String {
    let mut peers: Vec<&PeerStats> = peers.iter().collect();
    peers.sort_by_key(|p| p.public_key);
    let mut out = format!("listen_port={listen_port}\n");
    for p in peers {
        // The mesh sends a peer its mesh address alone: VXLAN of the encrypted
        // networks is addressed to it.
        let handshake = p
            .last_handshake
            .and_then(|ago| now.checked_sub(ago))
            .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = write!(
            out,
            "public_key={}\nendpoint={}\npersistent_keepalive_interval={KEEPALIVE_SECS}\nallowed_ip={}/32\n\
             last_handshake_time_sec={}\nlast_handshake_time_nsec={}\nrx_bytes={}\ntx_bytes={}\nprotocol_version=1\n",
            hex(&p.public_key),
            p.endpoint,
            p.address,
            handshake.as_secs(),
            handshake.subsec_nanos(),
            p.rx_bytes,
            p.tx_bytes,
        );
    }
    out.push_str("errno=0\n\n");
    out
}

fn hex(key: &[u8; 32]) -> String {
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    #[test]
    fn get_lists_each_peer_in_hex_with_its_handshake_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000_500);
        let peer = |k: u8, ago: Option<u64>| PeerStats {
            public_key: [k; 32],
            address: Ipv4Addr::new(100, 127, 192, k),
            endpoint: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, k), 51820),
            last_handshake: ago.map(Duration::from_secs),
            tx_bytes: 7,
            rx_bytes: 9,
        };
        let text = get_response(51820, &[peer(0xab, None), peer(0x01, Some(3))], now);
        let expected = format!(
            "listen_port=51820\n\
             public_key={}\nendpoint=192.0.2.1:51820\npersistent_keepalive_interval=10\nallowed_ip=100.127.192.1/32\n\
             last_handshake_time_sec=999997\nlast_handshake_time_nsec=500000000\nrx_bytes=9\ntx_bytes=7\nprotocol_version=1\n\
             public_key={}\nendpoint=192.0.2.171:51820\npersistent_keepalive_interval=10\nallowed_ip=100.127.192.171/32\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\nrx_bytes=9\ntx_bytes=7\nprotocol_version=1\n\
             errno=0\n\n",
            "01".repeat(32),
            "ab".repeat(32),
        );
        assert_eq!(text, expected);
    }

    async fn parse(bytes: &[u8]) -> Option<Request> {
        read_request(&mut BufReader::new(bytes)).await.unwrap()
    }

    #[tokio::test]
    async fn requests_are_read_to_their_empty_line_within_bounds() {
        assert_eq!(parse(b"get=1\n\n").await, Some(Request::Get));
        assert_eq!(
            parse(b"set=1\nprivate_key=00\nlisten_port=1\n\n").await,
            Some(Request::Set)
        );
        assert_eq!(parse(b"").await, None);
        assert_eq!(parse(b"get=1\n").await, Some(Request::Invalid));
        assert_eq!(parse(b"get=1\nx=1\n\n").await, Some(Request::Invalid));
        assert_eq!(parse(b"put=1\n\n").await, Some(Request::Invalid));
        let long = format!("set=1\n{}\n\n", "a".repeat(MAX_LINE + 1));
        assert_eq!(parse(long.as_bytes()).await, Some(Request::Invalid));
        let many = format!("set=1\n{}\n", "a=1\n".repeat(MAX_REQUEST / 4));
        assert_eq!(parse(many.as_bytes()).await, Some(Request::Invalid));
    }
}
