//! SRV answers, decoded by hickory-proto: names, ports, targets with their addresses
//! in the additional section, rotation, scope, and no data where there are no ports.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;

use crate::answer::{answer, Answer, Transport};
use crate::snapshot::{EndpointRecord, PortProtocol, ServicePort, Snapshot, SnapshotBuilder};
use crate::wire::{stub_query, TYPE_A, TYPE_SRV};

fn port(name: &str, port: u16, protocol: PortProtocol) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol,
    }
}

fn ep(
    network: &str,
    last: u8,
    name: &str,
    service: &str,
    ports: Vec<ServicePort>,
) -> EndpointRecord {
    EndpointRecord {
        ports,
        ..EndpointRecord::replica(
            network,
            Ipv4Addr::new(100, 64, 2, last),
            name,
            Some(service),
        )
    }
}

/// Three `echo_api` replicas with `http` (8080) and `dns` (53/udp), a `db` without
/// ports, and on another network a `secret` with ports.
fn snapshot() -> Snapshot {
    let ports = || {
        vec![
            port("dns", 53, PortProtocol::Udp),
            port("http", 8080, PortProtocol::Tcp),
            port("metrics", 9100, PortProtocol::Tcp),
        ]
    };
    SnapshotBuilder::new()
        .endpoints((1..=3).map(|i| ep("app", 10 + i, &format!("echo{i}"), "echo_api", ports())))
        .endpoint(ep("app", 20, "db", "db", vec![]))
        .endpoint(ep("other", 30, "secret", "secret", ports()))
        .build()
}

fn ask(snap: &Snapshot, networks: &[&str], name: &str, qtype: u16) -> Answer {
    answer(
        snap,
        networks,
        &stub_query(7, name, qtype),
        Transport::Udp,
        5,
    )
}

fn reply(snap: &Snapshot, networks: &[&str], name: &str, qtype: u16) -> Message {
    match ask(snap, networks, name, qtype) {
        Answer::Reply(bytes) => Message::from_vec(&bytes).expect("our response decodes"),
        other => panic!("{name}: expected a reply, got {other:?}"),
    }
}

/// (priority, weight, port, target) of every SRV answer, in answer order.
fn srv(m: &Message) -> Vec<(u16, u16, u16, String)> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => (s.priority, s.weight, s.port, s.target.to_ascii()),
            other => panic!("not an SRV: {other:?}"),
        })
        .collect()
}

/// (owner, address) of every A record in the additional section.
fn glue(m: &Message) -> Vec<(String, Ipv4Addr)> {
    let mut out: Vec<(String, Ipv4Addr)> = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), a.0)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_service_port_answers_every_replica_with_its_address_alongside() {
    let snap = snapshot();
    let first = reply(&snap, &["app"], "_http._tcp.echo_api", TYPE_SRV);
    assert_eq!(first.metadata.response_code, ResponseCode::NoError);
    let mut answers = srv(&first);
    assert!(first.answers.iter().all(|r| r.ttl == 5));
    answers.sort();
    assert_eq!(
        answers,
        (1..=3)
            .map(|i| (0, 10, 8080, format!("echo{i}.")))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        glue(&first),
        (1..=3)
            .map(|i| (format!("echo{i}."), Ipv4Addr::new(100, 64, 2, 10 + i)))
            .collect::<Vec<_>>()
    );
    let second = reply(&snap, &["app"], "_HTTP._tcp.Echo_Api", TYPE_SRV);
    assert_eq!(srv(&second).len(), 3);
    assert_ne!(srv(&first)[0], srv(&second)[0], "rotated between queries");
    let qualified = reply(&snap, &["app"], "_http._tcp.echo_api.app", TYPE_SRV);
    assert_eq!(srv(&qualified).len(), 3);
    let udp = reply(&snap, &["app"], "_dns._udp.echo_api", TYPE_SRV);
    assert!(srv(&udp).iter().all(|s| s.2 == 53) && srv(&udp).len() == 3);
    // The target answers A itself, on the same server.
    let target = reply(&snap, &["app"], "echo2", TYPE_A);
    assert_eq!(target.answers.len(), 1);
}

#[test]
fn one_endpoint_answers_its_own_ports() {
    let m = reply(&snapshot(), &["app"], "_metrics._tcp.echo3", TYPE_SRV);
    assert_eq!(srv(&m), [(0, 10, 9100, "echo3.".to_owned())]);
    assert_eq!(
        glue(&m),
        [("echo3.".to_owned(), Ipv4Addr::new(100, 64, 2, 13))]
    );
}

#[test]
fn consul_style_names_give_each_replicas_first_tcp_port() {
    let m = reply(&snapshot(), &["app"], "echo_api.service", TYPE_SRV);
    let mut answers = srv(&m);
    answers.sort();
    assert_eq!(
        answers,
        (1..=3)
            .map(|i| (0, 10, 8080, format!("echo{i}.")))
            .collect::<Vec<_>>()
    );
    assert_eq!(glue(&m).len(), 3);
}

#[test]
fn names_without_srv_data_are_nodata_and_unknown_ones_are_forwarded() {
    let snap = snapshot();
    for (name, qtype) in [
        ("db", TYPE_SRV),
        ("echo_api", TYPE_SRV),
        ("_http._tcp.echo_api", TYPE_A),
    ] {
        let m = reply(&snap, &["app"], name, qtype);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.answers.is_empty(), "{name} type {qtype}");
    }
    for name in ["_http._tcp.db", "db.service", "_http._udp.echo_api"] {
        assert_eq!(
            ask(&snap, &["app"], name, TYPE_SRV),
            Answer::Forward,
            "{name}"
        );
    }
}

#[test]
fn another_networks_services_are_not_visible() {
    let snap = snapshot();
    for name in [
        "_http._tcp.secret",
        "secret.service",
        "_http._tcp.secret.other",
    ] {
        assert_eq!(
            ask(&snap, &["app"], name, TYPE_SRV),
            Answer::Forward,
            "{name}"
        );
        assert_eq!(
            srv(&reply(&snap, &["app", "other"], name, TYPE_SRV)).len(),
            1
        );
    }
}

#[test]
fn an_unhealthy_replica_leaves_the_service_but_keeps_its_own_ports() {
    let mut sick = snapshot();
    let record = |in_service| EndpointRecord {
        in_service,
        ..ep(
            "app",
            12,
            "echo2",
            "echo_api",
            vec![port("http", 8080, PortProtocol::Tcp)],
        )
    };
    let full = |in_service| EndpointRecord {
        ports: vec![
            port("dns", 53, PortProtocol::Udp),
            port("http", 8080, PortProtocol::Tcp),
            port("metrics", 9100, PortProtocol::Tcp),
        ],
        ..record(in_service)
    };
    sick = sick.apply(&[full(true)], &[full(false)]);
    let m = reply(&sick, &["app"], "_http._tcp.echo_api", TYPE_SRV);
    assert_eq!(srv(&m).len(), 2);
    assert!(srv(&m).iter().all(|s| s.3 != "echo2."));
    assert_eq!(
        srv(&reply(&sick, &["app"], "echo_api.service", TYPE_SRV)).len(),
        2
    );
    assert_eq!(
        srv(&reply(&sick, &["app"], "_http._tcp.echo2", TYPE_SRV)).len(),
        1
    );
}

#[test]
fn answers_too_big_for_udp_truncate_and_glue_is_left_out_first() {
    let many = SnapshotBuilder::new()
        .endpoints((0..40u8).map(|i| {
            ep(
                "app",
                i,
                &format!("replica-with-a-long-name-{i}"),
                "web",
                vec![port("http", 80, PortProtocol::Tcp)],
            )
        }))
        .build();
    let Answer::Reply(bytes) = ask(&many, &["app"], "_http._tcp.web", TYPE_SRV) else {
        panic!("a reply");
    };
    assert!(bytes.len() <= 512);
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty());
    // Eight replicas: the SRV records fit 512 bytes, not all their addresses.
    let some = SnapshotBuilder::new()
        .endpoints((0..8u8).map(|i| {
            ep(
                "app",
                i,
                &format!("replica-with-a-long-name-{i}"),
                "web",
                vec![port("http", 80, PortProtocol::Tcp)],
            )
        }))
        .build();
    let Answer::Reply(bytes) = ask(&some, &["app"], "_http._tcp.web", TYPE_SRV) else {
        panic!("a reply");
    };
    assert!(bytes.len() <= 512, "{}", bytes.len());
    let m = Message::from_vec(&bytes).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 8);
    assert!(glue(&m).len() < 8, "{}", glue(&m).len());
}

#[test]
fn a_replica_on_two_of_the_askers_networks_is_one_srv_record() {
    let http = || vec![port("http", 80, PortProtocol::Tcp)];
    let snap = SnapshotBuilder::new()
        .endpoint(ep("app", 1, "both", "web", http()))
        .endpoint(EndpointRecord {
            address: Ipv4Addr::new(100, 65, 0, 1),
            ..ep("back", 1, "both", "web", http())
        })
        .build();
    let m = reply(&snap, &["app", "back"], "_http._tcp.web", TYPE_SRV);
    assert_eq!(srv(&m), [(0, 10, 80, "both.".to_owned())]);
    assert_eq!(
        glue(&m),
        [
            ("both.".to_owned(), Ipv4Addr::new(100, 64, 2, 1)),
            ("both.".to_owned(), Ipv4Addr::new(100, 65, 0, 1))
        ]
    );
}
