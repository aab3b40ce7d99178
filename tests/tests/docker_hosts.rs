//! Docker integration end to end: two real Docker engines, each a `dockerd` in its own
//! test-bed host, etcd, and an agent per host following its engine. Containers run
//! with `--network none` and labels only; the agents put them on the overlay and in
//! the DNS, and the checks are made from inside containers, with busybox's tools.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::docker::{resolve_in, DockerHost};
use netagent_tests::{docker_test, sh_ok, upstream, OUTSIDE_ADDRESS};

const NET: &str = "netagent.network=app";
const ECHO: &str = "com.docker.compose.service=echo_api";

/// Engines first: they are dropped (containers removed, dockerd stopped) before the
/// test bed's namespaces go.
struct DockerCluster {
    engines: Vec<DockerHost>,
    c: Cluster,
}

impl DockerCluster {
    /// `hosts` hosts, each with a dockerd (started first, as at boot) and an agent
    /// following it; outside names go to a fake upstream in the outside namespace.
    fn new(hosts: usize) -> Self {
        let mut c = Cluster::new(hosts, 3);
        let engines: Vec<DockerHost> = (1..=hosts)
            .map(|h| {
                let dir = std::env::temp_dir().join(format!("{}-docker{h}", c.bed.id));
                DockerHost::start(&c.bed.hosts[h - 1].netns, &dir)
            })
            .collect();
        for (i, e) in engines.iter().enumerate() {
            c.docker_sockets[i] = Some(e.socket.clone());
        }
        upstream::serve_udp_in(&c.bed.outside_ns, SocketAddr::from((OUTSIDE_ADDRESS, 53)));
        c.dns_extra = format!("upstream = [\"{OUTSIDE_ADDRESS}:53\"]\n");
        for h in 1..=hosts {
            c.start_agent(h);
        }
        DockerCluster { engines, c }
    }

    /// Every endpoint's address by its name, as host 1's agent lists them.
    fn addresses(&self) -> BTreeMap<String, Ipv4Addr> {
        let out = self.c.cli_ok(1, &["endpoints", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_owned(),
                    e["address"].as_str()?.parse().ok()?,
                ))
            })
            .collect()
    }

    fn address_of(&self, name: &str) -> Ipv4Addr {
        *self
            .addresses()
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not among the endpoints"))
    }
}

fn set(v: Vec<Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
    v.into_iter().collect()
}

/// Interfaces a container has besides loopback (/proc/net/dev, two header lines).
fn interfaces(d: &DockerHost, container: &str) -> Vec<String> {
    d.exec_ok(container, &["cat", "/proc/net/dev"])
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .filter(|n| n != "lo")
        .collect()
}

#[test]
fn compose_services_across_two_docker_hosts() {
    docker_test!();
    let t = DockerCluster::new(2);
    let (c, h1, h2) = (&t.c, &t.engines[0], &t.engines[1]);
    // The test bed's Docker hosts drop forwarded traffic by default, as real ones do.
    let forward = sh_ok(&format!("ip netns exec {} iptables -S FORWARD", h1.netns));
    assert!(forward.contains("-P FORWARD DROP"), "{forward}");
    c.create_network("app", "100.64.0.0/16");

    // The seed's Compose file on two hosts: db and one echo_api replica on host 1,
    // two echo_api replicas on host 2 (one with a health check), a client on host 1.
    let health = [
        "--health-cmd",
        "test ! -f /tmp/sick",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
    ];
    h1.run_web("db", &[NET, "netagent.service=db"], &[]);
    h1.run_web("echo3", &[NET, ECHO], &[]);
    h2.run_web(
        "echo1",
        &[NET, ECHO, "netagent.aliases=api,echo-one"],
        &health,
    );
    h2.run_web("echo2", &[NET, ECHO], &[]);
    h1.run("client", &[NET], &[], &["sleep", "3600"]);
    h2.run("plain", &[], &[], &["sleep", "3600"]);
    wait_for(
        Duration::from_secs(10),
        "3 echo_api replicas in the client",
        || h1.nslookup("client", "echo_api").len() == 3,
    );

    // 1. Names, rotation, and HTTP to every replica across hosts, from the client.
    let resolv = h1.exec_ok("client", &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    let addr = t.addresses();
    let echo: BTreeSet<Ipv4Addr> = ["echo1", "echo2", "echo3"]
        .iter()
        .map(|n| addr[*n])
        .collect();
    assert_eq!(set(h1.nslookup("client", "echo_api")), echo);
    assert_eq!(h1.nslookup("client", "db"), vec![addr["db"]]);
    assert_eq!(h1.nslookup("client", "echo1"), vec![addr["echo1"]]);
    assert_eq!(h1.nslookup("client", "api"), vec![addr["echo1"]]);
    let firsts: BTreeSet<Ipv4Addr> = (0..6)
        .map(|_| h1.nslookup("client", "echo_api")[0])
        .collect();
    assert_eq!(firsts, echo, "each replica comes first in turn");
    for (name, engine) in [("echo1", h2), ("echo2", h2), ("echo3", h1), ("db", h1)] {
        let hostname = engine.exec_ok(name, &["hostname"]);
        let url = format!("http://{}/", addr[name]);
        assert_eq!(
            h1.exec_ok("client", &["wget", "-qO-", &url]),
            hostname,
            "HTTP to {name}"
        );
        // The short id answers too, as on Docker's networks.
        assert_eq!(h1.nslookup("client", &hostname), vec![addr[name]]);
    }
    let by_name = h1.exec_ok("client", &["wget", "-qO-", "http://echo_api/"]);
    assert!(
        ["echo1", "echo2", "echo3"]
            .iter()
            .any(|n| (if *n == "echo3" { h1 } else { h2 }).exec_ok(n, &["hostname"]) == by_name),
        "{by_name}"
    );
    let services = c.cli_ok(2, &["services"]);
    assert!(
        services.contains("echo_api") && services.contains("db"),
        "{services}"
    );
    let peers = c.cli_ok(1, &["peers"]);
    assert!(peers.contains("host2") && peers.contains(" up "), "{peers}");

    // 5. A container without the label is untouched.
    assert!(interfaces(h2, "plain").is_empty());
    let plain_resolv = h2.exec_ok("plain", &["cat", "/etc/resolv.conf"]);
    assert!(!plain_resolv.contains("127.0.0.11"), "{plain_resolv}");
    assert!(!addr.contains_key("plain"));

    // 6. An outside name, from the fake upstream in the outside namespace.
    assert_eq!(
        h1.nslookup("client", "outside.test"),
        vec![Ipv4Addr::new(203, 0, 113, 7)]
    );

    // 4. An unhealthy replica is not answered, on either host; healthy again, it is.
    let client_pid = h1.pid("client");
    let echo2_pid = h2.pid("echo2");
    h2.exec_ok("echo1", &["touch", "/tmp/sick"]);
    wait_for(
        Duration::from_secs(10),
        "unhealthy echo1 out of the answers",
        || {
            !resolve_in(client_pid, "echo_api").contains(&addr["echo1"])
                && !resolve_in(echo2_pid, "echo_api").contains(&addr["echo1"])
        },
    );
    let eps = c.cli_ok(1, &["endpoints"]);
    assert!(eps.contains("unhealthy"), "{eps}");
    assert_eq!(resolve_in(client_pid, "echo_api").len(), 2);
    h2.exec_ok("echo1", &["rm", "/tmp/sick"]);
    wait_for(Duration::from_secs(10), "healthy echo1 back", || {
        resolve_in(client_pid, "echo_api").contains(&addr["echo1"])
    });

    // 2. docker stop: gone from both hosts' answers within 1 s; docker start: back.
    let echo1_pid = h2.pid("echo1");
    h2.docker_ok(&["stop", "-t", "1", "echo2"]);
    let took = wait_for(
        Duration::from_secs(1),
        "stopped echo2 gone on both hosts",
        || {
            !resolve_in(client_pid, "echo_api").contains(&addr["echo2"])
                && !resolve_in(echo1_pid, "echo_api").contains(&addr["echo2"])
        },
    );
    eprintln!("docker stop -> gone from both hosts' answers: {took:?}");
    h2.docker_ok(&["start", "echo2"]);
    wait_for(Duration::from_secs(10), "restarted echo2 back", || {
        resolve_in(client_pid, "echo_api").len() == 3
    });
    let echo2 = t.address_of("echo2");
    let hostname = h2.exec_ok("echo2", &["hostname"]);
    let url = format!("http://{echo2}/");
    assert_eq!(h1.exec_ok("client", &["wget", "-qO-", &url]), hostname);

    // `netagent attach CONTAINER NETWORK` for a running container without labels.
    h2.run("manual", &[], &[], &["sleep", "3600"]);
    c.cli_ok(2, &["attach", "manual", "app", "--service", "tools"]);
    let manual = t.address_of("manual");
    assert_eq!(h1.nslookup("client", "tools"), vec![manual]);
    let resolv = h2.exec_ok("manual", &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    let out = c.cli(2, &["attach", "no-such-container", "app"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no container \"no-such-container\""),
        "{err}"
    );

    // Bad labels: the container is left alone and `status` says why.
    h2.run(
        "badnet",
        &["netagent.network=nope"],
        &[],
        &["sleep", "3600"],
    );
    h2.run(
        "badalias",
        &[NET, "netagent.aliases=a,,b"],
        &[],
        &["sleep", "3600"],
    );
    let status = |_: ()| c.cli_ok(2, &["status"]);
    wait_for(Duration::from_secs(5), "both problems in status", || {
        let s = status(());
        s.contains("container badnet: label netagent.network=\"nope\" names network \"nope\", which does not exist; create it with: netagent network create nope --subnet CIDR")
            && s.contains("container badalias: label netagent.aliases=\"a,,b\" has an empty entry")
    });
    assert!(interfaces(h2, "badnet").is_empty());
    assert!(interfaces(h2, "badalias").is_empty());
    // The network created, the container waiting for it joins.
    c.cli_ok(
        1,
        &["network", "create", "nope", "--subnet", "100.65.0.0/16"],
    );
    let badnet_pid = h2.pid("badnet");
    wait_for(
        Duration::from_secs(5),
        "badnet attached once its network exists",
        || resolve_in(badnet_pid, "badnet").len() == 1,
    );
    assert!(!status(()).contains("container badnet"));
}

#[test]
fn containers_follow_agent_restarts_and_engine_outages() {
    docker_test!();
    let mut t = DockerCluster::new(2);
    t.c.create_network("app", "100.64.0.0/16");
    t.engines[0].run("client", &[NET], &[], &["sleep", "3600"]);
    t.engines[1].run_web("keep", &[NET, ECHO], &[]);
    t.engines[1].run_web("gone", &[NET, ECHO], &[]);
    let client_pid = t.engines[0].pid("client");
    wait_for(Duration::from_secs(10), "2 replicas", || {
        resolve_in(client_pid, "echo_api").len() == 2
    });
    let keep = t.address_of("keep");
    t.address_of("gone");

    // 3. Agent down: one container removed, one started; the agent comes back.
    t.c.stop_agent(2);
    t.engines[1].docker_ok(&["rm", "-f", "gone"]);
    t.engines[1].run_web("late", &[NET, ECHO], &[]);
    t.c.start_agent(2);
    wait_for(Duration::from_secs(5), "late in, gone out", || {
        let names = t.addresses();
        names.contains_key("late") && !names.contains_key("gone")
    });
    let late = t.address_of("late");
    assert_eq!(
        set(resolve_in(client_pid, "echo_api")),
        BTreeSet::from([keep, late])
    );
    assert_eq!(
        t.address_of("keep"),
        keep,
        "a running container keeps its address"
    );
    let hostname = t.engines[1].exec_ok("late", &["hostname"]);
    let url = format!("http://{late}/");
    assert_eq!(
        t.engines[0].exec_ok("client", &["wget", "-qO-", &url]),
        hostname
    );

    // The engine goes away: reported and retried; other endpoints keep serving.
    let ns = t.c.bed.container("c");
    let plain = t.c.attach(2, &ns, "app", &["--service", "plain"]);
    t.engines[1].stop_engine();
    wait_for(
        Duration::from_secs(10),
        "status to report the engine",
        || {
            let s = t.c.cli_ok(2, &["status"]);
            s.contains("state:      degraded") && s.contains("unreachable")
        },
    );
    assert_eq!(resolve_in(client_pid, "plain"), vec![plain]);
    // dockerd stopped its containers: their names are gone.
    wait_for(Duration::from_secs(5), "stopped containers gone", || {
        resolve_in(client_pid, "echo_api").is_empty()
    });
    t.engines[1].start_engine();
    wait_for(
        Duration::from_secs(10),
        "status to see the engine again",
        || t.c.cli_ok(2, &["status"]).contains("(connected, engine"),
    );
    t.engines[1].run_web("after", &[NET, ECHO], &[]);
    wait_for(
        Duration::from_secs(5),
        "a container started after the outage",
        || resolve_in(client_pid, "echo_api").len() == 1,
    );
}

#[test]
fn a_replica_joins_its_service_once_its_health_check_passes() {
    docker_test!();
    let t = DockerCluster::new(1);
    t.c.create_network("app", "100.64.0.0/16");
    let d = &t.engines[0];
    // Failing checks inside the start period keep the replica `starting`.
    let starting = [
        "--health-cmd",
        "test -f /tmp/ready",
        "--health-interval",
        "1s",
        "--health-start-period",
        "120s",
    ];
    d.run_web("slow", &[NET, ECHO], &starting);
    d.run_web("plain", &[NET, ECHO], &[]);
    d.run("client", &[NET], &[], &["sleep", "3600"]);
    let client = d.pid("client");
    wait_for(Duration::from_secs(10), "both replicas attached", || {
        let names = t.addresses();
        names.contains_key("slow") && names.contains_key("plain")
    });
    let (slow, plain) = (t.address_of("slow"), t.address_of("plain"));
    // A few health checks run and fail meanwhile: the replica stays out.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        let health = d.docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", "slow"]);
        assert_eq!(health, "starting");
        assert_eq!(resolve_in(client, "echo_api"), vec![plain]);
    }
    // Its own name answers all along.
    assert_eq!(resolve_in(client, "slow"), vec![slow]);
    d.exec_ok("slow", &["touch", "/tmp/ready"]);
    wait_for(
        Duration::from_secs(10),
        "the healthy replica in its service",
        || set(resolve_in(client, "echo_api")) == BTreeSet::from([slow, plain]),
    );
}

#[test]
fn containers_forward_outside_names_to_their_own_dns_servers() {
    docker_test!();
    let t = DockerCluster::new(1);
    t.c.create_network("app", "100.64.0.0/16");
    // Two more upstreams in the outside namespace, each answering every name with
    // its own address; the host's (OUTSIDE_ADDRESS) does not know `whoami.test`.
    let outside = &t.c.bed.outside_ns;
    let (first, second) = (Ipv4Addr::new(203, 0, 113, 2), Ipv4Addr::new(203, 0, 113, 3));
    let (says_first, says_second) = (
        Ipv4Addr::new(198, 51, 100, 2),
        Ipv4Addr::new(198, 51, 100, 3),
    );
    for (server, says) in [(first, says_first), (second, says_second)] {
        sh_ok(&format!("ip -n {outside} addr add {server}/32 dev lo"));
        upstream::serve_udp_with(
            outside,
            SocketAddr::from((server, 53)),
            upstream::answering_with(says),
        );
    }
    let d = &t.engines[0];
    let (first_dns, second_dns) = (first.to_string(), second.to_string());
    d.run("own1", &[NET], &["--dns", &first_dns], &["sleep", "3600"]);
    d.run("own2", &[NET], &["--dns", &second_dns], &["sleep", "3600"]);
    d.run("hosts", &[NET], &[], &["sleep", "3600"]);
    wait_for(Duration::from_secs(10), "three containers attached", || {
        t.addresses().len() == 3
    });
    let (x, y, z) = (d.pid("own1"), d.pid("own2"), d.pid("hosts"));
    // x first: its answer is cached for its servers only; y still asks its own.
    assert_eq!(resolve_in(x, "whoami.test"), vec![says_first]);
    assert_eq!(resolve_in(y, "whoami.test"), vec![says_second]);
    assert_eq!(resolve_in(x, "whoami.test"), vec![says_first]);
    assert!(
        resolve_in(z, "whoami.test").is_empty(),
        "z asks the host's servers"
    );
    // Names of the network stay local for all of them.
    let z_address = t.address_of("hosts");
    assert_eq!(resolve_in(x, "hosts"), vec![z_address]);
}
