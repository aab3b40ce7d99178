//! The query fast path against hickory-proto's independent encoder and decoder: every
//! response we write must decode, and say what a client would check.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use netagent_dns::{answer, Answer, EndpointRecord, Snapshot, SnapshotBuilder, Transport};

fn ep(network: &str, ip: [u8; 4], name: &str, service: Option<&str>) -> EndpointRecord {
    EndpointRecord::replica(network, Ipv4Addr::from(ip), name, service)
}

fn app() -> Snapshot {
    SnapshotBuilder::new()
        .endpoint(ep("app-net", [100, 64, 1, 11], "db", Some("db")))
        .endpoint(ep(
            "app-net",
            [100, 64, 2, 10],
            "echo_api.1",
            Some("echo_api"),
        ))
        .endpoint(ep(
            "app-net",
            [100, 64, 2, 11],
            "echo_api.2",
            Some("echo_api"),
        ))
        .endpoint(ep(
            "app-net",
            [100, 64, 3, 12],
            "echo_api.3",
            Some("echo_api"),
        ))
        .endpoint(ep("other-net", [100, 65, 3, 10], "secret", Some("secret")))
        .build()
}

fn query(name: &str, ty: RecordType, edns: Option<u16>) -> Vec<u8> {
    let labels: Vec<&[u8]> = name
        .trim_end_matches('.')
        .split('.')
        .map(str::as_bytes)
        .collect();
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.metadata.recursion_desired = true;
    let mut n = Name::from_labels(labels).unwrap();
    n.set_fqdn(true);
    m.add_query(Query::query(n, ty));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(snap: &Snapshot, nets: &[&str], packet: &[u8], t: Transport) -> Message {
    match answer(snap, nets, packet, t, 5) {
        Answer::Reply(bytes) => Message::from_vec(&bytes).expect("our response decodes"),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn a_service_answers_every_replica_rotated_evenly() {
    let snap = app();
    let mut first: HashMap<Ipv4Addr, usize> = HashMap::new();
    let n = 300;
    for _ in 0..n {
        let m = ask(
            &snap,
            &["app-net"],
            &query("echo_api", RecordType::A, None),
            Transport::Udp,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.metadata.id, 4242);
        assert!(m.metadata.authoritative && m.metadata.recursion_available);
        let a = addresses(&m);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![
                Ipv4Addr::new(100, 64, 2, 10),
                Ipv4Addr::new(100, 64, 2, 11),
                Ipv4Addr::new(100, 64, 3, 12)
            ]
        );
        assert!(m.answers.iter().all(|r| r.ttl == 5));
        *first.entry(a[0]).or_default() += 1;
    }
    assert_eq!(first.len(), 3);
    for (ip, count) in first {
        assert!(
            count.abs_diff(n / 3) <= 1,
            "{ip} first {count} times of {n}"
        );
    }
}

#[test]
fn names_docker_users_expect_resolve_case_insensitively() {
    let snap = app();
    for name in [
        "db",
        "DB.",
        "db.app-net",
        "tasks.echo_api",
        "Echo_Api.App-Net.",
        "echo_api.3",
        "tasks.echo_api.app-net",
    ] {
        let m = ask(
            &snap,
            &["app-net"],
            &query(name, RecordType::A, None),
            Transport::Udp,
        );
        assert!(!addresses(&m).is_empty(), "{name} did not resolve");
        // The question is echoed as asked.
        assert_eq!(
            m.queries[0]
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_lowercase(),
            name.trim_end_matches('.').to_lowercase()
        );
    }
}

#[test]
fn names_of_other_networks_do_not_exist_and_two_networks_see_both() {
    let snap = app();
    let packet = query("secret", RecordType::A, None);
    assert_eq!(
        answer(&snap, &["app-net"], &packet, Transport::Udp, 5),
        Answer::Forward
    );
    let m = ask(&snap, &["app-net", "other-net"], &packet, Transport::Udp);
    assert_eq!(addresses(&m), vec![Ipv4Addr::new(100, 65, 3, 10)]);
    let m = ask(
        &snap,
        &["app-net", "other-net"],
        &query("db", RecordType::A, None),
        Transport::Udp,
    );
    assert_eq!(addresses(&m), vec![Ipv4Addr::new(100, 64, 1, 11)]);
}

#[test]
fn aaaa_of_a_local_name_is_nodata_not_nxdomain() {
    let m = ask(
        &app(),
        &["app-net"],
        &query("echo_api", RecordType::AAAA, None),
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

#[test]
fn ptr_names_an_endpoint_only_within_its_network() {
    let snap = app();
    let packet = query("12.3.64.100.in-addr.arpa", RecordType::PTR, None);
    let m = ask(&snap, &["app-net"], &packet, Transport::Udp);
    match &m.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0.to_ascii(), "echo_api.3.app-net."),
        other => panic!("not a PTR: {other:?}"),
    }
    assert_eq!(
        answer(&snap, &["other-net"], &packet, Transport::Udp, 5),
        Answer::Forward
    );
}

/// `web` with `n` replicas on network `big`.
fn web_replicas(n: u8) -> Snapshot {
    SnapshotBuilder::new()
        .endpoints((0..n).map(|i| {
            ep(
                "big",
                [100, 64, 1, i + 10],
                &format!("web.{i}"),
                Some("web"),
            )
        }))
        .build()
}

#[test]
fn a_hundred_replicas_truncate_over_udp_and_come_whole_over_tcp() {
    let snap = web_replicas(100);
    let packet = query("web", RecordType::A, None);
    let m = ask(&snap, &["big"], &packet, Transport::Udp);
    assert!(m.metadata.truncation, "100 A records exceed 512 bytes");
    assert!(m.answers.is_empty());
    let m = ask(&snap, &["big"], &packet, Transport::Tcp);
    assert!(!m.metadata.truncation);
    assert_eq!(addresses(&m).len(), 100);
    // EDNS buffer sizes are honoured up to our 1232: 100 × 16 bytes still do not fit,
    // 50 × 16 do, where 512 bytes without EDNS did not.
    let m = ask(
        &snap,
        &["big"],
        &query("web", RecordType::A, Some(4096)),
        Transport::Udp,
    );
    assert!(m.metadata.truncation, "1,600 bytes of answers exceed 1232");
    assert!(m.edns.is_some(), "EDNS answered with EDNS");
    let half = web_replicas(50);
    assert!(
        ask(
            &half,
            &["big"],
            &query("web", RecordType::A, None),
            Transport::Udp
        )
        .metadata
        .truncation
    );
    let m = ask(
        &half,
        &["big"],
        &query("web", RecordType::A, Some(1232)),
        Transport::Udp,
    );
    assert!(!m.metadata.truncation);
    assert_eq!(addresses(&m).len(), 50);
}

#[test]
fn one_per_answer_rotates_single_replicas() {
    let snap = SnapshotBuilder::new()
        .endpoints((0..3u8).map(|i| ep("n", [100, 64, 1, i + 10], &format!("s.{i}"), Some("s"))))
        .one_per_answer("n", "s")
        .build();
    let seen: Vec<Ipv4Addr> = (0..6)
        .map(|_| {
            let a = addresses(&ask(
                &snap,
                &["n"],
                &query("s", RecordType::A, None),
                Transport::Udp,
            ));
            assert_eq!(a.len(), 1);
            a[0]
        })
        .collect();
    assert_eq!(seen[..3], seen[3..]);
    let mut distinct = seen[..3].to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
}

#[test]
fn an_unhealthy_replica_leaves_the_service_but_keeps_its_name() {
    let mut sick = ep("n", [100, 64, 1, 11], "s.2", Some("s"));
    sick.in_service = false;
    let snap = SnapshotBuilder::new()
        .endpoint(ep("n", [100, 64, 1, 10], "s.1", Some("s")))
        .endpoint(sick)
        .build();
    assert_eq!(
        addresses(&ask(
            &snap,
            &["n"],
            &query("s", RecordType::A, None),
            Transport::Udp
        )),
        vec![Ipv4Addr::new(100, 64, 1, 10)]
    );
    assert_eq!(
        addresses(&ask(
            &snap,
            &["n"],
            &query("s.2", RecordType::A, None),
            Transport::Udp
        )),
        vec![Ipv4Addr::new(100, 64, 1, 11)]
    );
}

#[test]
fn malformed_queries_get_formerr_notimp_or_silence() {
    let snap = app();
    let good = query("db", RecordType::A, None);
    // Too short: dropped.
    assert_eq!(
        answer(&snap, &["app-net"], &good[..5], Transport::Udp, 5),
        Answer::Drop
    );
    // A response: dropped.
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(
        answer(&snap, &["app-net"], &response, Transport::Udp, 5),
        Answer::Drop
    );
    let rcode = |p: &[u8]| match answer(&snap, &["app-net"], p, Transport::Udp, 5) {
        Answer::Reply(b) => Message::from_vec(&b).unwrap().metadata.response_code,
        other => panic!("{other:?}"),
    };
    // Zero questions, two questions.
    let mut zero = good.clone();
    zero[5] = 0;
    assert_eq!(rcode(&zero), ResponseCode::FormErr);
    let mut two = good.clone();
    two[5] = 2;
    assert_eq!(rcode(&two), ResponseCode::FormErr);
    // Truncated name.
    assert_eq!(rcode(&good[..14]), ResponseCode::FormErr);
    // A compression pointer loop in the question.
    let mut looped = good[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(rcode(&looped), ResponseCode::FormErr);
    // Opcode STATUS.
    let mut status = good.clone();
    status[2] |= 2 << 3;
    assert_eq!(rcode(&status), ResponseCode::NotImp);
    // Class CHAOS.
    let mut chaos = good.clone();
    let n = chaos.len();
    chaos[n - 1] = 3;
    assert_eq!(rcode(&chaos), ResponseCode::NotImp);
    // Absurd label count: 200 one-byte labels (over 255 bytes).
    let mut long = good[..12].to_vec();
    for _ in 0..200 {
        long.extend_from_slice(&[1, b'a']);
    }
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert_eq!(rcode(&long), ResponseCode::FormErr);
}
