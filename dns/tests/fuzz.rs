//! Property tests of the query path (parse, look up, write the response) against
//! whatever a container sends to 127.0.0.11: random bytes, and valid queries with
//! one thing changed (labels holding dots, compression pointers and loops, huge
//! counts, EDNS of any shape). The query path never panics; it drops, forwards, or
//! replies with a well-formed message carrying the query's id and question, within
//! the size the transport allows.

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use netagent_dns::{answer, Answer, EndpointRecord, Snapshot, SnapshotBuilder, Transport};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Failures print the minimal input; no files written into the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

fn ep(network: &str, ip: [u8; 4], name: &str, service: &str, aliases: &[&str]) -> EndpointRecord {
    EndpointRecord {
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        ..EndpointRecord::replica(network, Ipv4Addr::from(ip), name, Some(service))
    }
}

/// Two networks, a service with 60 replicas (more than 512 bytes of answers) and
/// one answered a replica at a time.
fn snapshot() -> Snapshot {
    SnapshotBuilder::new()
        .endpoint(ep("app-net", [100, 64, 1, 11], "db", "db", &["database"]))
        .endpoints((0..60u8).map(|i| {
            ep(
                "app-net",
                [100, 64, 2, i],
                &format!("echo_api.{i}"),
                "echo_api",
                &[],
            )
        }))
        .endpoint(ep("other-net", [100, 65, 3, 10], "secret", "s", &[]))
        .endpoint(ep("other-net", [100, 65, 3, 11], "one.1", "one", &[]))
        .endpoint(ep("other-net", [100, 65, 3, 12], "one.2", "one", &[]))
        .one_per_answer("other-net", "one")
        .build()
}

const NETWORKS: [&[&str]; 4] = [&[], &["app-net"], &["other-net"], &["app-net", "other-net"]];

fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

/// The question section's length as the query path reads it (uncompressed labels,
/// then type and class), when the packet has one.
fn question_len(p: &[u8]) -> Option<usize> {
    let mut at = 12;
    loop {
        let len = usize::from(*p.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += len;
    }
    (at + 4 <= p.len()).then_some(at + 4 - 12)
}

/// The property every answer must have. `packet` is what the client sent.
fn check(packet: &[u8], networks: &[&str], tcp: bool, got: Answer) -> Result<(), TestCaseError> {
    let reply = match got {
        Answer::Drop => {
            prop_assert!(
                packet.len() < 12 || packet[2] & 0x80 != 0,
                "only runts and responses are dropped"
            );
            return Ok(());
        }
        Answer::Forward => {
            // Only a standard query with one question is ever sent upstream.
            prop_assert!(packet.len() >= 12 && packet[2] & 0x80 == 0);
            prop_assert_eq!((packet[2] >> 3) & 0xf, 0, "opcode QUERY");
            prop_assert_eq!(u16_at(packet, 4), 1, "one question");
            prop_assert!(question_len(packet).is_some());
            return Ok(());
        }
        Answer::Reply(reply) => reply,
    };
    prop_assert!(packet.len() >= 12, "a runt got a reply");
    prop_assert!(reply.len() >= 12);
    prop_assert_eq!(&reply[..2], &packet[..2], "the query's id");
    prop_assert!(reply[2] & 0x80 != 0, "QR set");
    prop_assert_eq!(reply[2] & 0x78, packet[2] & 0x78, "opcode echoed");
    prop_assert_eq!(reply[2] & 0x01, packet[2] & 0x01, "RD echoed");
    let rcode = reply[3] & 0x0f;
    let qdcount = u16_at(&reply, 4);
    let ancount = usize::from(u16_at(&reply, 6));
    prop_assert_eq!(u16_at(&reply, 8), 0, "no authority records");
    prop_assert!(
        ancount == 0 || !networks.is_empty(),
        "answers from no network"
    );
    if qdcount == 0 {
        // An error without the question: the header alone.
        prop_assert!(
            rcode == 1 || rcode == 4,
            "rcode {} without a question",
            rcode
        );
        prop_assert_eq!(reply.len(), 12);
        prop_assert_eq!(ancount, 0);
        return Ok(());
    }
    prop_assert_eq!(qdcount, 1);
    let qlen = question_len(packet);
    prop_assert!(qlen.is_some(), "a question echoed from a query without one");
    let qlen = qlen.unwrap();
    prop_assert_eq!(
        &reply[12..12 + qlen],
        &packet[12..12 + qlen],
        "the question as asked"
    );
    let limit = if tcp {
        usize::from(u16::MAX)
    } else {
        // With EDNS the client's size, between 512 and our 1232; else 512.
        1232
    };
    prop_assert!(reply.len() <= limit, "{} bytes over {}", reply.len(), limit);
    if !tcp && u16_at(&reply, 10) == 0 {
        prop_assert!(reply.len() <= 512, "{} bytes without EDNS", reply.len());
    }
    // The records: each A or PTR, its owner the question, 4 bytes or a name.
    let mut at = 12 + qlen;
    for _ in 0..ancount {
        prop_assert_eq!(
            &reply[at..at + 2],
            &[0xc0, 12][..],
            "owner points to the question"
        );
        let ty = u16_at(&reply, at + 2);
        prop_assert!(ty == 1 || ty == 12);
        let rdlen = usize::from(u16_at(&reply, at + 10));
        at += 12 + rdlen;
        prop_assert!(at <= reply.len());
    }
    // An independent decoder agrees, for names DNS can carry (255 bytes on the wire;
    // the parser still takes 256 and 257, which a decoder refuses to read back).
    if qlen - 4 <= 255 {
        let m = Message::from_vec(&reply);
        prop_assert!(m.is_ok(), "reply does not decode: {:?}", m.err());
        let m = m.unwrap();
        prop_assert_eq!(m.queries.len(), 1);
        prop_assert_eq!(m.answers.len(), ancount);
        for r in &m.answers {
            prop_assert_eq!(&r.name, m.queries[0].name());
            prop_assert!(matches!(r.data, RData::A(_) | RData::PTR(_)));
        }
    }
    Ok(())
}

fn run(packet: &[u8], nets: usize, tcp: bool) -> Result<(), TestCaseError> {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    let snap = SNAPSHOT.get_or_init(snapshot);
    let networks = NETWORKS[nets % NETWORKS.len()];
    let t = if tcp { Transport::Tcp } else { Transport::Udp };
    let got = answer(snap, networks, packet, t, 5);
    check(packet, networks, tcp, got)
}

/// A label: the snapshot's names, reverse-lookup parts, dotted or odd bytes, or
/// lengths DNS refuses.
fn label() -> impl Strategy<Value = Vec<u8>> {
    let pick = |names: &'static [&'static str]| {
        prop::sample::select(names).prop_map(|s| s.as_bytes().to_vec())
    };
    prop_oneof![
        12 => pick(&[
            "db", "DB", "echo_api", "Echo_Api", "tasks", "app-net", "other-net", "one",
            "secret", "database", "echo_api.7", "db.app-net",
        ]),
        3 => pick(&["in-addr", "arpa", "11", "1", "64", "100", "65", "256", "-1", "007"]),
        2 => pick(&["a.", ".", "", ".."]),
        2 => proptest::collection::vec(any::<u8>(), 1..8),
        1 => proptest::collection::vec(any::<u8>(), 60..66),
    ]
}

/// The name of a query: a handful of labels, or a reverse-lookup name.
fn name() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        6 => proptest::collection::vec(label(), 1..4),
        1 => proptest::collection::vec(label(), 0..8),
        2 => (any::<[u8; 4]>(), any::<bool>()).prop_map(|(ip, ours)| {
            let ip = if ours { [100, 64, 2, ip[3] % 70] } else { ip };
            let mut l: Vec<Vec<u8>> = ip.iter().rev().map(|o| o.to_string().into_bytes()).collect();
            l.push(b"in-addr".to_vec());
            l.push(b"arpa".to_vec());
            l
        }),
        1 => (1usize..140).prop_map(|n| vec![b"a".to_vec(); n]),
    ]
}

/// EDNS: the OPT record's class (payload size), extended rcode/version/flags, and
/// its data length as claimed and as sent.
#[derive(Clone, Debug)]
struct Edns {
    size: u16,
    version: u8,
    name: u8,
    ty: u16,
    rdlen: u16,
    data: Vec<u8>,
}

fn edns() -> impl Strategy<Value = Option<Edns>> {
    let e = (
        prop_oneof![Just(512u16), Just(1232), Just(4096), any::<u16>()],
        prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
        prop_oneof![8 => Just(0u8), 1 => any::<u8>()],
        prop_oneof![8 => Just(41u16), 1 => any::<u16>()],
        proptest::collection::vec(any::<u8>(), 0..12),
        prop_oneof![4 => Just(None), 1 => any::<u16>().prop_map(Some)],
    )
        .prop_map(|(size, version, name, ty, data, claimed)| Edns {
            size,
            version,
            name,
            ty,
            rdlen: claimed.unwrap_or(data.len() as u16),
            data,
        });
    prop::option::weighted(0.4, e)
}

fn query(
    id: u16,
    flags: u16,
    labels: &[Vec<u8>],
    qtype: u16,
    qclass: u16,
    edns: &Option<Edns>,
) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&u16::from(edns.is_some()).to_be_bytes());
    for l in labels {
        // A label over 63 bytes keeps its length byte's low bits: a label type.
        p.push(l.len() as u8);
        p.extend_from_slice(l);
    }
    p.push(0);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&qclass.to_be_bytes());
    if let Some(e) = edns {
        p.push(e.name);
        p.extend_from_slice(&e.ty.to_be_bytes());
        p.extend_from_slice(&e.size.to_be_bytes());
        p.extend_from_slice(&[0, e.version, 0, 0]);
        p.extend_from_slice(&e.rdlen.to_be_bytes());
        p.extend_from_slice(&e.data);
    }
    p
}

/// One change to a valid query.
#[derive(Clone, Debug)]
enum Mutation {
    None,
    /// A byte anywhere (mostly in the header and question).
    Byte(usize, u8),
    /// A count (question, answer, authority, additional) set to anything.
    Count(usize, u16),
    /// A compression pointer at a label boundary, to `target` (12: the first label,
    /// a loop when it points back at itself or before).
    Pointer {
        label: usize,
        target: u16,
    },
    Truncate(usize),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => Just(Mutation::None),
        3 => (0usize..80, any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        2 => (0usize..4, prop_oneof![Just(0u16), Just(2), Just(u16::MAX), any::<u16>()])
            .prop_map(|(i, v)| Mutation::Count(i, v)),
        2 => (0usize..6, prop_oneof![Just(12u16), 0u16..64, any::<u16>()])
            .prop_map(|(label, target)| Mutation::Pointer { label, target }),
        1 => (0usize..40).prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Append),
    ]
}

fn mutate(m: &Mutation, p: &mut Vec<u8>) {
    match m {
        Mutation::None => {}
        Mutation::Byte(i, b) => {
            let i = i % p.len();
            p[i] = *b;
        }
        Mutation::Count(i, v) => p[4 + 2 * i..6 + 2 * i].copy_from_slice(&v.to_be_bytes()),
        Mutation::Pointer { label, target } => {
            // Walk to the label'th label (or the root) and put the pointer there.
            let mut at = 12;
            for _ in 0..*label {
                match p.get(at) {
                    Some(&len) if len != 0 && len & 0xc0 == 0 => at += 1 + usize::from(len),
                    _ => break,
                }
            }
            if at + 2 <= p.len() {
                let ptr = 0xc000 | (target & 0x3fff);
                p[at..at + 2].copy_from_slice(&ptr.to_be_bytes());
            }
        }
        Mutation::Truncate(n) => p.truncate(*n),
        Mutation::Append(more) => p.extend_from_slice(more),
    }
}

proptest! {
    #![proptest_config(config(100_000))]

    /// Random bytes, with a plausible header half the time so the question parser
    /// is reached.
    #[test]
    fn fuzz_dns_arbitrary_bytes(
        mut packet in proptest::collection::vec(any::<u8>(), 0..700),
        header in any::<bool>(),
        nets in 0usize..4,
        tcp in any::<bool>(),
    ) {
        if header && packet.len() >= 12 {
            packet[2] &= 0x07;
            let ar = packet[11] & 1;
            packet[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, ar]);
        }
        run(&packet, nets, tcp)?;
    }
}

proptest! {
    #![proptest_config(config(100_000))]

    /// Valid queries for names of the snapshot and others, with one thing changed.
    #[test]
    fn fuzz_dns_mutated_queries(
        id in any::<u16>(),
        flags in prop_oneof![Just(0x0100u16), Just(0), any::<u16>().prop_map(|f| f & 0x07ff)],
        labels in name(),
        qtype in prop_oneof![Just(1u16), Just(28), Just(12), Just(255), any::<u16>()],
        qclass in prop_oneof![4 => Just(1u16), 1 => Just(255), 1 => Just(3), 1 => any::<u16>()],
        edns in edns(),
        m in mutation(),
        nets in 0usize..4,
        tcp in any::<bool>(),
    ) {
        let mut packet = query(id, flags, &labels, qtype, qclass, &edns);
        mutate(&m, &mut packet);
        run(&packet, nets, tcp)?;
    }
}
