//! The agent's HTTP endpoint (`[http] listen`): health, readiness, metrics, and a
//! live page of the mesh. Hand-written HTTP/1.1, GET and HEAD only, one request per
//! connection: the few routes need no more, and every bound a hostile client could
//! push on is explicit here (hyper is in the build only as a client).
//!
//! Bounds: [`MAX_CONNECTIONS`] at once (more are closed on accept), a request head
//! of at most [`request::MAX_HEAD`] bytes arriving within [`request::HEAD_TIMEOUT`],
//! [`MAX_EVENT_STREAMS`] event streams, a deadline on every write.
//!
//! It answers from the first moment, before the agent has reached its store: the
//! [`Phase`] says what it answers from.

mod events;
mod phase;
pub(crate) mod request;
pub(crate) mod response;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::store::StoreHealth;
use phase::Phase;
pub use phase::RunningAgent;
use request::HeadError;
use response::{close_lingering, Response};

/// Connections served at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// `/events` clients at once; one more is answered 503.
pub const MAX_EVENT_STREAMS: usize = 16;

/// The running endpoint; dropping it closes the listener and every connection.
pub struct HttpEndpoint {
    phase: watch::Sender<Phase>,
    server: tokio::task::JoinHandle<()>,
}

impl HttpEndpoint {
    /// Listens on `addr` and answers as a starting agent until [`Self::running`].
    pub async fn start(
        addr: SocketAddr,
        node: &str,
        health: watch::Receiver<StoreHealth>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen for HTTP on {addr}; change or remove [http] listen")
        })?;
        info!(%addr, "HTTP endpoint listening");
        let (phase, watching) = watch::channel(Phase::Starting {
            node: node.to_owned(),
            health,
        });
        let server = tokio::spawn(serve(listener, watching));
        Ok(HttpEndpoint { phase, server })
    }

    /// From now on, answers from the running agent.
    pub fn running(&self, agent: Arc<dyn RunningAgent>) {
        self.phase.send_replace(Phase::Running(agent));
    }
}

impl Drop for HttpEndpoint {
    fn drop(&mut self) {
        // The connections are in the server task's JoinSet: they end with it.
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, phase: watch::Receiver<Phase>) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let streams = Arc::new(Semaphore::new(MAX_EVENT_STREAMS));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => match connections.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tasks.spawn(connection(conn, slot, phase.clone(), streams.clone()));
                    }
                    // Closed at once: nothing is read or kept for it.
                    Err(_) => drop(conn),
                },
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    warn!(error = %e, "HTTP endpoint cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// One request on one connection; `_slot` is its place among [`MAX_CONNECTIONS`].
async fn connection(
    mut conn: TcpStream,
    _slot: OwnedSemaphorePermit,
    phase: watch::Receiver<Phase>,
    streams: Arc<Semaphore>,
) {
    let head = match request::read_head(&mut conn).await {
        Ok(head) => head,
        Err(HeadError::Closed) => return,
        Err(e) => {
            let answer = match e {
                HeadError::Timeout => Response::text(408, "the request head took too long"),
                HeadError::TooLarge => Response::text(
                    431,
                    &format!("request head larger than {} bytes", request::MAX_HEAD),
                ),
                _ => Response::text(400, "not an HTTP/1 request"),
            };
            if answer.send(&mut conn, true).await.is_ok() {
                close_lingering(conn).await;
            }
            return;
        }
    };
    let with_body = match head.method.as_str() {
        "GET" => true,
        "HEAD" => false,
        _ => {
            let answer = Response::text(405, "only GET and HEAD").header("Allow", "GET, HEAD");
            if answer.send(&mut conn, true).await.is_ok() {
                close_lingering(conn).await;
            }
            return;
        }
    };
    if head.path == "/events" && with_body {
        match streams.try_acquire_owned() {
            Ok(_stream) => events::stream(conn, phase).await,
            Err(_) => {
                let busy = Response::text(
                    503,
                    &format!("already {MAX_EVENT_STREAMS} event streams; try again later"),
                )
                .header("Retry-After", "5");
                let _ = busy.send(&mut conn, true).await;
            }
        }
        return;
    }
    let current = phase.borrow().clone();
    let answer = if head.path == "/events" {
        Response::new(200, "text/event-stream; charset=utf-8", "")
    } else {
        routes::answer(&head.path, &current).await
    };
    let _ = answer.send(&mut conn, with_body).await;
}
