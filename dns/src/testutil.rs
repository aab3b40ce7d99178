//! Helpers for the server's unit tests: queries on the wire, a server with a few
//! local names, and an upstream that never answers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::forward::Forwarder;
use crate::server::{DnsServer, Limits};
use crate::snapshot::{EndpointRecord, SnapshotBuilder};

/// An A query for `name` with id `id`, recursion desired.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    crate::wire::stub_query(id, name, 1)
}

pub fn rcode(response: &[u8]) -> u8 {
    response[3] & 0x0f
}

fn ep(address: Ipv4Addr, name: &str, service: &str) -> EndpointRecord {
    EndpointRecord::replica("app", address, name, Some(service))
}

/// A server for network `app`: `db` (one address) and `web` (3,000 replicas, an
/// answer of ~48 KiB over TCP), forwarding everything else to `upstreams`.
pub fn app_server(upstreams: Vec<SocketAddr>, limits: Limits) -> Arc<DnsServer> {
    let server = DnsServer::with_limits(
        Forwarder::new(upstreams).expect("upstream sockets"),
        5,
        limits,
    );
    server.update(
        SnapshotBuilder::new()
            .endpoint(ep(Ipv4Addr::new(100, 64, 0, 2), "db", "db"))
            .endpoints(
                (0..3000u32)
                    .map(|i| ep(Ipv4Addr::from(0x6441_0000 + i), &format!("web.{i}"), "web")),
            )
            .build(),
    );
    server
}

/// A UDP "upstream" on loopback that takes queries and never answers.
pub async fn start_silent_upstream() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while socket.recv_from(&mut buf).await.is_ok() {}
    });
    addr
}

/// A UDP upstream on loopback that answers every query with an empty NOERROR
/// response after `delay`.
pub async fn start_slow_upstream(delay: std::time::Duration) -> SocketAddr {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(q) = crate::wire::parse(&buf[..n]) else {
                continue;
            };
            let reply = crate::wire::write_response(&q, 0, &[], 0, usize::MAX);
            let socket = socket.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = socket.send_to(&reply, from).await;
            });
        }
    });
    addr
}

/// Sends one query over `s` and reads its answer (None: closed or no answer in 2 s).
pub async fn ask_tcp(s: &mut TcpStream, packet: &[u8]) -> Option<Vec<u8>> {
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    s.write_all(&framed).await.ok()?;
    let read = async {
        let len = s.read_u16().await.ok()? as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), read)
        .await
        .ok()?
}
