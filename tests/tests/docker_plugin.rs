//! netagent as Docker's network and IPAM driver end to end: two real Docker engines,
//! each seeing only its own host's agent in its legacy plugin directory, etcd, and an
//! agent per host serving the plugin API. Networks are made with
//! `docker network create -d netagent --ipam-driver netagent`, containers join them
//! with `docker run --network` and Debian's docker-compose 1.29 running the files in
//! examples/, and the checks are what a user would make: `docker network ls` on every
//! host, names and HTTP from inside containers, a published port from outside.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::docker::{
    engines_with_driver, resolve_in, DockerHost, ImageFile, GATEWAY_POOL, IMAGE,
};
use netagent_tests::{docker_test, sh, sh_ok, Testbed, OUTSIDE_ADDRESS};

const SUBNET: &str = "100.80.0.0/16";
/// Engines first: they are dropped (containers removed, dockerd stopped) before the
/// test bed's namespaces go.
struct PluginCluster {
    engines: Vec<DockerHost>,
    c: Cluster,
}

impl PluginCluster {
    /// `hosts` hosts, each with a dockerd (started first, as at boot) and an agent
    /// following it and serving the plugin API in that engine's plugin directory.
    fn new(hosts: usize) -> Self {
        let mut c = Cluster::new(hosts, 3);
        let engines = engines_with_driver(&mut c);
        PluginCluster { engines, c }
    }

    /// `docker network create ... ch03` on host 1, there on every host.
    fn create_ch03(&self) {
        self.engines[0].create_netagent_network(SUBNET, "ch03");
        for d in &self.engines {
            wait_for(Duration::from_secs(10), "ch03 on every host", || {
                docker_networks(d).contains("ch03")
            });
        }
    }

    /// Network names `netagent network ls` shows on `host`.
    fn netagent_networks(&self, host: usize) -> BTreeSet<String> {
        let out = self.c.cli_ok(host, &["network", "ls", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|n| Some(n["name"].as_str()?.to_owned()))
            .collect()
    }

    /// The blocks of `network` `netagent network inspect` gives `node`.
    fn blocks_of(&self, network: &str, node: &str) -> Vec<Ipv4Net> {
        let out = self.c.cli_ok(1, &["network", "inspect", network, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["node"].as_str() == Some(node))
            .filter_map(|b| b["block"].as_str()?.parse().ok())
            .collect()
    }

    /// Replicas of `service` the agent on `host` answers for.
    fn replicas(&self, host: usize, service: &str) -> usize {
        let out = self.c.cli_ok(host, &["services", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|s| s["service"].as_str() == Some(service))
            .map(|s| s["replicas"].as_array().map_or(0, Vec::len))
            .sum()
    }
}

/// The directory holding the Compose files users run.
fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn docker_networks(d: &DockerHost) -> BTreeSet<String> {
    d.docker_ok(&["network", "ls", "--format", "{{.Name}}"])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Container `c`'s address on ch03, as `docker inspect` shows it.
fn ch03_address(d: &DockerHost, c: &str) -> Ipv4Addr {
    let a = d.docker_ok(&[
        "inspect",
        "-f",
        "{{(index .NetworkSettings.Networks \"ch03\").IPAddress}}",
        c,
    ]);
    a.parse()
        .unwrap_or_else(|_| panic!("{c} has no ch03 address: {a:?}"))
}

/// Ids of the containers of Compose service `service` on engine `d`.
fn service_containers(d: &DockerHost, service: &str) -> Vec<String> {
    let filter = format!("label=com.docker.compose.service={service}");
    d.docker_ok(&["ps", "-q", "--filter", &filter])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The hostnames of the `api` replicas on these engines (what they answer with).
fn api_hostnames(engines: &[&DockerHost]) -> BTreeSet<String> {
    engines
        .iter()
        .flat_map(|d| {
            service_containers(d, "api")
                .into_iter()
                .map(|id| d.docker_ok(&["inspect", "-f", "{{.Config.Hostname}}", &id]))
        })
        .collect()
}

/// The body of `http://ADDRESS:PORT/` fetched with curl from namespace `ns`, from
/// source address `from` when given ("" when nothing answers).
fn http_get(ns: &str, from: Option<Ipv4Addr>, address: Ipv4Addr, port: u16) -> String {
    let source = from.map(|a| format!("--interface {a}")).unwrap_or_default();
    let out = sh(&format!(
        "ip netns exec {ns} curl -s --max-time 5 {source} http://{address}:{port}/"
    ));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The IPv4 address in a REMOTE_ADDR: busybox httpd listens on IPv6 too and gives
/// IPv4 clients as `[::ffff:a.b.c.d]`.
fn ipv4_of(remote: &str) -> Option<Ipv4Addr> {
    let bare = remote.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

/// Fetches from `get` until every hostname of `api` has answered or `limit` passes;
/// panics with what answered instead. Returns the number of requests.
fn every_replica_answers(
    limit: Duration,
    api: &BTreeSet<String>,
    get: impl Fn() -> String,
) -> usize {
    let deadline = std::time::Instant::now() + limit;
    let (mut answered, mut others) = (BTreeSet::new(), BTreeSet::new());
    let mut requests = 0;
    while answered != *api && std::time::Instant::now() < deadline {
        requests += 1;
        let body = get();
        if api.contains(&body) {
            answered.insert(body);
        } else {
            others.insert(body);
            // Paced: a refused connection returns at once.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(
        answered, *api,
        "replicas answering within {limit:?} ({requests} requests); other answers: {others:?}"
    );
    requests
}

/// The test bed itself: each engine finds only its own plugin directory, and the
/// network namespaces it mounts are visible where the agents run.
#[test]
fn each_engine_sees_only_its_own_plugin_directory() {
    docker_test!();
    let bed = Testbed::new(2);
    let dirs: Vec<PathBuf> = (1..=2)
        .map(|h| std::env::temp_dir().join(format!("{}-docker{h}", bed.id)))
        .collect();
    let mut engines: Vec<DockerHost> = (0..2)
        .map(|i| DockerHost::start_with_plugins(&bed.hosts[i].netns, &dirs[i]))
        .collect();
    let _listeners: Vec<std::os::unix::net::UnixListener> = engines
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let path = e.plugin_dir().join(format!("probe{}.sock", i + 1));
            std::os::unix::net::UnixListener::bind(path).unwrap()
        })
        .collect();
    let seen_by = |e: &DockerHost| {
        let pid = e.dockerd_pid().unwrap();
        sh_ok(&format!("nsenter -m -t {pid} ls /run/docker/plugins"))
    };
    for (i, e) in engines.iter().enumerate() {
        assert_eq!(seen_by(e).trim(), format!("probe{}.sock", i + 1));
    }
    let machine = sh_ok("ls /run/docker/plugins");
    assert!(!machine.contains("probe"), "{machine}");

    // A container's SandboxKey opens from the root mount namespace and from an
    // agent's (`ip netns exec` makes a slave of it), as the plugin's Join needs.
    let check_sandbox = |e: &DockerHost, name: &str| {
        e.docker_ok(&["run", "-d", "--name", name, IMAGE, "sleep", "3600"]);
        let key = e.docker_ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name]);
        assert!(
            key.starts_with(&e.plugin_dir().parent().unwrap().display().to_string()),
            "{key}"
        );
        let root = sh_ok(&format!("nsenter --net={key} ip -br -4 addr"));
        assert!(
            root.contains("eth0") && root.contains("100.127.0."),
            "{root}"
        );
        let agent = sh_ok(&format!(
            "ip netns exec {} nsenter --net={key} ip -br -4 addr",
            e.netns
        ));
        assert_eq!(agent, root);
    };
    check_sandbox(&engines[0], "first");
    // A restarted engine keeps the arrangement.
    engines[0].stop_engine();
    engines[0].start_engine();
    assert_eq!(seen_by(&engines[0]).trim(), "probe1.sock");
    check_sandbox(&engines[0], "second");

    drop(engines);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    for d in &dirs {
        let d = d.display().to_string();
        assert!(!mounts.contains(&d), "{d} still mounted:\n{mounts}");
        assert!(!std::path::Path::new(&d).exists(), "{d} left behind");
    }
}

/// The control for the Compose tests: examples/ on one engine with ch03 a plain
/// Docker bridge network, no netagent. The stand-in proxies themselves work.
#[test]
fn the_examples_work_on_a_docker_bridge_network() {
    docker_test!();
    let bed = Testbed::new(1);
    let dir = std::env::temp_dir().join(format!("{}-docker1", bed.id));
    let d = DockerHost::start(&bed.hosts[0].netns, &dir);
    d.docker_ok(&["network", "create", "--subnet", "100.90.0.0/16", "ch03"]);
    let ex = examples();
    d.compose_ok(
        &ex,
        &[
            "-p",
            "echo",
            "-f",
            "ch03-webapi.yml",
            "up",
            "-d",
            "--scale",
            "api=3",
            "--scale",
            "proxy=2",
        ],
    );
    d.compose_ok(
        &ex,
        &["-p", "ingress", "-f", "ch03-ingress.yml", "up", "-d"],
    );
    let api = api_hostnames(&[&d]);
    assert_eq!(api.len(), 3, "{api:?}");
    every_replica_answers(Duration::from_secs(30), &api, || {
        http_get(&bed.outside_ns, None, bed.hosts[0].underlay, 80)
    });
}

/// A network made with `docker network create` on one host is a Docker network
/// on every host within a second; one made with `netagent network create` too.
#[test]
fn a_docker_network_appears_on_every_host() {
    docker_test!();
    let t = PluginCluster::new(2);
    let (h1, h2) = (&t.engines[0], &t.engines[1]);
    h1.create_netagent_network(SUBNET, "ch03");
    let took = wait_for(Duration::from_secs(1), "ch03 on host 2", || {
        docker_networks(h2).contains("ch03")
    });
    eprintln!("docker network create on host 1 -> docker network ls on host 2: {took:?}");
    let inspect = ["network", "inspect", "-f"];
    let format = "{{.Driver}} {{.IPAM.Driver}} {{range .IPAM.Config}}{{.Subnet}}{{end}}";
    for d in [h1, h2] {
        let mut args = inspect.to_vec();
        args.extend([format, "ch03"]);
        assert_eq!(d.docker_ok(&args), format!("netagent netagent {SUBNET}"));
    }
    for h in 1..=2 {
        assert_eq!(t.netagent_networks(h), names(&["ch03"]));
    }

    t.c.cli_ok(
        2,
        &["network", "create", "web", "--subnet", "100.81.0.0/16"],
    );
    for d in [h1, h2] {
        wait_for(
            Duration::from_secs(5),
            "a netagent network as a Docker network",
            || docker_networks(d).contains("web"),
        );
    }
    let expected = names(&["bridge", "host", "none", "ch03", "web"]);
    assert_eq!(docker_networks(h1), expected);
    assert_eq!(docker_networks(h2), expected);
}

/// The Compose files of examples/ on both hosts: HTTP from outside to host 1's
/// port 80 reaches the ingress, the proxies by name, and every `api` replica.
#[test]
fn compose_webapi_and_ingress_across_two_hosts() {
    docker_test!();
    let t = PluginCluster::new(2);
    let (h1, h2) = (&t.engines[0], &t.engines[1]);
    t.create_ch03();
    let ex = examples();
    let webapi = [
        "-p",
        "echo",
        "-f",
        "ch03-webapi.yml",
        "up",
        "-d",
        "--scale",
        "api=3",
        "--scale",
        "proxy=3",
    ];
    h1.compose_ok(&ex, &webapi);
    h2.compose_ok(&ex, &webapi);
    h1.compose_ok(
        &ex,
        &["-p", "ingress", "-f", "ch03-ingress.yml", "up", "-d"],
    );
    let api = api_hostnames(&[h1, h2]);
    assert_eq!(api.len(), 6, "{api:?}");

    let outside = &t.c.bed.outside_ns;
    let host1 = t.c.bed.hosts[0].underlay;
    let start = std::time::Instant::now();
    let requests = every_replica_answers(Duration::from_secs(60), &api, || {
        http_get(outside, None, host1, 80)
    });
    let took = start.elapsed();
    eprintln!("all 6 replicas answered after {requests} requests ({took:?})");
    // Settled: every request is answered by a replica.
    for _ in 0..12 {
        let body = http_get(outside, None, host1, 80);
        assert!(api.contains(&body), "answer {body:?} is no api replica");
    }
}

/// A container that looks `api` up and fetches from it at once succeeds on its
/// first attempt, every time.
#[test]
fn a_new_container_reaches_the_service_on_its_first_attempt() {
    docker_test!();
    let t = PluginCluster::new(2);
    let (h1, h2) = (&t.engines[0], &t.engines[1]);
    t.create_ch03();
    let ex = examples();
    let api = [
        "-p",
        "echo",
        "-f",
        "ch03-webapi.yml",
        "up",
        "-d",
        "--scale",
        "api=2",
        "api",
    ];
    h1.compose_ok(&ex, &api);
    h2.compose_ok(&ex, &api);
    wait_for(Duration::from_secs(10), "4 api replicas known", || {
        t.replicas(1, "api") == 4
    });
    let replicas = api_hostnames(&[h1, h2]);
    for attempt in 1..=20 {
        let body = h1.docker_ok(&[
            "run",
            "--rm",
            "--network",
            "ch03",
            IMAGE,
            "sh",
            "-c",
            "nslookup api >/dev/null && wget -q -O- http://api:8080/",
        ]);
        assert!(
            replicas.contains(&body),
            "run {attempt}: {body:?} is no api replica"
        );
    }
}

/// Every replica's address, on both hosts, in the answers, first in turn.
#[test]
fn the_service_name_gives_every_replica_in_rotation() {
    docker_test!();
    let t = PluginCluster::new(2);
    let (h1, h2) = (&t.engines[0], &t.engines[1]);
    t.create_ch03();
    let ex = examples();
    let up = |d: &DockerHost, n: &str| {
        let scale = format!("api={n}");
        d.compose_ok(
            &ex,
            &[
                "-p",
                "echo",
                "-f",
                "ch03-webapi.yml",
                "up",
                "-d",
                "--scale",
                &scale,
                "api",
            ],
        );
    };
    up(h1, "1");
    up(h2, "2");
    let subnet: Ipv4Net = SUBNET.parse().unwrap();
    let expected: BTreeSet<Ipv4Addr> = [h1, h2]
        .iter()
        .flat_map(|d| {
            service_containers(d, "api")
                .into_iter()
                .map(|c| ch03_address(d, &c))
        })
        .collect();
    assert_eq!(expected.len(), 3);
    assert!(expected.iter().all(|a| subnet.contains(a)), "{expected:?}");

    h1.docker_ok(&[
        "run",
        "-d",
        "--network",
        "ch03",
        "--name",
        "client",
        IMAGE,
        "sleep",
        "3600",
    ]);
    wait_for(Duration::from_secs(10), "3 api addresses", || {
        h1.nslookup("client", "api").len() == 3
    });
    let got: BTreeSet<Ipv4Addr> = h1.nslookup("client", "api").into_iter().collect();
    assert_eq!(got, expected, "busybox nslookup");
    let pid = h1.pid("client");
    let dig: BTreeSet<Ipv4Addr> = resolve_in(pid, "api").into_iter().collect();
    assert_eq!(dig, expected, "dig @127.0.0.11");
    let firsts: BTreeSet<Ipv4Addr> = (0..6).map(|_| resolve_in(pid, "api")[0]).collect();
    assert_eq!(firsts, expected, "each replica comes first in turn");
    // Its interfaces: ch03's /32, and Docker's gateway bridge (egress and published
    // ports), which the driver leaves to Docker.
    let own = ch03_address(h1, "client");
    let addrs = sh_ok(&format!(
        "nsenter -n -t {} ip -br -4 addr",
        h1.pid("client")
    ));
    let mut addrs: BTreeSet<String> = addrs
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect();
    assert!(addrs.remove("127.0.0.1/8"), "{addrs:?}");
    assert!(addrs.remove(&format!("{own}/32")), "{addrs:?}");
    let pool: Ipv4Net = GATEWAY_POOL.parse().unwrap();
    assert!(
        addrs.len() == 1
            && addrs
                .iter()
                .all(|a| a.parse::<Ipv4Net>().is_ok_and(|n| pool.contains(&n.addr()))),
        "besides ch03, only Docker's gateway bridge: {addrs:?}"
    );
}

/// A published port answers at the host's underlay address, and the container
/// sees the client's own address.
#[test]
fn a_published_port_answers_with_the_clients_address() {
    docker_test!();
    let t = PluginCluster::new(2);
    let h1 = &t.engines[0];
    t.create_ch03();
    // busybox httpd gives CGI scripts the client's address as REMOTE_ADDR.
    let whoami =
        b"#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho \"$REMOTE_ADDR\"\n";
    h1.build_image(
        "netagent-test-whoami",
        &[
            ("/bin/busybox", ImageFile::Copy(Path::new("/bin/busybox"))),
            ("/www/cgi-bin/index.cgi", ImageFile::Bytes(whoami)),
        ],
        "RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    );
    h1.docker_ok(&[
        "run",
        "-d",
        "--network",
        "ch03",
        "-p",
        "18080:8080",
        "--name",
        "whoami",
        "netagent-test-whoami",
    ]);
    let host1 = t.c.bed.hosts[0].underlay;
    // From the outside namespace, from an address beyond the hosts.
    let outside = &t.c.bed.outside_ns;
    let mut body = String::new();
    wait_for(Duration::from_secs(10), "the published port", || {
        body = http_get(outside, Some(OUTSIDE_ADDRESS), host1, 18080);
        !body.is_empty()
    });
    assert_eq!(
        ipv4_of(&body),
        Some(OUTSIDE_ADDRESS),
        "the client's address"
    );
    // From the underlay namespace (192.0.2.2, beside the hosts).
    let underlay = http_get(&t.c.bed.underlay_ns, None, host1, 18080);
    assert_eq!(
        ipv4_of(&underlay),
        Some(Ipv4Addr::new(192, 0, 2, 2)),
        "{underlay}"
    );
}

/// Bad input fails with the fix in the error, and leaves nothing half-made on
/// either host, in Docker or in netagent.
#[test]
fn bad_input_is_refused_with_the_fix_and_leaves_nothing_behind() {
    docker_test!();
    let t = PluginCluster::new(2);
    let (h1, h2) = (&t.engines[0], &t.engines[1]);
    t.create_ch03();
    let fails = |d: &DockerHost, args: &[&str]| {
        let out = d.docker(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "docker {args:?} succeeded");
        err
    };

    let err = fails(
        h1,
        &[
            "network",
            "create",
            "-d",
            "netagent",
            "--subnet",
            "100.82.0.0/16",
            "noipam",
        ],
    );
    assert!(err.contains("--ipam-driver netagent"), "{err}");

    let err = fails(
        h1,
        &[
            "network",
            "create",
            "-d",
            "netagent",
            "--ipam-driver",
            "netagent",
            "--subnet",
            "100.80.128.0/17",
            "overlap",
        ],
    );
    assert!(err.contains("ch03") && err.contains(SUBNET), "{err}");

    let err = fails(
        h1,
        &[
            "network",
            "create",
            "-d",
            "netagent",
            "--ipam-driver",
            "netagent",
            "--subnet",
            "100.83.0.0/16",
            "-o",
            "nosuchoption=1",
            "badopt",
        ],
    );
    assert!(err.contains("nosuchoption"), "{err}");

    // An address of ch03 outside host 1's block.
    h1.docker_ok(&[
        "run",
        "-d",
        "--network",
        "ch03",
        "--name",
        "inblock",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let mine = ch03_address(h1, "inblock");
    let blocks = t.blocks_of("ch03", "host1");
    let block = *blocks
        .iter()
        .find(|b| b.contains(&mine))
        .unwrap_or_else(|| panic!("{mine} in none of host1's blocks {blocks:?}"));
    let elsewhere = Ipv4Addr::from(u32::from(mine) ^ 0x8000);
    assert!(
        blocks.iter().all(|b| !b.contains(&elsewhere)),
        "{elsewhere} is in host1's blocks {blocks:?}: blocks larger than a /17?"
    );
    let endpoints_before = t.c.cli_ok(1, &["endpoints"]);
    let ip = elsewhere.to_string();
    let err = fails(
        h1,
        &[
            "run",
            "--rm",
            "--network",
            "ch03",
            "--ip",
            &ip,
            "--name",
            "badip",
            IMAGE,
            "true",
        ],
    );
    assert!(err.contains(&block.to_string()), "{block}: {err}");
    assert_eq!(t.c.cli_ok(1, &["endpoints"]), endpoints_before);

    // A good network after the bad ones, with a subnet a failed one asked for: once
    // it shows on host 2, any half-made network would show there too.
    h1.create_netagent_network("100.83.0.0/16", "done");
    wait_for(Duration::from_secs(10), "done on host 2", || {
        docker_networks(h2).contains("done")
    });
    for h in 1..=2 {
        assert_eq!(t.netagent_networks(h), names(&["ch03", "done"]));
    }
    let expected = names(&["bridge", "host", "none", "ch03", "done"]);
    for (h, d) in [(1, h1), (2, h2)] {
        let mut got = docker_networks(d);
        // Docker's own, made for the containers started above.
        got.remove("docker_gwbridge");
        for failed in ["noipam", "overlap", "badopt"] {
            assert!(!got.contains(failed), "{failed} half-made on host {h}");
        }
        assert_eq!(got, expected, "Docker networks on host {h}");
    }
}

/// A container's network namespace under /run/netns, for the test bed's probes;
/// removed (the name only) when dropped.
struct NamedNetns(String);

impl NamedNetns {
    fn of(d: &DockerHost, container: &str, name: &str) -> Self {
        sh_ok(&format!("ip netns attach {name} {}", d.pid(container)));
        NamedNetns(name.to_owned())
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.0));
    }
}

/// Which of `targets` a TCP connection from namespace `netns` reaches.
fn reachable(netns: &str, targets: &[std::net::SocketAddr]) -> Vec<std::net::SocketAddr> {
    targets
        .iter()
        .copied()
        .filter(|t| {
            let t = *t;
            netagent_tests::in_netns(netns, move || {
                std::net::TcpStream::connect_timeout(&t, Duration::from_millis(800)).is_ok()
            })
            .join()
            .unwrap()
        })
        .collect()
}

/// A container on a driver network has Docker's gateway bridge too; through either,
/// it reaches none of its host's services (at the underlay address, the gateway
/// bridge's or the network's gateway), the cluster store or a peer host, while the
/// outside world and the network itself still work.
#[test]
fn driver_containers_reach_no_host_store_or_mesh() {
    docker_test!();
    let t = PluginCluster::new(2);
    t.create_ch03();
    let (h1, h2) = (&t.engines[0], &t.engines[1]);
    h1.docker_ok(&[
        "run",
        "-d",
        "--name",
        "probe",
        "--network",
        "ch03",
        IMAGE,
        "sleep",
        "3600",
    ]);
    h2.docker_ok(&[
        "run",
        "-d",
        "--name",
        "peer",
        "--network",
        "ch03",
        IMAGE,
        "sh",
        "-c",
        "mkdir -p /www && echo peer > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]);
    let probe = NamedNetns::of(h1, "probe", &format!("{}-probe", t.c.bed.id));
    let (host1, host2) = (&t.c.bed.hosts[0], &t.c.bed.hosts[1]);
    const SERVICE: u16 = 2222;
    let _services: Vec<std::net::TcpListener> = [&host1.netns, &host2.netns, &t.c.bed.outside_ns]
        .iter()
        .map(|ns| {
            netagent_tests::in_netns(ns, || {
                std::net::TcpListener::bind(("0.0.0.0", SERVICE)).unwrap()
            })
            .join()
            .unwrap()
        })
        .collect();
    // The host's side of Docker's gateway bridge: the container's default gateway.
    let gw_bridge: Ipv4Addr = h1
        .docker_ok(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            "docker_gwbridge",
        ])
        .parse()
        .expect("docker_gwbridge has a gateway");
    let at = |ip: Ipv4Addr, port: u16| std::net::SocketAddr::from((ip, port));
    let forbidden = [
        at(host1.underlay, SERVICE),
        at(gw_bridge, SERVICE),
        at(Ipv4Addr::new(100, 80, 0, 1), SERVICE),
        at(host2.underlay, SERVICE),
        at(netagent_tests::cluster::ETCD_ADDRESS, 2379),
    ];
    assert_eq!(
        reachable(&probe.0, &forbidden),
        vec![],
        "a driver container reached these"
    );
    // What must keep working: the outside world (egress through Docker's bridge) and
    // the network across hosts, by name.
    let outside = at(OUTSIDE_ADDRESS, SERVICE);
    assert_eq!(reachable(&probe.0, &[outside]), vec![outside]);
    wait_for(Duration::from_secs(10), "peer by name from host 1", || {
        h1.docker(&[
            "exec",
            "probe",
            "timeout",
            "3",
            "wget",
            "-qO-",
            "http://peer:8080/",
        ])
        .stdout
        .starts_with(b"peer")
    });
}

/// Restarts: dockerd restarted with containers that have restart policies (they come
/// back attached and resolvable on both hosts, a pinned --ip kept); the agent
/// restarted under running containers (none loses its network); etcd away (a
/// container still starts, with an address of its host's block, and resolves on the
/// other host once etcd is back).
#[test]
fn containers_come_back_after_engine_and_agent_restarts() {
    docker_test!();
    let mut t = PluginCluster::new(2);
    t.create_ch03();
    let web = |d: &DockerHost, name: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            "-d",
            "--restart",
            "always",
            "--name",
            name,
            "--network",
            "ch03",
            "--network-alias",
            "api",
        ];
        args.extend_from_slice(extra);
        args.extend([
            IMAGE,
            "sh",
            "-c",
            "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www",
        ]);
        d.docker_ok(&args);
    };
    web(&t.engines[0], "pinned", &["--ip", "100.80.0.77"]);
    web(&t.engines[0], "loose", &[]);
    t.engines[1].docker_ok(&[
        "run",
        "-d",
        "--restart",
        "always",
        "--name",
        "client",
        "--network",
        "ch03",
        IMAGE,
        "sleep",
        "3600",
    ]);
    let api_from_host2 = |t: &PluginCluster| -> BTreeSet<Ipv4Addr> {
        resolve_in(t.engines[1].pid("client"), "api")
            .into_iter()
            .collect()
    };
    let both = |t: &PluginCluster| {
        [
            ch03_address(&t.engines[0], "pinned"),
            ch03_address(&t.engines[0], "loose"),
        ]
        .into_iter()
        .collect::<BTreeSet<_>>()
    };
    wait_for(
        Duration::from_secs(10),
        "api's two replicas from host 2",
        || api_from_host2(&t) == both(&t),
    );
    assert_eq!(
        ch03_address(&t.engines[0], "pinned"),
        Ipv4Addr::new(100, 80, 0, 77)
    );

    // dockerd on host 1 stops (its containers with it) and starts again.
    t.engines[0].stop_engine();
    wait_for(
        Duration::from_secs(10),
        "api gone from host 2's answers",
        || api_from_host2(&t).is_empty(),
    );
    t.engines[0].start_engine();
    wait_for(
        Duration::from_secs(60),
        "both replicas back in host 2's answers",
        || {
            t.engines[0]
                .docker(&["inspect", "-f", "{{.State.Running}}", "loose"])
                .stdout
                .starts_with(b"true")
                && api_from_host2(&t) == both(&t)
        },
    );
    assert_eq!(
        ch03_address(&t.engines[0], "pinned"),
        Ipv4Addr::new(100, 80, 0, 77)
    );
    let url = "http://api:8080/";
    wait_for(
        Duration::from_secs(10),
        "HTTP across hosts after the engine's restart",
        || {
            t.engines[1]
                .docker(&["exec", "client", "timeout", "3", "wget", "-qO-", url])
                .status
                .success()
        },
    );

    // The agent on host 1 restarts under running containers: nothing moves.
    let before = both(&t);
    t.c.kill_agent(1);
    t.c.start_agent(1);
    wait_for(
        Duration::from_secs(10),
        "the same answers after the agent's restart",
        || api_from_host2(&t) == before,
    );
    assert_eq!(both(&t), before);
    let pid = t.engines[0].pid("loose");
    wait_for(
        Duration::from_secs(10),
        "host 1's container resolves through its new agent",
        || resolve_in(pid, "client") == vec![ch03_address(&t.engines[1], "client")],
    );

    // etcd away: a container still starts, with an address of host 1's block; once
    // etcd is back, host 2 resolves it.
    t.c.stop_etcd();
    let started = std::time::Instant::now();
    t.engines[0].docker_ok(&[
        "run",
        "-d",
        "--name",
        "late",
        "--network",
        "ch03",
        IMAGE,
        "sleep",
        "3600",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the start waited {:?} for the store",
        started.elapsed()
    );
    let late = ch03_address(&t.engines[0], "late");
    assert!(
        "100.80.0.0/24".parse::<Ipv4Net>().unwrap().contains(&late),
        "{late} is not of host 1's block"
    );
    t.c.start_etcd();
    let client = t.engines[1].pid("client");
    wait_for(
        Duration::from_secs(30),
        "late resolves on host 2 once etcd is back",
        || resolve_in(client, "late") == vec![late],
    );
}
