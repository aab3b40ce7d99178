//! The UDP server's per-packet step ([`netagent_dns::answer`]): an A query for a local
//! service with three replicas, and a name that is not local (parsed, looked up,
//! handed to the forwarder; the forwarding itself is not measured).
//!
//! `cargo bench -p netagent-dns --bench query`

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion};
use netagent_dns::{answer, Answer, EndpointRecord, Snapshot, SnapshotBuilder, Transport};

const NETWORK: &str = "app";

/// `db` and three `echo_api` replicas, as in the DNS benchmark on the test bed.
fn snapshot() -> Snapshot {
    let record = |ip: [u8; 4], name: &str, service: &str| {
        EndpointRecord::replica(NETWORK, Ipv4Addr::from(ip), name, Some(service))
    };
    SnapshotBuilder::new()
        .endpoints([
            record([100, 64, 1, 11], "db", "db"),
            record([100, 64, 2, 10], "echo_api.1", "echo_api"),
            record([100, 64, 2, 11], "echo_api.2", "echo_api"),
            record([100, 64, 3, 12], "echo_api.3", "echo_api"),
        ])
        .build()
}

/// A recursive query for `name`, type A, class IN, as a stub resolver sends it.
fn a_query(name: &str) -> Vec<u8> {
    netagent_dns::stub_query(0x4e41, name, 1)
}

fn answer_count(reply: &[u8]) -> u16 {
    u16::from_be_bytes([reply[6], reply[7]])
}

fn query_path(c: &mut Criterion) {
    let snapshot = snapshot();
    let networks = [NETWORK];
    let ask = |packet: &[u8]| {
        answer(
            black_box(&snapshot),
            black_box(&networks),
            black_box(packet),
            Transport::Udp,
            netagent_dns::DEFAULT_TTL,
        )
    };

    // The measured paths are the intended ones: three records, and a forward.
    let local = a_query("echo_api");
    match ask(&local) {
        Answer::Reply(bytes) => assert_eq!(answer_count(&bytes), 3),
        other => panic!("echo_api not answered locally: {other:?}"),
    }
    let outside = a_query("www.example.com");
    assert_eq!(ask(&outside), Answer::Forward);

    c.bench_function("local A, 3 replicas", |b| b.iter(|| ask(&local)));
    c.bench_function("not local, forward decided", |b| b.iter(|| ask(&outside)));
}

criterion_group!(benches, query_path);
criterion_main!(benches);
