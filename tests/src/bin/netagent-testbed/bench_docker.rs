//! `bench-docker`: netagent as Docker's network driver on two hosts
//! (scripts/bench/docker.sh): `docker run -d` latency on a netagent network against
//! a Docker bridge network and `--network none`, and how soon a container started on
//! host 1 resolves by name inside a container on host 2.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::docker::{DockerHost, IMAGE};
use netagent_tests::sh_ok;

use crate::common::step;

/// The netagent network: made on host 1, mirrored by every agent.
const NETAGENT_NET: &str = "bench";
const NETAGENT_SUBNET: &str = "100.80.0.0/16";
/// Docker's own user-defined bridge network, the yardstick.
const BRIDGE_NET: &str = "benchbr";
const BRIDGE_SUBNET: &str = "100.81.0.0/24";
/// The networks whose start latency is compared, with their container name prefixes.
const KINDS: [(&str, &str); 3] = [(NETAGENT_NET, "n"), (BRIDGE_NET, "b"), ("none", "x")];
/// Goals: start latency against the bridge network's, and start to resolvable on the
/// other host.
const START_RATIO_GOAL: f64 = 1.2;
const RESOLVE_P99_GOAL_MS: f64 = 100.0;
/// A name not resolvable by then counts as a miss.
const RESOLVE_LIMIT: Duration = Duration::from_secs(10);

/// Engines first: they are dropped (containers removed, dockerd stopped) before the
/// cluster's agents and namespaces go.
struct DockerCluster {
    engines: Vec<DockerHost>,
    /// etcd, the agents and the namespaces: only held, until the engines are gone.
    _cluster: Cluster,
}

impl DockerCluster {
    /// Two hosts, each with a dockerd (started first, as at boot) and an agent
    /// following it and serving the plugin API in that engine's plugin directory.
    fn new() -> Self {
        let hosts = 2;
        let mut c = Cluster::new(hosts, 3);
        let engines = netagent_tests::docker::engines_with_driver(&mut c);
        DockerCluster {
            engines,
            _cluster: c,
        }
    }

    /// Removes every container on every engine.
    fn remove_containers(&self) {
        for e in &self.engines {
            let ids = e.docker_ok(&["ps", "-aq"]);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                e.docker_ok(&args);
            }
        }
    }
}

/// Percentiles and mean of a sample, in ms.
struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
    max: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        assert!(!v.is_empty(), "no samples");
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        Stats {
            p50: pct(0.5),
            p99: pct(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            max: pct(1.0),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Wall clock around one docker CLI call on `e`, which must succeed.
fn timed_docker(e: &DockerHost, args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = e.docker(args);
    let took = ms(t.elapsed());
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn docker_networks(e: &DockerHost) -> String {
    e.docker_ok(&["network", "ls", "--format", "{{.Name}}"])
}

/// A UDP socket in the network namespace of process `pid`, connected to the
/// embedded DNS at 127.0.0.11:53: a query costs a round trip, not a process start.
fn dns_socket_in(pid: u32) -> UdpSocket {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("open the network namespace of process {pid}: {e}"));
    std::thread::spawn(move || {
        // SAFETY: the fd is an open namespace file owned by `ns` for the whole call;
        // setns changes only this (short-lived) thread's namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("127.0.0.11:53").unwrap();
        s
    })
    .join()
    .unwrap()
}

/// Asks `name` (type A) at 127.0.0.11 every 2 ms until an answer with records comes
/// back; the time taken, or None after `limit`. Answers to earlier polls count too:
/// a slow negative answer must not hold the next poll back.
fn poll_until_resolves(s: &UdpSocket, name: &str, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1500];
    // Late answers to earlier questions are not this name's.
    s.set_nonblocking(true).unwrap();
    while s.recv(&mut buf).is_ok() {}
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    let question = netagent_dns::stub_query(0, name, 1).split_off(12);
    let start = Instant::now();
    let mut id: u16 = 0;
    while start.elapsed() < limit {
        id = id.wrapping_add(1);
        let _ = s.send(&netagent_dns::stub_query(id, name, 1));
        while let Ok(n) = s.recv(&mut buf) {
            let r = &buf[..n];
            let answers = if r.len() >= 12 {
                u16::from_be_bytes([r[6], r[7]])
            } else {
                0
            };
            if answers > 0 && r.get(12..12 + question.len()) == Some(&question[..]) {
                return Some(start.elapsed());
            }
        }
    }
    None
}

/// One round trip for a name that resolves: the floor of every figure above.
fn query_rtt_ms(s: &UdpSocket, name: &str, rounds: usize) -> Stats {
    let v = (0..rounds)
        .map(|_| {
            ms(poll_until_resolves(s, name, Duration::from_secs(1))
                .unwrap_or_else(|| panic!("{name} stopped resolving")))
        })
        .collect();
    Stats::of(v)
}

/// Start latency, interleaved round robin over the kinds (each round starts with the
/// next kind), so the machine's drift and the growing container count hit all alike.
fn start_latency(d: &DockerCluster, n: usize) -> Vec<Stats> {
    let e = &d.engines[0];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    for i in 0..n {
        for k in 0..KINDS.len() {
            let kind = (i + k) % KINDS.len();
            let (network, prefix) = KINDS[kind];
            let name = format!("{prefix}{i}");
            samples[kind].push(timed_docker(
                e,
                &[
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "--network",
                    network,
                    IMAGE,
                    "sleep",
                    "3600",
                ],
            ));
        }
    }
    samples.into_iter().map(Stats::of).collect()
}

/// Result of the cross-host phase.
struct Spread {
    stats: Stats,
    misses: usize,
    run: Stats,
}

/// `docker run -d` on host 1 returned -> the name resolves in a host-2 container.
fn resolvable_on_other_host(d: &DockerCluster, s: &UdpSocket, n: usize) -> Spread {
    let mut lat = Vec::new();
    let mut run = Vec::new();
    let mut misses = 0;
    for i in 1..=n {
        let name = format!("r{i}");
        run.push(timed_docker(
            &d.engines[0],
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                NETAGENT_NET,
                IMAGE,
                "sleep",
                "3600",
            ],
        ));
        match poll_until_resolves(s, &name, RESOLVE_LIMIT) {
            Some(t) => lat.push(ms(t)),
            None => {
                misses += 1;
                println!("  {name} did not resolve on host 2 within {RESOLVE_LIMIT:?}");
            }
        }
    }
    if lat.is_empty() {
        lat.push(f64::NAN);
    }
    Spread {
        stats: Stats::of(lat),
        misses,
        run: Stats::of(run),
    }
}

/// The subnet of docker_gwbridge on `e`, if the engine made one (it does for a
/// container whose driver gives it no default gateway).
fn gwbridge_subnet(e: &DockerHost) -> Option<String> {
    docker_networks(e)
        .lines()
        .any(|l| l == "docker_gwbridge")
        .then(|| {
            e.docker_ok(&[
                "network",
                "inspect",
                "-f",
                "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
                "docker_gwbridge",
            ])
        })
}

pub fn run(n: usize) {
    assert!(n >= 1, "at least one container per kind");
    let command = format!("scripts/bench/docker.sh {n}");
    let date = sh_ok("date -u '+%Y-%m-%d %H:%M:%S UTC'").trim().to_owned();

    step("two hosts: etcd, a dockerd and an agent (Docker network + IPAM driver) each");
    let d = DockerCluster::new();
    let (h1, h2) = (&d.engines[0], &d.engines[1]);
    h1.create_netagent_network(NETAGENT_SUBNET, NETAGENT_NET);
    let mirrored = wait_for(Duration::from_secs(10), "bench on host 2", || {
        docker_networks(h2).lines().any(|l| l == NETAGENT_NET)
    });
    println!(
        "{NETAGENT_NET} ({NETAGENT_SUBNET}, netagent) created on host 1, on host 2 within {:.0} ms",
        ms(mirrored)
    );
    h1.docker_ok(&["network", "create", "--subnet", BRIDGE_SUBNET, BRIDGE_NET]);
    println!("{BRIDGE_NET} ({BRIDGE_SUBNET}, Docker bridge) created on host 1");

    step("the docker CLI's fixed cost: `docker version` (one API call), 20 runs");
    let cli = Stats::of(
        (0..20)
            .map(|_| timed_docker(h1, &["version", "--format", "{{.Server.Version}}"]))
            .collect(),
    );
    println!(
        "docker version: p50 {:.1} ms, mean {:.1} ms",
        cli.p50, cli.mean
    );

    step(&format!(
        "start latency: {n} x `docker run -d` per network kind on host 1, round robin"
    ));
    let starts = start_latency(&d, n);
    for ((network, _), s) in KINDS.iter().zip(&starts) {
        println!(
            "--network {network:<8} p50 {:6.1} ms  p99 {:6.1} ms  mean {:6.1} ms",
            s.p50, s.p99, s.mean
        );
    }
    let (na, br, none) = (&starts[0], &starts[1], &starts[2]);
    let ratio_p50 = na.p50 / br.p50;
    let ratio_mean = na.mean / br.mean;
    let verdict = |r: f64| {
        if r <= START_RATIO_GOAL {
            "met"
        } else {
            "NOT met"
        }
    };
    println!(
        "netagent / bridge: p50 {ratio_p50:.2}x ({}), mean {ratio_mean:.2}x ({}); goal <= {START_RATIO_GOAL}x",
        verdict(ratio_p50),
        verdict(ratio_mean)
    );
    d.remove_containers();

    step(&format!(
        "resolvable on the other host: {n} x `docker run -d` on host 1 -> the name answers at 127.0.0.11 in a host-2 container (polled every 2 ms)"
    ));
    h2.docker_ok(&[
        "run",
        "-d",
        "--name",
        "client",
        "--network",
        NETAGENT_NET,
        IMAGE,
        "sleep",
        "3600",
    ]);
    let socket = dns_socket_in(h2.pid("client"));
    poll_until_resolves(&socket, "client", RESOLVE_LIMIT)
        .expect("the client's own name resolves in its namespace");
    let floor = query_rtt_ms(&socket, "client", 200);
    let client_pid = h2.pid("client");
    let dig = Stats::of(
        (0..10)
            .map(|_| {
                let t = Instant::now();
                sh_ok(&format!(
                    "nsenter -n -t {client_pid} dig +short +tries=1 +time=1 @127.0.0.11 client A"
                ));
                ms(t.elapsed())
            })
            .collect(),
    );
    println!(
        "floor: one query for an existing name p50 {:.2} ms (one `nsenter dig` {:.1} ms, not used)",
        floor.p50, dig.p50
    );
    let spread = resolvable_on_other_host(&d, &socket, n);
    let sp = &spread.stats;
    let met = if spread.misses == 0 && sp.p99 <= RESOLVE_P99_GOAL_MS {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "run returned -> resolves on host 2: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, misses {} ({met}; goal p99 <= {RESOLVE_P99_GOAL_MS} ms)",
        sp.p50, sp.p99, sp.max, spread.misses
    );
    let gwbridge = [gwbridge_subnet(h1), gwbridge_subnet(h2)];
    d.remove_containers();

    step("summary");
    println!("date     {date}");
    println!("command  {command}   (as root)");
    println!("figure                                   p50 ms   p99 ms  mean ms");
    println!(
        "docker version (CLI fixed cost)        {:8.1} {:8.1} {:8.1}",
        cli.p50, cli.p99, cli.mean
    );
    for ((network, _), s) in KINDS.iter().zip(&starts) {
        println!(
            "docker run -d --network {network:<14} {:8.1} {:8.1} {:8.1}",
            s.p50, s.p99, s.mean
        );
    }
    println!(
        "netagent / bridge (goal <= {START_RATIO_GOAL})        {ratio_p50:8.2} {:>8} {ratio_mean:8.2}",
        "-"
    );
    println!(
        "docker run -d (phase 2, bench)         {:8.1} {:8.1} {:8.1}",
        spread.run.p50, spread.run.p99, spread.run.mean
    );
    println!(
        "resolves on host 2 (goal p99 <= {RESOLVE_P99_GOAL_MS:.0})   {:8.1} {:8.1} {:8.1}",
        sp.p50, sp.p99, sp.mean
    );
    println!(
        "DNS query floor (existing name)        {:8.2} {:8.2} {:8.2}",
        floor.p50, floor.p99, floor.mean
    );
    for (h, g) in gwbridge.iter().enumerate() {
        if let Some(subnet) = g {
            println!(
                "note: host {} made docker_gwbridge ({})",
                h + 1,
                subnet.trim()
            );
        }
    }
    drop(d);
    println!(
        "containers={n} cli_p50_ms={:.1} netagent_p50_ms={:.1} netagent_mean_ms={:.1} bridge_p50_ms={:.1} bridge_mean_ms={:.1} none_p50_ms={:.1} ratio_p50={ratio_p50:.2} ratio_mean={ratio_mean:.2} resolve_p50_ms={:.1} resolve_p99_ms={:.1} resolve_misses={} dns_floor_ms={:.2}",
        cli.p50,
        na.p50,
        na.mean,
        br.p50,
        br.mean,
        none.p50,
        sp.p50,
        sp.p99,
        spread.misses,
        floor.p50
    );
}
