//! The forwarder against fake upstreams on loopback.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::*;
use crate::response::tests::{query, response};
use crate::response::RCODE_NXDOMAIN;

type Replies = Box<dyn Fn(&[u8]) -> Vec<Vec<u8>> + Send + Sync>;

/// A fake upstream on 127.0.0.1 answering each query with what `replies` gives
/// (in order); every query it got is kept.
struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn fake(replies: Replies) -> Fake {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            log.lock().unwrap().push(buf[..n].to_vec());
            for r in replies(&buf[..n]) {
                let _ = socket.send_to(&r, peer).await;
            }
        }
    });
    Fake { addr, seen }
}

/// The question (name, type, class) of a packet.
fn question_of(p: &[u8]) -> Vec<u8> {
    let mut at = 12;
    while p[at] != 0 {
        at += 1 + p[at] as usize;
    }
    p[12..at + 5].to_vec()
}

fn id_of(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[0], p[1]])
}

const REAL: &[u8] = b"\x08outside2\x07example\x00";
const DOTTED: &[u8] = b"\x10outside2.example\x00";

fn by_name(q: &[u8]) -> Vec<Vec<u8>> {
    let question = question_of(q);
    let name = &question[..question.len() - 4];
    let reply = if name.eq_ignore_ascii_case(REAL) {
        response(
            id_of(q),
            &question,
            0,
            &[([203, 0, 113, 20], 60)],
            None,
            true,
        )
    } else {
        response(
            id_of(q),
            &question,
            RCODE_NXDOMAIN,
            &[],
            Some((60, 60)),
            true,
        )
    };
    vec![reply]
}

async fn ask(f: &Forwarder, packet: &[u8]) -> Vec<u8> {
    let q = wire::parse(packet).unwrap();
    f.forward(packet, &q).await
}

fn addresses(p: &[u8]) -> Vec<[u8; 4]> {
    let w = response::walk(p).expect("a well-formed response");
    w.answers
        .iter()
        .filter(|r| r.rtype == 1)
        .map(|r| p[r.rdata.clone()].try_into().unwrap())
        .collect()
}

#[tokio::test]
async fn a_dotted_label_neither_poisons_nor_is_poisoned_by_the_real_name() {
    let up = fake(Box::new(by_name)).await;
    let f = Forwarder::new(vec![up.addr]).expect("upstream sockets");
    let dotted = ask(&f, &query(DOTTED, true)).await;
    assert_eq!(response::rcode(&dotted), RCODE_NXDOMAIN);
    let real = ask(&f, &query(REAL, true)).await;
    assert_eq!(response::rcode(&real), 0);
    assert_eq!(addresses(&real), vec![[203, 0, 113, 20]]);
    // Both cached now, apart; the upstream saw the single label as one label.
    let again = ask(&f, &query(DOTTED, false)).await;
    assert_eq!(response::rcode(&again), RCODE_NXDOMAIN);
    assert_eq!(&again[12..12 + DOTTED.len()], DOTTED);
    assert_eq!(addresses(&ask(&f, &query(REAL, false)).await).len(), 1);
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "the second round came from the cache");
    assert!(question_of(&seen[0])[..DOTTED.len()].eq_ignore_ascii_case(DOTTED));
}

#[tokio::test]
async fn upstream_queries_are_rebuilt_with_random_ids_and_letter_case() {
    let up = fake(Box::new(by_name)).await;
    let f = Forwarder::new(vec![up.addr]).expect("upstream sockets");
    let mut client = query(b"\x05abcde\x04test\x00", true);
    // Odd bits a client might send are not passed on: only RD, CD and DO are.
    client[2] |= 0x04; // AA
    client.extend_from_slice(b"trailing garbage");
    let name_count = 64;
    let mut asked = Vec::new();
    for i in 0..name_count {
        let mut p = client.clone();
        p[13] = b'a' + (i % 26) as u8; // distinct names: no cache, no sharing
        p[14] = b'a' + (i / 26) as u8;
        let q = wire::parse(&p).unwrap();
        f.forward(&p, &q).await;
        asked.push(q.raw.to_vec());
    }
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), name_count);
    let ids: HashSet<u16> = seen.iter().map(|p| id_of(p)).collect();
    assert!(ids.len() >= name_count - 2, "ids repeat: {ids:?}");
    let mut cases = HashSet::new();
    for (p, asked) in seen.iter().zip(&asked) {
        assert_eq!(p[2..4], [0x01, 0x00], "RD only");
        let q = question_of(p);
        assert_eq!(p.len(), 12 + q.len() + 11, "question and OPT only");
        assert!(q.eq_ignore_ascii_case(asked), "same question");
        cases.insert(q[7..11].to_vec()); // "test", the same in every name
    }
    assert!(cases.len() > 8, "letter case is not random: {cases:?}");
}

#[tokio::test]
async fn answers_that_do_not_match_the_query_are_dropped() {
    let flip = |q: &[u8]| -> Vec<u8> {
        q.iter()
            .map(|b| {
                if b.is_ascii_alphabetic() {
                    b ^ 0x20
                } else {
                    *b
                }
            })
            .collect()
    };
    let up = fake(Box::new(move |q: &[u8]| {
        let question = question_of(q);
        let id = id_of(q);
        let evil = |id, question: &[u8]| {
            response(id, question, 0, &[([198, 51, 100, 66], 60)], None, true)
        };
        let mut out = vec![
            evil(id ^ 0x5555, &question),
            evil(id, &flip(&question)),
            evil(id, b"\x04evil\x04test\x00\x00\x01\x00\x01"),
        ];
        let name = &question[..question.len() - 4];
        if name.eq_ignore_ascii_case(b"\x04good\x04test\x00") {
            out.push(response(
                id,
                &question,
                0,
                &[([203, 0, 113, 30], 60)],
                None,
                true,
            ));
        }
        out
    }))
    .await;
    let f = Forwarder::new(vec![up.addr]).expect("upstream sockets");
    let good = ask(&f, &query(b"\x04good\x04test\x00", true)).await;
    assert_eq!(addresses(&good), vec![[203, 0, 113, 30]]);
    let only_bad = ask(&f, &query(b"\x03bad\x04test\x00", true)).await;
    assert_eq!(response::rcode(&only_bad), wire::RCODE_SERVFAIL);
    assert_eq!(f.io.pending(), 0, "the table is empty again");
}

#[tokio::test]
async fn beyond_the_global_cap_queries_get_servfail_at_once() {
    let silent = fake(Box::new(|_: &[u8]| Vec::new())).await;
    let f = Arc::new(
        Forwarder::with_limits(
            vec![silent.addr],
            ForwardLimits {
                max_in_flight: 4,
                cache_bytes: 1 << 20,
            },
        )
        .unwrap(),
    );
    let mut waiting = Vec::new();
    for i in 0..4u8 {
        let f = f.clone();
        waiting.push(tokio::spawn(async move {
            let mut p = query(b"\x01x\x06silent\x00", true);
            p[13] = b'a' + i;
            ask(&f, &p).await
        }));
    }
    while f.io.pending() < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let over = tokio::time::timeout(
        FORWARD_DEADLINE / 2,
        ask(&f, &query(b"\x01z\x06silent\x00", true)),
    )
    .await
    .expect("SERVFAIL before any upstream could time out");
    assert_eq!(response::rcode(&over), wire::RCODE_SERVFAIL);
    assert_eq!(f.io.pending(), 4, "no upstream query for it");
    for w in waiting {
        assert_eq!(response::rcode(&w.await.unwrap()), wire::RCODE_SERVFAIL);
    }
    assert_eq!(silent.seen.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn identical_questions_in_flight_share_one_exchange() {
    let slow = fake(Box::new(|q: &[u8]| {
        std::thread::sleep(Duration::from_millis(100));
        by_name(q)
    }))
    .await;
    let f = Arc::new(Forwarder::new(vec![slow.addr]).expect("upstream sockets"));
    let asks: Vec<_> = (0..5)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { ask(&f, &query(REAL, true)).await })
        })
        .collect();
    for a in asks {
        assert_eq!(addresses(&a.await.unwrap()), vec![[203, 0, 113, 20]]);
    }
    assert_eq!(slow.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn truncated_answers_are_fetched_over_tcp() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let q = &buf[..n];
            let mut r = response(id_of(q), &question_of(q), 0, &[], None, false);
            r[2] |= 0x02;
            let _ = udp.send_to(&r, peer).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = tcp.accept().await {
            let len = conn.read_u16().await.unwrap() as usize;
            let mut q = vec![0u8; len];
            conn.read_exact(&mut q).await.unwrap();
            let r = response(
                id_of(&q),
                &question_of(&q),
                0,
                &[([203, 0, 113, 8], 60)],
                None,
                false,
            );
            conn.write_all(&(r.len() as u16).to_be_bytes())
                .await
                .unwrap();
            conn.write_all(&r).await.unwrap();
        }
    });
    let f = Forwarder::new(vec![addr]).expect("upstream sockets");
    let big = ask(&f, &query(b"\x03big\x04test\x00", false)).await;
    assert_eq!(addresses(&big), vec![[203, 0, 113, 8]]);
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_for_the_next() {
    let silent = fake(Box::new(|_: &[u8]| Vec::new())).await;
    let up = fake(Box::new(by_name)).await;
    let f = Forwarder::new(vec![silent.addr, up.addr]).expect("upstream sockets");
    let r = ask(&f, &query(REAL, true)).await;
    assert_eq!(addresses(&r), vec![[203, 0, 113, 20]]);
}

#[test]
fn reads_nameservers() {
    let text = "# comment\nsearch example.org\nnameserver 192.0.2.53\nnameserver  2001:db8::1\noptions ndots:1\n";
    assert_eq!(
        upstreams_from_resolv_conf(text),
        vec![
            "192.0.2.53:53".parse().unwrap(),
            "[2001:db8::1]:53".parse().unwrap()
        ]
    );
}
