//! `bench-scale`: HOSTS agents against one etcd, 10 endpoints each
//! (scripts/bench/scale.sh): start-up and convergence, attach-to-resolvable on every
//! host, an etcd restart (time back to `ok` and the requests it caused), and each
//! agent's memory and idle CPU.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use netagent_tests::cluster::Cluster;
use netagent_tests::netagent_bin;

use crate::common::{create_bench_network, step, vm_rss_kib};

/// Endpoints attached on every host before measuring.
const PER_HOST: usize = 10;
/// Attaches whose spread to every host is measured.
const ROUNDS: usize = 20;

/// Runs the benchmark with `hosts` hosts; `agent_bin`: another `netagent` program to
/// run as the agents (an older build, for a before/after). Last line: key=value figures.
pub fn run(hosts: usize, agent_bin: Option<PathBuf>) {
    assert!(hosts >= 2, "at least 2 hosts");
    let bin = agent_bin.unwrap_or_else(netagent_bin);
    let mut c = Cluster::new(hosts, 5);

    step(&format!("{hosts} agents start against one etcd"));
    let t = Instant::now();
    for h in 1..=hosts {
        c.spawn_agent_from(h, &bin);
    }
    for h in 1..=hosts {
        wait_until(
            Duration::from_secs(120),
            &format!("host{h}'s agent"),
            || status(&c, h).is_some_and(|s| s["state"] == "ok"),
        );
    }
    let started_s = t.elapsed().as_secs_f64();
    println!("all {hosts} agents ok after {started_s:.1} s");

    step(&format!(
        "{PER_HOST} endpoints on each host ({} in all), services s0..s{}",
        hosts * PER_HOST,
        PER_HOST - 1
    ));
    create_bench_network(&c);
    let namespaces = c.bed.containers("e", hosts * PER_HOST);
    let t = Instant::now();
    let retried = attach_all(&c, &namespaces, hosts);
    let attach_s = t.elapsed().as_secs_f64();
    if retried > 0 {
        println!("{retried} attaches tried again: etcd did not answer in time");
    }
    let t = Instant::now();
    let total = hosts * PER_HOST;
    for h in 1..=hosts {
        let mut last = None;
        let converged = wait(Duration::from_secs(60), || {
            last = status(&c, h);
            last.as_ref().is_some_and(|s| {
                s["endpoints"] == total && s["peers_up"] == hosts - 1 && s["state"] == "ok"
            })
        });
        if !converged {
            // Which endpoints this host lacks, and what its agent said.
            let listed = c.cli(h, &["endpoints", "--json"]);
            let have: std::collections::BTreeSet<String> =
                serde_json::from_slice::<serde_json::Value>(&listed.stdout)
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|e| e["name"].as_str().map(str::to_owned))
                    .collect();
            let missing: Vec<String> = (1..=hosts)
                .flat_map(|h| (0..PER_HOST).map(move |j| format!("e{h}-{j}")))
                .filter(|n| !have.contains(n))
                .collect();
            eprintln!("host{h} lacks {missing:?}");
            for line in c
                .log(h)
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("again"))
            {
                eprintln!("host{h}: {line}");
            }
        }
        assert!(
            converged,
            "host{h} did not converge within 60 s; its status: {}",
            last.map(|s| format!(
                "state {} endpoints {} peers up {} down {} store {}",
                s["state"], s["endpoints"], s["peers_up"], s["peers_down"], s["store"]
            ))
            .unwrap_or_else(|| "no answer".into())
        );
    }
    let converge_s = t.elapsed().as_secs_f64();
    println!(
        "attached in {attach_s:.1} s; every host saw all {total} endpoints and {} peers {converge_s:.2} s after the last attach",
        hosts - 1
    );

    step(&format!(
        "{ROUNDS} attaches, each polled on all {hosts} hosts (2 ms) until it resolves"
    ));
    let pollers: Vec<Poller> = (1..=hosts)
        .map(|h| Poller::start(&namespaces[(h - 1) * PER_HOST]))
        .collect();
    let probes = c.bed.containers("p", ROUNDS);
    let mut spread = Vec::new();
    let mut attach_ms = Vec::new();
    let mut all_hosts_ms = Vec::new();
    for (i, ns) in probes.iter().enumerate() {
        let host = 1 + (i * 37) % hosts;
        let name = format!("probe{i}");
        let t = Instant::now();
        c.attach(host, ns, "bench", &["--name", &name]);
        attach_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let returned = Instant::now();
        for p in &pollers {
            p.ask(&name, returned);
        }
        let mut slowest = 0.0f64;
        for p in &pollers {
            let ms = p.answer();
            slowest = slowest.max(ms);
            spread.push(ms);
        }
        all_hosts_ms.push(slowest);
    }
    let (p50, p99) = (percentile(&mut spread, 0.5), percentile(&mut spread, 0.99));
    let (all50, all99) = (
        percentile(&mut all_hosts_ms, 0.5),
        percentile(&mut all_hosts_ms, 0.99),
    );
    let (at50, at99) = (
        percentile(&mut attach_ms, 0.5),
        percentile(&mut attach_ms, 0.99),
    );
    println!(
        "attach returned -> resolves on a host: p50 {p50:.1} ms, p99 {p99:.1} ms ({} samples)",
        spread.len()
    );
    println!("attach returned -> resolves on all {hosts}: p50 {all50:.1} ms, p99 {all99:.1} ms");
    println!("the attach itself: p50 {at50:.1} ms, p99 {at99:.1} ms");
    drop(pollers);

    step("etcd restarted (SIGKILL, 2 s down): every agent back to ok");
    c.stop_etcd();
    thread::sleep(Duration::from_secs(2));
    // From etcd's start: its own start-up counts against the agents' return.
    let back = Instant::now();
    c.start_etcd();
    println!(
        "etcd answers {:.1} s after its start",
        back.elapsed().as_secs_f64()
    );
    for h in 1..=hosts {
        wait_until(Duration::from_secs(60), &format!("host{h} back"), || {
            status(&c, h).is_some_and(|s| s["state"] == "ok" && s["store"]["connected"] == true)
        });
    }
    let back_s = back.elapsed().as_secs_f64();
    // etcd counts from its own start: everything here came after the restart.
    let requests = grpc_started(&c.etcd_metrics());
    let said = |m: &str| requests.get(m).copied().unwrap_or(0);
    println!("every agent ok {back_s:.1} s after etcd started");
    println!(
        "etcd requests since its restart: {} reads (Range: one-key or count-only, or pages of a full read), {} watches, {} lease grants, {} keep-alive streams, {} writes (Put/Txn)",
        said("Range"),
        said("Watch"),
        said("LeaseGrant"),
        said("LeaseKeepAlive"),
        said("Put") + said("Txn")
    );

    step("each agent: resident memory and idle CPU over 20 s");
    let pids: Vec<u32> = (1..=hosts).filter_map(|h| c.agent_pid(h)).collect();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    thread::sleep(Duration::from_secs(20));
    let after: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    // SAFETY: sysconf takes no pointers and only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / ticks / 20.0 * 100.0)
        .collect();
    let mut rss: Vec<f64> = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| vm_rss_kib(&s))
        .map(|kb| kb / 1024.0)
        .collect();
    let cpu_mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
    let rss_mean = rss.iter().sum::<f64>() / rss.len() as f64;
    let (cpu_max, rss_max) = (percentile(&mut cpu, 1.0), percentile(&mut rss, 1.0));
    println!(
        "idle CPU per agent: mean {cpu_mean:.2}% of a core, max {cpu_max:.2}%; RSS mean {rss_mean:.1} MiB, max {rss_max:.1} MiB"
    );
    drop(c);
    println!(
        "hosts={hosts} endpoints={total} start_s={started_s:.1} converge_s={converge_s:.2} resolve_p50_ms={p50:.1} resolve_p99_ms={p99:.1} all_hosts_p50_ms={all50:.1} all_hosts_p99_ms={all99:.1} attach_p50_ms={at50:.1} attach_p99_ms={at99:.1} etcd_back_s={back_s:.1} etcd_ranges={} etcd_watches={} etcd_lease_grants={} etcd_writes={} idle_cpu_pct={cpu_mean:.2} rss_mib={rss_mean:.1} rss_max_mib={rss_max:.1}",
        said("Range"),
        said("Watch"),
        said("LeaseGrant"),
        said("Put") + said("Txn")
    );
}

/// Attaches `PER_HOST` namespaces on each host, several hosts at a time. An attach
/// refused because etcd did not answer in time (this one machine runs every host) is
/// tried again, up to three times; returns how many were.
fn attach_all(c: &Cluster, namespaces: &[String], hosts: usize) -> usize {
    let retried = std::sync::atomic::AtomicUsize::new(0);
    thread::scope(|s| {
        for lane in 0..4 {
            let retried = &retried;
            s.spawn(move || {
                for h in (1..=hosts).filter(|h| h % 4 == lane) {
                    for j in 0..PER_HOST {
                        let path = format!("/run/netns/{}", namespaces[(h - 1) * PER_HOST + j]);
                        let (name, service) = (format!("e{h}-{j}"), format!("s{j}"));
                        let args = [
                            "attach",
                            &path,
                            "bench",
                            "--name",
                            &name,
                            "--service",
                            &service,
                        ];
                        let mut tries = 0;
                        loop {
                            let out = c.cli(h, &args);
                            if out.status.success() {
                                break;
                            }
                            let said = String::from_utf8_lossy(&out.stderr);
                            tries += 1;
                            assert!(
                                tries < 3 && said.contains("unreachable"),
                                "attach {name} on host{h}: {said}"
                            );
                            retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    retried.into_inner()
}

/// `netagent status --json` of host `host`'s agent, if it answers.
fn status(c: &Cluster, host: usize) -> Option<serde_json::Value> {
    let out = c.cli(host, &["--timeout", "5", "status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_until(limit: Duration, what: &str, done: impl FnMut() -> bool) {
    assert!(wait(limit, done), "{what}: not within {limit:?}");
}

/// Whether `done` came true within `limit`.
fn wait(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
    true
}

/// A thread in one host's attached namespace that asks its embedded DNS for a name
/// every 2 ms and reports how long after `since` it first resolved.
struct Poller {
    ask: Option<mpsc::Sender<(String, Instant)>>,
    answers: mpsc::Receiver<f64>,
}

impl Poller {
    fn start(netns: &str) -> Poller {
        let socket = netagent_tests::in_netns(netns, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect("127.0.0.11:53").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            s
        })
        .join()
        .unwrap();
        let socket = Arc::new(socket);
        let (ask, questions) = mpsc::channel::<(String, Instant)>();
        let (tell, answers) = mpsc::channel();
        thread::spawn(move || {
            let mut id: u16 = 0;
            for (name, since) in questions {
                loop {
                    id = id.wrapping_add(1);
                    if resolves(&socket, &name, id) {
                        let _ = tell.send(since.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                    assert!(
                        since.elapsed() < Duration::from_secs(30),
                        "{name} never resolved"
                    );
                    thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Poller {
            ask: Some(ask),
            answers,
        }
    }

    fn ask(&self, name: &str, since: Instant) {
        let _ = self.ask.as_ref().unwrap().send((name.to_owned(), since));
    }

    fn answer(&self) -> f64 {
        self.answers.recv().expect("poller ended")
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.ask.take();
    }
}

/// Whether `name` has an A record, asked with query id `id` (older answers skipped).
fn resolves(socket: &UdpSocket, name: &str, id: u16) -> bool {
    let _ = socket.send(&netagent_dns::stub_query(id, name, 1));
    let mut buf = [0u8; 512];
    while let Ok(n) = socket.recv(&mut buf) {
        if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return u16::from_be_bytes([buf[6], buf[7]]) > 0;
        }
    }
    false
}

/// etcd's `grpc_server_started_total`, summed by method.
fn grpc_started(metrics: &str) -> BTreeMap<String, u64> {
    let mut by_method = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
    {
        let method = line
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        let count = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(m), Some(n)) = (method, count) {
            *by_method.entry(m.to_owned()).or_insert(0) += n as u64;
        }
    }
    by_method
}

/// User plus system CPU ticks of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name.
    field(11) + field(12)
}

/// The `p` quantile (0..=1) of `v`, sorting it.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}
