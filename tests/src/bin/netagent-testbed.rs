//! Drives the test bed from scripts: `demo` (scripts/demo.sh) and `bench-overlay`
//! (scripts/bench/overlay.sh). Runs as root; everything it makes is removed on exit.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netagent_tests::{netagent_bin, write_state, Mesh, Testbed};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("bench-overlay") => {
            bench_overlay(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10))
        }
        Some("dns-serve") => dns_serve(args.get(1).map_or("127.0.0.1:5301", String::as_str)),
        Some("dns-memory") => dns_memory(),
        _ => {
            eprintln!("usage: netagent-testbed demo | bench-overlay [SECONDS] | dns-serve ADDR | dns-memory");
            std::process::exit(2);
        }
    }
}

fn step(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn show(bed: &Testbed, netns: &str, label: &str, cmd: &str) {
    println!("$ {label}: {cmd}");
    print!("{}", bed.exec_ok(netns, cmd));
}

/// Three hosts, an agent each, a `db` and three `echo_api` replicas spread over them.
fn demo() {
    let bin = netagent_bin();
    let bin = bin.to_str().unwrap().to_string();
    step("three hosts (network namespaces) on one underlay: 192.0.2.11-13");
    let mut bed = Testbed::new(3);
    let mut mesh = Mesh::new(&bed)
        .network("app-net", 4100, "100.64.0.0/16")
        .network("other-net", 4200, "100.65.0.0/16");
    let client = bed.container("client");
    let db = bed.container("db");
    let replicas: Vec<(usize, String)> = [(2, "echo_api.1"), (2, "echo_api.2"), (3, "echo_api.3")]
        .iter()
        .map(|(h, n)| (*h, bed.container(&n.replace(['.', '_'], ""))))
        .collect();
    let outsider = bed.container("outsider");
    let client_ip = mesh.endpoint(1, "app-net", &client, 10);
    let db_ip = mesh.endpoint(1, "app-net", &db, 11);
    let replica_ips: Vec<Ipv4Addr> = replicas
        .iter()
        .enumerate()
        .map(|(i, (h, ns))| mesh.endpoint(*h, "app-net", ns, 10 + i as u8))
        .collect();
    mesh.endpoint(3, "other-net", &outsider, 10);
    println!(
        "client {client_ip} and db {db_ip} on h1; echo_api replicas {replica_ips:?} on h2, h2, h3"
    );

    step("an agent per host applies that host's desired state (netagent apply --hold)");
    let dir = std::env::temp_dir().join(format!("{}-demo", bed.id));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, h) in bed.hosts.clone().iter().enumerate() {
        let file = dir.join(format!("{}.toml", h.name));
        write_state(&file, &mesh.state(i + 1));
        bed.spawn(
            &h.netns,
            &bin,
            &["apply", "--state", file.to_str().unwrap(), "--hold"],
        );
    }
    let t = Instant::now();
    while !bed.ping(&client, replica_ips[2]) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "overlay did not come up"
        );
    }
    println!(
        "state file of h1:\n{}",
        std::fs::read_to_string(dir.join("h1.toml")).unwrap()
    );

    step("kernel state on h1: one route, one neighbour, one FDB entry per remote host");
    let h1 = bed.hosts[0].netns.clone();
    show(&bed, &h1, "h1", "ip route show dev nax4100");
    show(&bed, &h1, "h1", "ip neigh show dev nax4100");
    show(&bed, &h1, "h1", "bridge fdb show dev nax4100");

    step("each echo_api replica serves its name over HTTP (busybox httpd)");
    for (i, (_, ns)) in replicas.iter().enumerate() {
        bed.exec_ok(
            ns,
            &format!(
                "mkdir -p /tmp/{ns} && echo 'hello from echo_api.{}' > /tmp/{ns}/index.html",
                i + 1
            ),
        );
        bed.spawn(
            ns,
            "busybox",
            &["httpd", "-f", "-p", "80", "-h", &format!("/tmp/{ns}")],
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    for ip in &replica_ips {
        show(
            &bed,
            &client,
            "client on h1",
            &format!("busybox wget -q -O - http://{ip}/"),
        );
    }

    step("other-net is isolated from app-net");
    let reach = bed.ping(&outsider, client_ip);
    println!(
        "outsider (other-net, h3) -> client (app-net, h1): {}",
        if reach { "REACHABLE (bug!)" } else { "blocked" }
    );

    step("egress: the client reaches an address outside the overlay through h1 (masquerade)");
    show(
        &bed,
        &client,
        "client",
        "ping -n -c 1 -W 1 203.0.113.1 | head -2",
    );
    println!("\nnot yet in this build: the agent serving DNS to containers (the dns crate is ready and tested), the etcd control plane, `netagent peers`.");
    step("cleaning up");
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
    println!("done");
}

/// iperf3 across two hosts: overlay (namespace to namespace), a bare kernel VXLAN pair,
/// and the raw underlay, in one run. Last line: key=value figures.
fn bench_overlay(seconds: u32) {
    let mut bed = Testbed::new(2);
    let c1 = bed.container("b1");
    let c2 = bed.container("b2");
    let mut mesh = Mesh::new(&bed).network("bench", 4300, "100.64.0.0/16");
    mesh.endpoint(1, "bench", &c1, 10);
    let server_ip = mesh.endpoint(2, "bench", &c2, 10);
    for (i, h) in bed.hosts.iter().enumerate() {
        netagent_tests::apply(&h.path(), &mesh.state(i + 1)).expect("apply");
    }
    let (h1, h2) = (bed.hosts[0].clone(), bed.hosts[1].clone());
    // A bare VXLAN pair between the same hosts, no bridge, no veth, no firewall.
    for (me, peer, addr) in [(&h1, &h2, "198.51.100.1"), (&h2, &h1, "198.51.100.2")] {
        bed.exec_ok(
            &me.netns,
            &format!(
                "ip link add vxbare type vxlan id 999 local {} remote {} dstport 4790 dev eth0 && \
             ip addr add {addr}/24 dev vxbare && ip link set vxbare up",
                me.underlay, peer.underlay
            ),
        );
    }
    let iperf =
        |bed: &mut Testbed, server_ns: &str, client_ns: &str, target: &str, streams: u32| -> f64 {
            let pid = bed.spawn(server_ns, "iperf3", &["-s", "-1", "-B", target]);
            std::thread::sleep(Duration::from_millis(400));
            let out = bed.exec_ok(
                client_ns,
                &format!("iperf3 -c {target} -t {seconds} -P {streams} -J"),
            );
            let _ = bed.kill(pid);
            let json: serde_json::Value = serde_json::from_str(&out).expect("iperf3 json");
            json["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e9
        };
    // Paths interleaved, five rounds, medians: the machine's drift hits all alike.
    const ROUNDS: usize = 5;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut figures = Vec::new();
    for streams in [1, 4] {
        let (mut o, mut v, mut u) = (vec![], vec![], vec![]);
        for round in 1..=ROUNDS {
            o.push(iperf(&mut bed, &c2, &c1, &server_ip.to_string(), streams));
            v.push(iperf(
                &mut bed,
                &h2.netns,
                &h1.netns,
                "198.51.100.2",
                streams,
            ));
            u.push(iperf(
                &mut bed,
                &h2.netns,
                &h1.netns,
                &h2.underlay.to_string(),
                streams,
            ));
            println!(
                "-P{streams} round {round}: overlay {:.2} Gbit/s, bare vxlan {:.2}, raw underlay {:.2}",
                o[round - 1], v[round - 1], u[round - 1]
            );
        }
        figures.push((median(o), median(v), median(u)));
    }
    let (o, v, u) = figures[0];
    let (o4, v4, u4) = figures[1];
    println!(
        "overlay_gbps={o:.2} vxlan_gbps={v:.2} underlay_gbps={u:.2} ratio={:.2} vs_vxlan={:.2} overlay_p4_gbps={o4:.2} vxlan_p4_gbps={v4:.2} underlay_p4_gbps={u4:.2} ratio_p4={:.2}",
        o / u, o / v, o4 / u4
    );
}

fn bench_records() -> Vec<netagent_dns::EndpointRecord> {
    let rec = |ip: [u8; 4], name: &str, service: &str| netagent_dns::EndpointRecord {
        network: "bench".into(),
        address: Ipv4Addr::from(ip),
        name: name.into(),
        service: Some(service.into()),
        aliases: vec![],
        in_service: true,
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
fn dns_serve(addr: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = netagent_dns::DnsServer::new(
            netagent_dns::Forwarder::new(vec![]),
            netagent_dns::DEFAULT_TTL,
        );
        server.update(
            netagent_dns::SnapshotBuilder::new()
                .endpoints(bench_records())
                .build(),
        );
        let scope: std::sync::Arc<[String]> = vec!["bench".to_string()].into();
        let udp = tokio::net::UdpSocket::bind(addr).await.expect("bind udp");
        let tcp = tokio::net::TcpListener::bind(addr).await.expect("bind tcp");
        server.serve_udp(udp, scope.clone());
        server.serve_tcp(tcp, scope);
        println!("serving on {addr}");
        std::future::pending::<()>().await;
    });
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn bench_record(i: u32, in_service: bool) -> netagent_dns::EndpointRecord {
    netagent_dns::EndpointRecord {
        network: format!("net{}", i % 10),
        address: Ipv4Addr::from(0x6440_0000 + i),
        name: format!("project_web_{i}"),
        service: Some(format!("svc{}", i % 1000)),
        aliases: vec![],
        in_service,
    }
}

/// Resident memory of a process holding 100,000 records (10 networks, 1,000
/// services, Compose-style names), and the cost of updating one endpoint.
fn dns_memory() {
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
