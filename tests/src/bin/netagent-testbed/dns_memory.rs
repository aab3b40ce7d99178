//! `dns-memory`: resident memory and update cost of a large record set.

use std::net::Ipv4Addr;
use std::time::Instant;

use crate::common::vm_rss_kib;

/// This process's resident memory in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    vm_rss_kib(&status).unwrap_or(0.0) / 1024.0
}

fn bench_record(i: u32, in_service: bool) -> netagent_dns::EndpointRecord {
    netagent_dns::EndpointRecord {
        network: format!("net{}", i % 10),
        address: Ipv4Addr::from(0x6440_0000 + i),
        name: format!("project_web_{i}"),
        service: Some(format!("svc{}", i % 1000)),
        aliases: vec![],
        in_service,
        ports: vec![],
    }
}

/// Resident memory of a process holding 100,000 records (10 networks, 1,000
/// services, Compose-style names), and the cost of updating one endpoint.
pub fn run() {
    let baseline = rss_mib();
    let records: Vec<_> = (0..100_000u32).map(|i| bench_record(i, true)).collect();
    let t = Instant::now();
    let mut current = netagent_dns::SnapshotBuilder::new()
        .endpoints(records)
        .build();
    let build = t.elapsed();
    let mut times = Vec::new();
    for i in 0..21u32 {
        let old = bench_record(i, true);
        let new = bench_record(i, i % 2 == 0);
        let t = Instant::now();
        current = current.apply(&[old], &[new]);
        times.push(t.elapsed());
    }
    times.sort();
    let update = times[times.len() / 2];
    let total = rss_mib();
    std::hint::black_box(&current);
    println!("full build of 100,000 records: {build:?}; update of one endpoint (median of 21): {update:?}");
    println!(
        "rss_mib={total:.1} baseline_rss_mib={baseline:.1} build_ms={} update_ms={:.2}",
        build.as_millis(),
        update.as_secs_f64() * 1000.0
    );
}
