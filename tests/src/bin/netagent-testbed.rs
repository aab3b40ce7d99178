//! Drives the test bed from scripts: `demo` (scripts/demo.sh) and `bench-overlay`
//! (scripts/bench/overlay.sh). Runs as root; everything it makes is removed on exit.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netagent_tests::cluster::Cluster;
use netagent_tests::docker::{DockerHost, IMAGE};
use netagent_tests::{Mesh, Testbed};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("bench-overlay") => {
            bench_overlay(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10))
        }
        Some("dns-serve") => dns_serve(args.get(1).map_or("127.0.0.1:5301", String::as_str)),
        Some("dns-memory") => dns_memory(),
        Some("bench-convergence") => {
            bench_convergence(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100))
        }
        Some("bench-wireguard") => bench_wireguard(
            args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5),
            args.get(2)
                .cloned()
                .unwrap_or_else(|| "boringtun-cli".into()),
            args.get(3).cloned(),
        ),
        _ => {
            eprintln!("usage: netagent-testbed demo | bench-overlay [SECONDS] | dns-serve ADDR | dns-memory | bench-convergence [ATTACHES] | bench-wireguard [SECONDS] [BORINGTUN_CLI] [MODERN_WIREGUARD_GO]");
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

/// Three hosts, etcd, an agent each; a network, a `db` and three `echo_api`
/// replicas spread over the hosts, seen from a client on host 1.
fn demo() {
    step("etcd over mutual TLS (a CA, server and client certificates made with openssl) and three hosts (network namespaces on one underlay: 192.0.2.11-13), `netagent agent` on each");
    let mut c = Cluster::running(3, 5);
    let run = |c: &Cluster, host: usize, args: &[&str]| {
        println!("$ netagent {}        # on host{host}", args.join(" "));
        print!("{}", c.cli_ok(host, args));
    };
    run(&c, 1, &["status"]);
    run(
        &c,
        1,
        &["network", "create", "app-net", "--subnet", "100.64.0.0/16"],
    );
    run(
        &c,
        1,
        &[
            "network",
            "create",
            "other-net",
            "--subnet",
            "100.65.0.0/16",
        ],
    );

    step("containers (namespaces) attached on the hosts they run on");
    let client = c.bed.container("client");
    let db = c.bed.container("db");
    let replicas: Vec<(usize, String)> = [(2, "api1"), (2, "api2"), (3, "api3")]
        .iter()
        .map(|(h, n)| (*h, c.bed.container(n)))
        .collect();
    let outsider = c.bed.container("outsider");
    let attach = |c: &Cluster, host: usize, ns: &str, net: &str, extra: &[&str]| {
        let path = format!("/run/netns/{ns}");
        let mut args = vec!["attach", path.as_str(), net];
        args.extend_from_slice(extra);
        run(c, host, &args);
    };
    attach(&c, 1, &client, "app-net", &["--name", "client"]);
    attach(&c, 1, &db, "app-net", &["--service", "db", "--name", "db"]);
    for (i, (h, ns)) in replicas.iter().enumerate() {
        let name = format!("echo_api.{}", i + 1);
        attach(
            &c,
            *h,
            ns,
            "app-net",
            &["--service", "echo_api", "--name", &name],
        );
    }
    attach(&c, 3, &outsider, "other-net", &["--name", "outsider"]);

    step("the mesh, the services and every endpoint, as host 1 sees them");
    std::thread::sleep(Duration::from_millis(2500)); // one round-trip probe
    run(&c, 1, &["peers"]);
    run(&c, 1, &["services"]);
    run(&c, 1, &["endpoints"]);

    step("each echo_api replica serves its name over HTTP (busybox httpd)");
    for (i, (_, ns)) in replicas.iter().enumerate() {
        let dir = c.dir.join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("index.html"),
            format!("hello from echo_api.{}\n", i + 1),
        )
        .unwrap();
        c.bed.spawn(
            ns,
            "busybox",
            &["httpd", "-f", "-p", "80", "-h", dir.to_str().unwrap()],
        );
    }
    // The client's resolver is the embedded DNS, as in a Docker container.
    let etc = format!("/etc/netns/{client}");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.11\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));

    step("round-robin: echo_api from the client on host 1, four times (order rotates)");
    for _ in 0..4 {
        show(
            &c.bed,
            &client,
            "client",
            "dig +short echo_api | tr '\\n' ' '; echo",
        );
    }
    show(
        &c.bed,
        &client,
        "client",
        "busybox nslookup db 127.0.0.11 | tail -n +3",
    );

    step("requests by name reach every replica across hosts");
    for _ in 0..3 {
        show(
            &c.bed,
            &client,
            "client",
            "busybox wget -q -O - http://echo_api/",
        );
    }

    step("other-net is isolated from app-net; its names are not visible either");
    let reach = c.bed.ping(&outsider, "100.64.0.2".parse().unwrap());
    println!(
        "outsider (other-net, host3) -> client (app-net, host1): {}",
        if reach { "REACHABLE (bug!)" } else { "blocked" }
    );
    show(
        &c.bed,
        &outsider,
        "outsider",
        "dig +short @127.0.0.11 echo_api; echo \"(no answer: NXDOMAIN)\"",
    );

    step("an encrypted network: between hosts only WireGuard (userspace, ours) carries it");
    run(
        &c,
        1,
        &[
            "network",
            "create",
            "secure-net",
            "--subnet",
            "100.66.0.0/16",
            "--encrypted",
        ],
    );
    let vault = c.bed.container("vault");
    attach(&c, 3, &vault, "secure-net", &["--service", "vault"]);
    attach(&c, 1, &client, "secure-net", &[]);
    let dir = c.dir.join("vault");
    std::fs::create_dir_all(&dir).unwrap();
    // 4 MiB, so the transfer shows in the byte counters.
    std::fs::write(dir.join("index.html"), vec![b'x'; 4 << 20]).unwrap();
    c.bed.spawn(
        &vault,
        "busybox",
        &["httpd", "-f", "-p", "80", "-h", dir.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_millis(300));
    show(
        &c.bed,
        &client,
        "client",
        "busybox wget -q -O - http://vault/ | wc -c",
    );
    run(&c, 1, &["peers"]);

    step("Docker, the seed's Compose case: a dockerd on host 1 and on host 2; containers run with --network none and a label, the agents (restarted to follow their engine) do the rest");
    let engines: Vec<DockerHost> = (1..=2)
        .map(|h| {
            let dir = std::env::temp_dir().join(format!("{}-docker{h}", c.bed.id));
            DockerHost::start(&c.bed.hosts[h - 1].netns, &dir)
        })
        .collect();
    for (i, e) in engines.iter().enumerate() {
        c.stop_agent(i + 1);
        c.docker_sockets[i] = Some(e.socket.clone());
        c.start_agent(i + 1);
    }
    let web = ["netagent.network=app-net", "com.docker.compose.service=web"];
    for name in ["web1", "web2"] {
        println!("$ docker run -d --network none --label {} --label {} --name {name} {IMAGE} sh -c 'hostname > /www/index.html; httpd -f -p 80 -h /www'        # on host2", web[0], web[1]);
        engines[1].run_web(name, &web, &[]);
    }
    println!("$ docker run -d --network none --label netagent.network=app-net --name shell {IMAGE} sleep 1d        # on host1");
    engines[0].run(
        "shell",
        &["netagent.network=app-net"],
        &[],
        &["sleep", "86400"],
    );
    netagent_tests::cluster::wait_for(Duration::from_secs(10), "web to resolve", || {
        engines[0].nslookup("shell", "web").len() == 2
    });
    let docker_exec = |cmd: &[&str]| {
        println!("$ docker exec shell {}        # on host1", cmd.join(" "));
        println!("{}", engines[0].exec_ok("shell", cmd));
    };
    docker_exec(&["cat", "/etc/resolv.conf"]);
    docker_exec(&["nslookup", "-type=a", "web"]);
    for _ in 0..2 {
        docker_exec(&["wget", "-q", "-O", "-", "http://web/"]);
    }
    docker_exec(&["nslookup", "-type=a", "db"]);
    run(&c, 1, &["services"]);
    drop(engines);

    step("cleaning up");
    let _ = std::fs::remove_dir_all(&etc);
    drop(c);
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
    // A bare VXLAN pair between the same hosts, no bridge, no veth, no firewall, on a
    // port of its own (4789 and 4790 are the agent's, taken only from its peers), its
    // outer packets untracked as the agent's are.
    for (me, peer, addr) in [(&h1, &h2, "198.51.100.1"), (&h2, &h1, "198.51.100.2")] {
        bed.exec_ok(
            &me.netns,
            &format!(
                "ip link add vxbare type vxlan id 999 local {} remote {} dstport 4800 dev eth0 && \
             ip addr add {addr}/24 dev vxbare && ip link set vxbare up && \
             nft add table ip benchbare && \
             nft add chain ip benchbare pre '{{ type filter hook prerouting priority raw; }}' && \
             nft add chain ip benchbare out '{{ type filter hook output priority raw; }}' && \
             nft add rule ip benchbare pre udp dport 4800 notrack && \
             nft add rule ip benchbare out udp dport 4800 notrack",
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
            netagent_dns::Forwarder::new(vec![]).expect("no upstream, no socket"),
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

/// A DNS query for `name` (type A), id 0x4e41.
fn a_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x4e, 0x41, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
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
fn bench_convergence(attaches: usize) {
    let ttl = 3;
    let mut c = Cluster::running(3, ttl);
    // /22 blocks: one host holds up to 1,021 endpoints of the network.
    c.cli_ok(
        1,
        &[
            "network",
            "create",
            "bench",
            "--subnet",
            "100.64.0.0/14",
            "--block-size",
            "22",
        ],
    );
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
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
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

/// iperf3 -P1 from `client_ns` to `target` (a server in `server_ns`), in Gbit/s.
fn iperf_gbps(
    bed: &mut Testbed,
    server_ns: &str,
    client_ns: &str,
    target: &str,
    seconds: u32,
) -> f64 {
    let pid = bed.spawn(server_ns, "iperf3", &["-s", "-1", "-B", target]);
    std::thread::sleep(Duration::from_millis(400));
    let out = bed.exec(client_ns, &format!("iperf3 -c {target} -t {seconds} -J"));
    let _ = bed.kill(pid);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if std::env::var("BENCH_VERBOSE").is_ok() {
        eprintln!(
            "  {target}: retransmits {}",
            json["end"]["sum_sent"]["retransmits"]
        );
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// A userspace WireGuard tunnel between hosts 1 and 2 made by `program` (wireguard-go
/// or boringtun-cli), configured with `wg` over its UAPI socket; returns the address
/// of host 2's end and the daemons' pids.
fn userspace_tunnel(
    bed: &mut Testbed,
    program: &str,
    extra: &[&str],
    prefix: &str,
    net: u8,
) -> (String, Vec<u32>) {
    let (h1, h2) = (bed.hosts[0].clone(), bed.hosts[1].clone());
    let key = |_: ()| netagent_tests::sh_ok("wg genkey").trim().to_owned();
    let keys = [key(()), key(())];
    let public: Vec<String> = keys
        .iter()
        .map(|k| {
            netagent_tests::sh_ok(&format!("echo {k} | wg pubkey"))
                .trim()
                .to_owned()
        })
        .collect();
    let mut pids = Vec::new();
    for (i, (me, peer)) in [(&h1, &h2), (&h2, &h1)].into_iter().enumerate() {
        let dev = format!("{prefix}{}", i + 1);
        let mut args: Vec<&str> = extra.to_vec();
        args.push(&dev);
        // A killed daemon leaves its UAPI socket behind; wg would talk to that.
        let sock = format!("/var/run/wireguard/{dev}.sock");
        let _ = std::fs::remove_file(&sock);
        pids.push(bed.spawn(&me.netns, program, &args));
        let start = Instant::now();
        while !std::path::Path::new(&sock).exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{program} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let keyfile = std::env::temp_dir().join(format!("{}-{dev}.key", bed.id));
        std::fs::write(&keyfile, &keys[i]).unwrap();
        let port = 52000 + u32::from(net) * 10 + i as u32;
        let peer_port = 52000 + u32::from(net) * 10 + (1 - i) as u32;
        bed.exec_ok(
            &me.netns,
            &format!(
                "wg set {dev} private-key {} listen-port {port} peer {} endpoint {}:{peer_port} allowed-ips 100.{net}.0.{}/32 && \
                 ip addr add 100.{net}.0.{}/24 dev {dev} && ip link set {dev} mtu 1420 up",
                keyfile.display(),
                public[1 - i],
                peer.underlay,
                2 - i,
                i + 1
            ),
        );
        let _ = std::fs::remove_file(keyfile);
    }
    (format!("100.{net}.0.2"), pids)
}

/// Encrypted netagent network against wireguard-go (Debian's, and a modern build with
/// its TUN and UDP offloads when `modern_wireguard_go` names one) and boringtun-cli
/// tunnels between the same two hosts, plain VXLAN (our plain network) and the raw
/// underlay; iperf3 -P1, paths interleaved, three rounds, medians.
fn bench_wireguard(seconds: u32, boringtun: String, modern_wireguard_go: Option<String>) {
    let mut c = Cluster::running(2, 5);
    c.create_network("plain", "100.64.0.0/16");
    c.create_encrypted_network("secure", "100.66.0.0/16");
    let (p1, p2, s1, s2) = (
        c.bed.container("p1"),
        c.bed.container("p2"),
        c.bed.container("s1"),
        c.bed.container("s2"),
    );
    c.attach(1, &p1, "plain", &[]);
    let ip_p2 = c.attach(2, &p2, "plain", &[]).to_string();
    c.attach(1, &s1, "secure", &[]);
    let ip_s2 = c.attach(2, &s2, "secure", &[]).to_string();
    netagent_tests::cluster::wait_for(Duration::from_secs(10), "the mesh", || {
        c.bed.ping(&s1, ip_s2.parse().unwrap())
    });
    if std::env::var_os("BENCH_QUICK").is_some() {
        // While working on the datapath: ours only, against plain VXLAN.
        for round in 1..=3 {
            let e = iperf_gbps(&mut c.bed, &s2, &s1, &ip_s2, seconds);
            let v = iperf_gbps(&mut c.bed, &p2, &p1, &ip_p2, seconds);
            println!("round {round}: netagent encrypted {e:.2} Gbit/s, plain vxlan {v:.2}");
        }
        return;
    }
    let (h1, h2) = (c.bed.hosts[0].netns.clone(), c.bed.hosts[1].netns.clone());
    let underlay = c.bed.hosts[1].underlay.to_string();
    let (wgo, _) = userspace_tunnel(&mut c.bed, "wireguard-go", &["-f"], "wgo", 100);
    const ROUNDS: usize = 3;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let modern = modern_wireguard_go
        .map(|program| userspace_tunnel(&mut c.bed, &program, &["-f"], "wgm", 99).0);
    let (mut enc, mut go, mut vx, mut raw, mut gom) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 1..=ROUNDS {
        enc.push(iperf_gbps(&mut c.bed, &s2, &s1, &ip_s2, seconds));
        go.push(iperf_gbps(&mut c.bed, &h2, &h1, &wgo, seconds));
        if let Some(addr) = &modern {
            gom.push(iperf_gbps(&mut c.bed, &h2, &h1, addr, seconds));
        }
        vx.push(iperf_gbps(&mut c.bed, &p2, &p1, &ip_p2, seconds));
        raw.push(iperf_gbps(&mut c.bed, &h2, &h1, &underlay, seconds));
        println!(
            "round {round}: netagent encrypted {:.2} Gbit/s, wireguard-go {:.2}, modern wireguard-go {}, plain vxlan {:.2}, raw underlay {:.2}",
            enc[round - 1],
            go[round - 1],
            gom.last().map_or("-".into(), |g| format!("{g:.2}")),
            vx[round - 1],
            raw[round - 1]
        );
    }
    // boringtun-cli at each thread count, rounds interleaved with ours again.
    let mut bt_best = 0.0f64;
    let mut bt_line = String::new();
    for threads in ["1", "2", "4"] {
        let (addr, pids) = userspace_tunnel(
            &mut c.bed,
            &boringtun,
            &["-f", "--disable-drop-privileges", "--threads", threads],
            &format!("bt{threads}x"),
            100 + threads.parse::<u8>().unwrap(),
        );
        let mut bt = vec![];
        for round in 1..=ROUNDS {
            bt.push(iperf_gbps(&mut c.bed, &h2, &h1, &addr, seconds));
            enc.push(iperf_gbps(&mut c.bed, &s2, &s1, &ip_s2, seconds));
            println!(
                "boringtun-cli --threads {threads} round {round}: {:.2} Gbit/s (netagent encrypted {:.2})",
                bt[round - 1],
                enc[enc.len() - 1]
            );
        }
        let m = median(bt);
        bt_line.push_str(&format!("boringtun_t{threads}_gbps={m:.2} "));
        bt_best = bt_best.max(m);
        for pid in pids {
            c.bed.kill(pid);
        }
    }
    let (e, g, v, r) = (median(enc), median(go), median(vx), median(raw));
    let modern_line = if gom.is_empty() {
        String::new()
    } else {
        let m = median(gom);
        format!(
            " wireguard_go_modern_gbps={m:.2} vs_wireguard_go_modern={:.2}",
            e / m
        )
    };
    println!(
        "encrypted_gbps={e:.2} wireguard_go_gbps={g:.2} boringtun_gbps={bt_best:.2} {bt_line}vxlan_gbps={v:.2} underlay_gbps={r:.2} vs_wireguard_go={:.2} vs_boringtun={:.2}{modern_line}",
        e / g,
        e / bt_best
    );
}
