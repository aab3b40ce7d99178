//! One namespace's UDP socket: local answers in batches, forwards in tasks the
//! socket's own task owns, at most [`Limits::udp_forwards`] of them at a time.
//!
//! Beyond the cap the client gets SERVFAIL at once rather than silence. 127.0.0.11
//! is reachable only from inside the namespace, so an answer cannot be reflected at
//! anybody else (the reason unbound drops when its request list is full); an
//! immediate answer spares a well-behaved stub its retransmissions and a 5 s wait,
//! as dnsmasq and Docker's embedded resolver do when their forward tables are full
//! (they answer REFUSED). SERVFAIL, the forwarder's own failure answer, because the
//! C library reads it as "try again" (EAI_AGAIN) and REFUSED as a permanent failure.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::answer::{Answer, Transport};
use crate::batch::{Batch, BATCH};
use crate::forward::FORWARD_DEADLINE;
use crate::metrics::{self, Proto};
#[cfg(doc)]
use crate::server::Limits;
use crate::server::{DnsServer, LogEvery, Scope};
use crate::wire;

pub(crate) async fn serve(
    server: Arc<DnsServer>,
    socket: UdpSocket,
    scope: Scope,
    mut stop: Option<watch::Receiver<bool>>,
) {
    let socket = Arc::new(socket);
    let fd = socket.as_raw_fd();
    let networks: Vec<&str> = scope.networks().iter().map(String::as_str).collect();
    let mut batch = Batch::new();
    let mut replies: Vec<(usize, Vec<u8>)> = Vec::with_capacity(BATCH);
    // Dropped with this task, which aborts every forward still running.
    let mut forwards = JoinSet::new();
    let permits = Arc::new(Semaphore::new(server.limits().udp_forwards));
    let mut refused = LogEvery::new(Duration::from_secs(10));
    loop {
        while forwards.try_join_next().is_some() {}
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            ready = socket.readable() => if let Err(e) = ready {
                warn!(networks = ?scope, error = %e, "dns udp socket failed");
                return;
            }
        }
        let n = match socket.try_io(Interest::READABLE, || batch.recv(fd)) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!(networks = ?scope, error = %e, "dns udp receive failed");
                continue;
            }
        };
        // The batch's answers leave together: their time is the batch's.
        let received = Instant::now();
        replies.clear();
        for i in 0..n {
            let packet = batch.packet(i);
            let answer = server.local(&networks, packet, Transport::Udp);
            if !matches!(answer, Answer::Drop) {
                metrics::request(Proto::Udp, packet);
            }
            match answer {
                Answer::Reply(bytes) => replies.push((i, bytes)),
                Answer::Drop => debug!("dropped a non-query"),
                Answer::Forward => {
                    let Some(peer) = batch.peer(i) else { continue };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        if let Some(count) = refused.hit() {
                            warn!(
                                networks = ?scope,
                                count,
                                cap = server.limits().udp_forwards,
                                "namespace at its cap of forwarded queries: answering SERVFAIL"
                            );
                        }
                        if let Ok(q) = wire::parse(packet) {
                            let servfail =
                                wire::write_response(&q, wire::RCODE_SERVFAIL, &[], 0, usize::MAX);
                            replies.push((i, servfail));
                        }
                        continue;
                    };
                    let (server, socket, packet, scope) = (
                        server.clone(),
                        socket.clone(),
                        packet.to_vec(),
                        scope.clone(),
                    );
                    forwards.spawn(async move {
                        if let Some(bytes) = server.forward(&scope, &packet).await {
                            let _ = socket.send_to(&bytes, peer).await;
                            metrics::response(&bytes);
                            metrics::answered(1, received.elapsed());
                        }
                        drop(permit);
                    });
                }
            }
        }
        let sent = socket
            .try_io(Interest::WRITABLE, || batch.send(fd, &replies))
            .unwrap_or(0);
        // What the socket buffer could not take now goes out one by one.
        for (i, bytes) in &replies[sent..] {
            if let Some(peer) = batch.peer(*i) {
                let _ = socket.send_to(bytes, peer).await;
            }
        }
        for (_, bytes) in &replies {
            metrics::response(bytes);
        }
        metrics::answered(replies.len(), received.elapsed());
    }
    // Stopping: every query read has its local answer; the forwards finish here.
    let drained = tokio::time::timeout(FORWARD_DEADLINE, async {
        while forwards.join_next().await.is_some() {}
    });
    let _ = drained.await;
}

/// Resolves once `stop` turns true (never without a stop signal, or once its sender
/// is gone without having said so).
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    if let Some(rx) = stop {
        if rx.wait_for(|s| *s).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;

    use super::*;
    use crate::testutil::{app_server, query, rcode, start_silent_upstream, start_slow_upstream};
    use crate::wire::RCODE_SERVFAIL;

    /// A server for `app` whose only upstream never answers, serving a UDP socket on
    /// loopback.
    async fn deaf_udp() -> (Arc<DnsServer>, SocketAddr, tokio::task::JoinHandle<()>) {
        let upstream = start_silent_upstream().await;
        let server = app_server(vec![upstream], Default::default());
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = server.serve_udp(socket, Scope::new(vec!["app".to_string()]));
        (server, addr, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_beyond_the_cap_get_servfail_at_once_and_local_names_still_answer() {
        let (server, addr, _task) = deaf_udp().await;
        let cap = server.limits().udp_forwards as u16;
        let extra = 36u16;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        for id in 0..cap + extra {
            client
                .send(&query(id, &format!("n{id}.outside.test")))
                .await
                .unwrap();
            // In order, so that the first `cap` are the ones forwarded.
            tokio::task::yield_now().await;
        }
        let mut buf = vec![0u8; 4096];
        let mut order = Vec::new();
        let mut local = false;
        while order.len() < (cap + extra) as usize {
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("every query answered")
                .unwrap();
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            if id == 9999 {
                local = true;
                continue;
            }
            assert_eq!(rcode(&buf[..n]), RCODE_SERVFAIL, "query {id}");
            order.push(id);
            if order.len() == extra as usize {
                // Every forward slot is taken by the silent upstream: local names
                // still answer straight away.
                client.send(&query(9999, "db")).await.unwrap();
            }
        }
        let first: BTreeSet<u16> = order[..extra as usize].iter().copied().collect();
        assert_eq!(
            first,
            (cap..cap + extra).collect::<BTreeSet<u16>>(),
            "the queries beyond the cap are answered first, without waiting on the upstream"
        );
        assert!(
            local,
            "a local name answered while the forwards were stalled"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aborting_the_socket_task_ends_its_forwards_and_frees_the_address() {
        let (_server, addr, task) = deaf_udp().await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        client.send(&query(1, "stalled.test")).await.unwrap();
        // The forward has started (and waits on the silent upstream) once a later
        // local query has been answered.
        assert!(local_answered(&client).await);
        task.abort();
        let _ = task.await;
        // The forward held the socket: once it is gone too, the address is free.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            match std::net::UdpSocket::bind(addr) {
                Ok(_) => break,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("the socket outlived its task: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_socket_answers_its_forwards_and_leaves_later_queries_waiting() {
        let upstream = start_slow_upstream(Duration::from_millis(300)).await;
        let server = app_server(vec![upstream], Default::default());
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        // What the next process would take over: the same socket.
        let kept = socket.try_clone().unwrap();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let task = server.serve_udp_until(
            UdpSocket::from_std(socket).unwrap(),
            Scope::new(vec!["app".to_string()]),
            stopping,
        );
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        client.send(&query(1, "slow.outside.test")).await.unwrap();
        // Read by the server (a local answer sent after it came back) before the stop.
        assert!(local_answered(&client).await);
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.send(&query(3, "db")).await.unwrap();
        // The forward in flight is answered before the task ends.
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .expect("the forward in flight answered")
            .unwrap();
        assert_eq!(&buf[..2], &[0, 1]);
        assert_eq!(rcode(&buf[..n]), 0);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the task ends once drained")
            .unwrap();
        // The query sent after the stop was not read: it waits for the next reader.
        let mut waiting = [0u8; 512];
        let (n, _) = kept
            .recv_from(&mut waiting)
            .expect("the later query waits in the socket");
        assert_eq!(&waiting[..2], &[0, 3]);
        assert!(n > 12);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_and_their_answers_are_counted_by_type_and_code() {
        let (_server, addr, _task) = deaf_udp().await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        // A type no other test of this binary asks: the counts are this test's.
        let nsec3 = |s: &metrics::DnsStats| {
            s.requests
                .iter()
                .find(|r| r.0 == "udp" && r.1 == "NSEC3")
                .unwrap()
                .2
        };
        let before = metrics::stats();
        for id in 0..3 {
            client.send(&wire::stub_query(id, "db", 50)).await.unwrap();
            let mut buf = vec![0u8; 4096];
            tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                .await
                .expect("answered")
                .unwrap();
        }
        let after = metrics::stats();
        assert_eq!(nsec3(&after) - nsec3(&before), 3);
        assert!(after.responses[0].1 >= before.responses[0].1 + 3, "NOERROR");
        let answered = |s: &metrics::DnsStats| s.duration_buckets.iter().sum::<u64>();
        assert!(answered(&after) >= answered(&before) + 3);
    }

    /// Asks a local name over `client` and says whether it was answered.
    async fn local_answered(client: &UdpSocket) -> bool {
        client.send(&query(2, "db")).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .expect("local answer")
            .unwrap();
        n > 12 && buf[..2] == [0, 2]
    }
}
