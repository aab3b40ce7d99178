//! `bench-convergence`: control-plane convergence, failure detection and agent
//! memory on the test bed (scripts/bench/convergence.sh).

use std::time::{Duration, Instant};

use netagent_tests::cluster::Cluster;

use crate::common::{create_bench_network, step, vm_rss_kib};

/// A DNS query for `name` (type A), id 0x4e41.
fn a_query(name: &str) -> Vec<u8> {
    netagent_dns::stub_query(0x4e41, name, 1)
}

/// Number of answers in a DNS response.
fn answer_count(r: &[u8]) -> u16 {
    if r.len() < 12 {
        return 0;
    }
    u16::from_be_bytes([r[6], r[7]])
}

/// Convergence (attach on host 2 -> name resolves on host 1), failure detection
/// (host 3 dies -> its replica leaves host 1's answers) and agent memory with 1,000
/// endpoints over three hosts. Last line: key=value figures.
pub fn run(attaches: usize) {
    let ttl = 3;
    let mut c = Cluster::running(3, ttl);
    create_bench_network(&c);
    let client = c.bed.container("client");
    c.attach(1, &client, "bench", &["--name", "client"]);
    let ask = netagent_tests::in_netns(&client, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("127.0.0.11:53").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s
    })
    .join()
    .unwrap();
    let resolves = |name: &str| {
        let _ = ask.send(&a_query(name));
        let mut buf = [0u8; 512];
        ask.recv(&mut buf)
            .is_ok_and(|n| answer_count(&buf[..n]) > 0)
    };

    step(&format!(
        "convergence: {attaches} attaches on host 2, each polled from host 1 (1 ms)"
    ));
    let names = c.bed.containers("cv", attaches);
    let mut lat = Vec::new();
    let mut attach_ms = Vec::new();
    for (i, ns) in names.iter().enumerate() {
        let name = format!("cv{i}");
        let t = Instant::now();
        c.attach(2, ns, "bench", &["--name", &name]);
        attach_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        while !resolves(&name) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name} never resolved"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "attach returned -> resolves on host 1: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    attach_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let attach_p50 = attach_ms[attach_ms.len() / 2];
    let attach_p99 = attach_ms[((attach_ms.len() as f64 - 1.0) * 0.99).round() as usize];
    println!(
        "the attach itself (CLI call to host 2's agent: kernel + etcd): p50 {attach_p50:.1} ms, p99 {attach_p99:.1} ms"
    );

    step(&format!(
        "failure detection: host 3 killed (SIGKILL, underlay cut), lease TTL {ttl} s"
    ));
    let victim = c.bed.container("victim");
    c.attach(3, &victim, "bench", &["--name", "victim"]);
    while !resolves("victim") {
        std::thread::sleep(Duration::from_millis(5));
    }
    c.set_underlay(3, false);
    c.kill_agent(3);
    let t = Instant::now();
    while resolves("victim") {
        std::thread::sleep(Duration::from_millis(5));
    }
    let detect = t.elapsed().as_secs_f64();
    println!("victim left host 1's answers after {detect:.2} s (TTL {ttl} s)");
    c.set_underlay(3, true);
    c.start_agent(3);

    step("memory: 1,000 endpoints over three hosts");
    let total = 1000usize;
    let have = attaches + 2;
    let more = c.bed.containers("m", total - have);
    for (i, ns) in more.iter().enumerate() {
        let host = 1 + i % 3;
        c.attach(host, ns, "bench", &["--service", "mem"]);
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut rss = Vec::new();
    for host in 1..=3 {
        let pid = c.agent_pid(host).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb = vm_rss_kib(&status).unwrap();
        rss.push(kb / 1024.0);
        println!("host{host} agent RSS {:.1} MiB", kb / 1024.0);
    }
    let eps = c.cli_ok(1, &["endpoints", "--json"]);
    let n = serde_json::from_str::<serde_json::Value>(&eps)
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    println!("endpoints in the cluster: {n}");
    let max_rss = rss.iter().cloned().fold(0.0, f64::max);
    drop(c);
    println!(
        "attaches={attaches} p50_ms={:.2} p99_ms={:.2} attach_p50_ms={attach_p50:.1} attach_p99_ms={attach_p99:.1} detect_s={detect:.2} ttl_s={ttl} endpoints={n} rss_mib={max_rss:.1}",
        pct(0.5),
        pct(0.99)
    );
}
