//! One namespace's TCP listener: at most [`Limits::tcp_connections`] connections,
//! each with deadlines for the wait between queries, for a query's body and for
//! writing its answer, all owned by the listener's task (a `JoinSet`), so aborting
//! it closes every connection. Accept errors back off instead of spinning: with no
//! descriptor left (EMFILE, ENFILE) the pending connection stays queued and accept
//! fails again at once, forever.
//!
//! There is no cap on queries per connection: a connection that keeps asking spends
//! only its own namespace's connection budget, and the idle deadline ends it when it
//! stops.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{info, warn};

use crate::answer::Transport;
use crate::metrics::{self, Proto};
#[cfg(doc)]
use crate::server::Limits;
use crate::server::{DnsServer, LogEvery, Scope};

/// First pause after a failed accept; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub(crate) async fn serve(server: Arc<DnsServer>, listener: TcpListener, scope: Scope) {
    let cap = server.limits().tcp_connections;
    // Dropped with this task, which aborts every connection and closes its socket.
    let mut connections = JoinSet::new();
    let mut backoff = Backoff::default();
    let mut over_cap = LogEvery::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            // Finished connections first, so the count below is current.
            biased;
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                if let Some(failures) = backoff.succeeded() {
                    info!(networks = ?scope, failures, "dns tcp accepting again");
                }
                if connections.len() >= cap {
                    if let Some(count) = over_cap.hit() {
                        warn!(networks = ?scope, count, cap, "namespace at its cap of dns tcp connections: closing new ones");
                    }
                    continue;
                }
                connections.spawn(connection(server.clone(), stream, scope.clone()));
            }
            // About one pending connection, not the listener: the next may be fine.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                let (pause, first) = backoff.failed();
                if first {
                    warn!(networks = ?scope, error = %e, "dns tcp accept failed: backing off");
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn connection(server: Arc<DnsServer>, mut stream: TcpStream, scope: Scope) {
    let limits = server.limits().clone();
    let networks: Vec<&str> = scope.networks().iter().map(String::as_str).collect();
    loop {
        let len = match timeout(limits.tcp_idle, stream.read_u16()).await {
            Ok(Ok(len)) => len as usize,
            _ => return,
        };
        let mut packet = vec![0u8; len];
        if !matches!(
            timeout(limits.tcp_read, stream.read_exact(&mut packet)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let received = std::time::Instant::now();
        let Some(reply) = server
            .handle(&scope, &networks, &packet, Transport::Tcp)
            .await
        else {
            return;
        };
        metrics::request(Proto::Tcp, &packet);
        let mut framed = Vec::with_capacity(2 + reply.len());
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            timeout(limits.tcp_write, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        metrics::response(&reply);
        metrics::answered(1, received.elapsed());
    }
}

/// The pause after each failed accept of a streak, and whether to log.
#[derive(Default)]
struct Backoff {
    failures: u64,
    pause: Duration,
}

impl Backoff {
    /// One more failure: how long to pause, and whether it starts a streak.
    fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.pause = if self.failures == 1 {
            BACKOFF_FIRST
        } else {
            (self.pause * 2).min(BACKOFF_MAX)
        };
        (self.pause, self.failures == 1)
    }

    /// An accept worked: `Some(failures)` when that ends a streak.
    fn succeeded(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0).then_some(failures)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::task::JoinHandle;

    use super::*;
    use crate::server::Limits;
    use crate::testutil::{app_server, ask_tcp, query, rcode};

    async fn listen(limits: Limits) -> (Arc<DnsServer>, SocketAddr, JoinHandle<()>) {
        let server = app_server(vec![], limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = server.serve_tcp(listener, Scope::new(vec!["app".to_string()]));
        (server, addr, task)
    }

    /// A connection the server has taken: one local query answered on it.
    async fn served(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let reply = ask_tcp(&mut s, &query(7, "db")).await.expect("answered");
        assert_eq!(rcode(&reply), 0);
        s
    }

    /// True when the server closes `s` within `within` (EOF or reset).
    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let until = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(until, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_connection_beyond_the_cap_is_closed_and_its_slot_comes_back() {
        let (server, addr, _task) = listen(Limits::default()).await;
        let cap = server.limits().tcp_connections;
        let mut open = Vec::new();
        for _ in 0..cap {
            open.push(served(addr).await);
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut extra, Duration::from_secs(3)).await,
            "connection {} was kept open",
            cap + 1
        );
        // Those within the cap still work; one closing lets a new one in.
        let mut first = open.remove(0);
        assert!(ask_tcp(&mut first, &query(8, "db")).await.is_some());
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if ask_tcp(&mut s, &query(9, "db")).await.is_some() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no slot came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_body_is_dropped_after_its_deadline() {
        let limits = Limits {
            tcp_read: Duration::from_millis(300),
            ..Limits::default()
        };
        let (_server, addr, _task) = listen(limits).await;
        let mut s = served(addr).await;
        // A length of 40 and half the body, then nothing: the idle deadline (10 s)
        // does not apply any more, the body's does.
        let q = query(10, "db");
        s.write_all(&40u16.to_be_bytes()).await.unwrap();
        s.write_all(&q[..20]).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(closed(&mut s, Duration::from_secs(5)).await, "still open");
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_reads_no_answers_is_dropped_after_the_write_deadline() {
        let limits = Limits {
            tcp_write: Duration::from_millis(300),
            ..Limits::default()
        };
        let (_server, addr, _task) = listen(limits).await;
        let mut s = served(addr).await;
        // Answers of ~48 KiB each, asked for and never read: socket buffers fill.
        let sent = 400;
        let mut asks = Vec::new();
        for i in 0..sent {
            let q = query(i, "web");
            asks.extend_from_slice(&(q.len() as u16).to_be_bytes());
            asks.extend_from_slice(&q);
        }
        s.write_all(&asks).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Now read: what was buffered, then the end, well before all answers.
        let mut answers = 0;
        loop {
            let len = match tokio::time::timeout(Duration::from_secs(5), s.read_u16()).await {
                Ok(Ok(len)) => len as usize,
                Ok(Err(_)) => break,
                Err(_) => panic!("the connection stayed open"),
            };
            let mut body = vec![0u8; len];
            if s.read_exact(&mut body).await.is_err() {
                break;
            }
            answers += 1;
        }
        assert!(answers < sent, "all {sent} answers were written");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aborting_the_listener_closes_every_connection() {
        let (_server, addr, task) = listen(Limits::default()).await;
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(served(addr).await);
        }
        task.abort();
        let _ = task.await;
        for s in &mut open {
            assert!(
                closed(s, Duration::from_secs(2)).await,
                "a connection outlived its listener"
            );
        }
    }

    #[test]
    fn accept_failures_back_off_to_a_second_and_log_once_per_streak() {
        let mut b = Backoff::default();
        let pauses: Vec<(u64, bool)> = (0..6)
            .map(|_| b.failed())
            .map(|(d, first)| (d.as_millis() as u64, first))
            .collect();
        assert_eq!(
            pauses,
            vec![
                (100, true),
                (200, false),
                (400, false),
                (800, false),
                (1000, false),
                (1000, false)
            ]
        );
        assert_eq!(b.succeeded(), Some(6));
        assert_eq!(b.succeeded(), None);
        assert_eq!(b.failed(), (BACKOFF_FIRST, true));
    }
}
