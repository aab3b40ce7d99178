//! `dns-serve`: netagent's DNS server on a loopback address, for the DNS benchmark
//! (scripts/bench/dns.sh).

use std::net::Ipv4Addr;

fn bench_records() -> Vec<netagent_dns::EndpointRecord> {
    let rec = |ip: [u8; 4], name: &str, service: &str| {
        netagent_dns::EndpointRecord::replica("bench", Ipv4Addr::from(ip), name, Some(service))
    };
    vec![
        rec([100, 64, 1, 11], "db", "db"),
        rec([100, 64, 2, 10], "echo_api.1", "echo_api"),
        rec([100, 64, 2, 11], "echo_api.2", "echo_api"),
        rec([100, 64, 3, 12], "echo_api.3", "echo_api"),
    ]
}

/// Serves the benchmark's names (`db`, a 3-replica `echo_api`) on ADDR (UDP and TCP)
/// until killed: netagent's DNS server, the same code the agent runs.
pub fn run(addr: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = netagent_dns::DnsServer::new(
            netagent_dns::Forwarder::new(vec![]).expect("no upstream, no socket"),
            netagent_dns::DEFAULT_TTL,
        );
        server.update(
            netagent_dns::SnapshotBuilder::new()
                .endpoints(bench_records())
                .build(),
        );
        let scope = netagent_dns::Scope::new(vec!["bench".to_string()]);
        let udp = tokio::net::UdpSocket::bind(addr).await.expect("bind udp");
        let tcp = tokio::net::TcpListener::bind(addr).await.expect("bind tcp");
        server.serve_udp(udp, scope.clone());
        server.serve_tcp(tcp, scope);
        println!("serving on {addr}");
        std::future::pending::<()>().await;
    });
}
