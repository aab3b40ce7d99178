//! The local API server: a unix socket only root can open (mode 0600), one JSON
//! request and one JSON reply per line, each request at most 1 MiB.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use super::datapath::Datapath;
use super::Agent;
use crate::api::{Reply, Request, Response};
use crate::store::Store;

/// Binds the API socket; refuses when another agent answers on it.
pub async fn bind_api(path: &Path) -> Result<UnixListener> {
    if UnixStream::connect(path).await.is_ok() {
        bail!(
            "another netagent agent answers on {}; stop it first (systemctl stop netagent)",
            path.display()
        );
    }
    let _ = tokio::fs::remove_file(path).await;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Bound inside a directory only root can enter, made 0600 there, then renamed
    // into place: the socket is never reachable with looser permissions, and no
    // process-wide umask is touched.
    let private = path.with_file_name(format!(".netagent-api-{}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&private).await;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create {}", private.display()))?;
    let staged = private.join("api.sock");
    let bound = async {
        let listener = UnixListener::bind(&staged)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        tokio::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).await?;
        tokio::fs::rename(&staged, path)
            .await
            .with_context(|| format!("cannot move the API socket to {}", path.display()))?;
        Ok(listener)
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&private).await;
    bound
}

/// Largest request line the API reads; a longer one is refused and the client cut off.
const MAX_REQUEST: u64 = 1 << 20;

pub async fn serve_api<S: Store, D: Datapath>(agent: Arc<Agent<S, D>>, listener: UnixListener) {
    serve_requests(&listener, move |line| {
        let agent = agent.clone();
        async move {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => match agent.handle(req).await {
                    Ok(v) => Reply::Ok(v.content()),
                    Err(e) => Reply::Error(format!("{e:#}")),
                },
                Err(e) => Reply::Error(format!("bad request: {e}")),
            }
        }
    })
    .await
}

/// Accepts API clients for ever and gives each request line `answer`'s reply: the
/// one loop for the agent's API and for the answers it gives while it starts.
/// Accept errors (out of descriptors, say) back off instead of spinning.
pub async fn serve_requests<F, Fut>(listener: &UnixListener, answer: F)
where
    F: Fn(Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Reply> + Send,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let answer = answer.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_client(stream, answer).await {
                        warn!(error = %e, "api client failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "api accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client<F, Fut>(stream: UnixStream, answer: F) -> Result<()>
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_large = line.len() as u64 > MAX_REQUEST;
        let reply = if too_large {
            Reply::Error(format!("request larger than {MAX_REQUEST} bytes; refused"))
        } else {
            answer(line).await
        };
        let mut bytes = serde_json::to_vec(&reply)?;
        bytes.push(b'\n');
        write.write_all(&bytes).await?;
        if too_large {
            bail!("api request larger than {MAX_REQUEST} bytes; connection closed");
        }
    }
}

impl<S: Store, D: Datapath> Agent<S, D> {
    pub async fn handle(&self, req: Request) -> Result<Response> {
        Ok(match req {
            Request::Status => Response::Status(self.status()),
            Request::NetworkCreate(new) => Response::Network(self.create_network(&new).await?),
            Request::NetworkList => Response::Networks(self.list_networks()),
            Request::NetworkInspect { name } => Response::Network(self.inspect_network(&name)?),
            Request::NetworkRemove { name, force } => {
                Response::Network(self.remove_network(&name, force).await?)
            }
            Request::Attach(req) => Response::Endpoint(self.attach(req).await?),
            Request::Detach { target, network } => {
                Response::Endpoint(self.detach(&target, &network).await?)
            }
            Request::Peers => Response::Peers(self.peers()),
            Request::Services { network } => Response::Services(self.services(network.as_deref())),
            Request::Endpoints => Response::Endpoints(self.endpoints()),
            Request::RotateKey => Response::Key(self.rotate_key().await?),
            Request::NodeList => Response::Nodes(self.list_nodes()),
            Request::NodeRemove { name } => Response::Node(self.remove_node(&name).await?),
        })
    }
}
