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
    serve_udp_with(netns, addr, |q| reply(q, true).into_iter().collect());
}

/// Like `serve_udp_in`, but names under `silent` (e.g. "flood.test.") are taken and
/// never answered: an upstream that stalls for one zone and answers the others.
pub fn serve_udp_silent_for_in(netns: &str, addr: std::net::SocketAddr, silent: &'static str) {
    serve_udp_with(netns, addr, move |q| {
        let stalls = Message::from_vec(q)
            .ok()
            .and_then(|q| q.queries.first().map(|q| q.name().to_ascii()))
            .is_some_and(|name| name.to_ascii_lowercase().ends_with(silent));
        if stalls {
            Vec::new()
        } else {
            reply(q, true).into_iter().collect()
        }
    });
}

/// Address the hostile upstream gives the real `outside2.example`.
pub const OUTSIDE2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// Address of `spoofed.test`, in the one answer that matches the query.
pub const SPOOFED_REAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
/// Address every forged answer carries.
pub const FORGED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);

/// The end of the question section of a DNS message (name, type, class).
fn question_end(p: &[u8]) -> Option<usize> {
    let mut at = 12;
    while *p.get(at)? != 0 {
        at += 1 + p[at] as usize;
    }
    Some(at + 5)
}

/// What an upstream on the path of attackers might send back, datagrams in order:
/// - `outside2.example` (two labels): 203.0.113.20; any other name that does not
///   exist, the single label `outside2\.example` included: NXDOMAIN with a SOA
///   (negative TTL 60);
/// - `*.silent.test`: nothing, ever;
/// - `spoofed.test`: forged answers (198.51.100.66) first, one with another id, one
///   with the question in the opposite letter case, one for another name, then the
///   real answer 203.0.113.30;
/// - `onlyspoofed.test`: the forged answers only.
pub fn hostile_replies(query: &[u8]) -> Vec<Vec<u8>> {
    use hickory_proto::rr::rdata::SOA;
    use hickory_proto::rr::Name;
    let Ok(q) = Message::from_vec(query) else {
        return Vec::new();
    };
    let Some(question) = q.queries.first().cloned() else {
        return Vec::new();
    };
    let id = q.metadata.id;
    let name = question.name().to_ascii().to_ascii_lowercase();
    let answer = |id: u16, question: hickory_proto::op::Query, ip: Option<Ipv4Addr>| {
        let mut r = Message::response(id, OpCode::Query);
        r.metadata.recursion_desired = q.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        match ip {
            Some(ip) => {
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A(ip)),
                ));
            }
            None => {
                r.metadata.response_code = ResponseCode::NXDomain;
                let zone = Name::from_ascii("test.").expect("name");
                let soa = SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, 60);
                r.add_authority(Record::from_rdata(zone, 60, RData::SOA(soa)));
            }
        }
        r.add_query(question);
        r.to_vec().expect("encodes")
    };
    let forged = || {
        let other_id = answer(id ^ 0x5a5a, question.clone(), Some(FORGED));
        let mut flipped = answer(id, question.clone(), Some(FORGED));
        let end = question_end(&flipped).unwrap_or(12);
        for b in &mut flipped[12..end.saturating_sub(4)] {
            if b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        let mut other = question.clone();
        other.set_name(Name::from_ascii("forged.test.").expect("name"));
        let other_name = answer(id, other, Some(FORGED));
        vec![other_id, flipped, other_name]
    };
    match name.as_str() {
        "outside2.example." => vec![answer(id, question, Some(OUTSIDE2))],
        n if n.ends_with(".silent.test.") => Vec::new(),
        "spoofed.test." => {
            let mut out = forged();
            out.push(answer(id, question, Some(SPOOFED_REAL)));
            out
        }
        "onlyspoofed.test." => forged(),
        _ => vec![answer(id, question, None)],
    }
}

/// Replies that answer every A query with `address` (TTL 60), whatever the name:
/// an upstream whose answers say which upstream was asked.
pub fn answering_with(address: Ipv4Addr) -> impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + 'static {
    move |query| {
        let Ok(q) = Message::from_vec(query) else {
            return Vec::new();
        };
        let Some(question) = q.queries.first().cloned() else {
            return Vec::new();
        };
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.metadata.recursion_desired = q.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.add_answer(Record::from_rdata(
            question.name().clone(),
            60,
            RData::A(A(address)),
        ));
        r.add_query(question);
        r.to_vec().into_iter().collect()
    }
}

/// Serves `replies` over UDP on `addr` inside namespace `netns` (every datagram it
/// returns is sent, in order), on a thread of its own, until the process ends.
pub fn serve_udp_with(
    netns: &str,
    addr: std::net::SocketAddr,
    replies: impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + 'static,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    crate::in_netns(netns, move || {
        let socket = std::net::UdpSocket::bind(addr).expect("bind the fake upstream");
        tx.send(()).unwrap();
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            for r in replies(&buf[..n]) {
                let _ = socket.send_to(&r, peer);
            }
        }
    });
    rx.recv().expect("fake upstream bound");
}
