//! A fake upstream resolver's answers, for tests that need outside names without
//! sending anything beyond their own namespaces.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};

/// `outside.test` is 203.0.113.7 (TTL 60); `big.test` is 203.0.113.8 but over UDP
/// only a truncated answer comes; anything else NXDOMAIN.
pub fn reply(query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    let question = q.queries.first()?.clone();
    let name = question.name().to_ascii().to_ascii_lowercase();
    let a = |ip: Ipv4Addr| Record::from_rdata(question.name().clone(), 60, RData::A(A(ip)));
    match (name.as_str(), udp) {
        ("outside.test.", _) => {
            r.add_answer(a(Ipv4Addr::new(203, 0, 113, 7)));
        }
        ("big.test.", true) => r.metadata.truncation = true,
        ("big.test.", false) => {
            r.add_answer(a(Ipv4Addr::new(203, 0, 113, 8)));
        }
        _ => r.metadata.response_code = ResponseCode::NXDomain,
    }
    r.add_query(question);
    r.to_vec().ok()
}

/// Serves `reply` over UDP on `addr` inside namespace `netns`, on a thread of its
/// own, until the process ends.
pub fn serve_udp_in(netns: &str, addr: std::net::SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    crate::in_netns(netns, move || {
        let socket = std::net::UdpSocket::bind(addr).expect("bind the fake upstream");
        tx.send(()).unwrap();
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if let Some(r) = reply(&buf[..n], true) {
                let _ = socket.send_to(&r, peer);
            }
        }
    });
    rx.recv().expect("fake upstream bound");
}
