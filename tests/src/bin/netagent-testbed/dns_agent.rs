//! `dns-agent`: a running agent (embedded local store) with the DNS benchmark's names
//! and NAMESPACES attached namespaces, for scripts/bench/dns.sh to query at
//! 127.0.0.11 from inside them, as containers do. Runs until its standard input
//! closes, then removes everything it made.

use std::io::Read;

use netagent_tests::cluster::Cluster;

/// Prints one line, `ready agent_pid=PID clients=NS,NS,...` (every attached namespace
/// not holding one of the names, the first ones first), once the names resolve.
pub fn run(namespaces: usize) {
    let mut c = Cluster::local();
    c.start_agent(1);
    crate::common::create_bench_network(&c);
    let db = c.bed.container("db");
    c.attach(1, &db, "bench", &["--name", "db"]);
    for i in 1..=3 {
        let ns = c.bed.container(&format!("echo{i}"));
        let name = format!("echo_api.{i}");
        c.attach(1, &ns, "bench", &["--name", &name, "--service", "echo_api"]);
    }
    let clients = c.bed.containers("cl", namespaces.saturating_sub(4).max(1));
    for (i, ns) in clients.iter().enumerate() {
        c.attach(1, ns, "bench", &["--name", &format!("client{i}")]);
    }
    let first = &clients[0];
    netagent_tests::cluster::wait_for(
        std::time::Duration::from_secs(10),
        "echo_api to resolve to 3 replicas",
        || netagent_tests::cluster::resolve(first, "echo_api").len() == 3,
    );
    let pid = c.agent_pid(1).expect("agent running");
    println!("ready agent_pid={pid} clients={}", clients.join(","));
    // Until the script closes our standard input (or exits).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
