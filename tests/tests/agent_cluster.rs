//! The agent end to end: etcd and three hosts, each running `netagent agent`; what a
//! user checks with dig, TCP and the CLI.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use netagent_tests::cluster::{resolve, wait_for, Cluster};
use netagent_tests::{root_test, tcp_transfer};

fn sorted(v: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let mut v = v.to_vec();
    v.sort();
    v
}

#[test]
fn replicas_on_other_hosts_resolve_rotated_and_take_tcp() {
    root_test!();
    let mut c = Cluster::running(3, 3);
    c.create_network("app-net", "100.64.0.0/16");
    let client = c.bed.container("client");
    let api = c.bed.containers("api", 3);
    let db = c.bed.container("db");
    c.attach(1, &client, "app-net", &[]);
    let mut replicas = vec![
        c.attach(2, &api[0], "app-net", &["--service", "echo_api"]),
        c.attach(2, &api[1], "app-net", &["--service", "echo_api"]),
        c.attach(3, &api[2], "app-net", &["--service", "echo_api"]),
    ];
    let db_ip = c.attach(3, &db, "app-net", &["--service", "db"]);
    // Hosts 2 and 3 took blocks of their own: the replicas' addresses tell the host.
    assert_ne!(
        replicas[0].octets()[2],
        replicas[2].octets()[2],
        "{replicas:?}"
    );
    replicas.sort();
    wait_for(Duration::from_secs(2), "echo_api on host 1", || {
        sorted(&resolve(&client, "echo_api")) == replicas
    });
    assert_eq!(resolve(&client, "db"), vec![db_ip]);
    assert_eq!(resolve(&client, "tasks.echo_api").len(), 3);
    // Rotation: over three queries, each replica comes first once.
    let firsts: BTreeSet<Ipv4Addr> = (0..3).map(|_| resolve(&client, "echo_api")[0]).collect();
    assert_eq!(firsts.len(), 3, "first answers {firsts:?}");
    for (i, ip) in replicas.iter().enumerate() {
        let ns = api.iter().find(|n| {
            c.bed
                .exec_ok(n, "ip -4 -o addr show")
                .contains(&format!("{ip}/32"))
        });
        let ns = ns.unwrap_or_else(|| panic!("replica {i} {ip} not found in any namespace"));
        assert_eq!(
            tcp_transfer(ns, *ip, &client, 1 << 20),
            1 << 20,
            "replica {ip}"
        );
    }
    let peers = c.cli_ok(1, &["peers"]);
    assert!(
        peers.contains("host2") && peers.contains("host3"),
        "{peers}"
    );
    let services = c.cli_ok(1, &["services"]);
    assert!(
        services.contains("echo_api") && services.contains("db"),
        "{services}"
    );
}

/// Three hosts, `app-net`, a client on host 1; returns the client's namespace.
fn with_client(c: &mut Cluster) -> String {
    c.create_network("app-net", "100.64.0.0/16");
    let client = c.bed.container("client");
    c.attach(1, &client, "app-net", &["--name", "client"]);
    client
}

#[test]
fn detached_or_vanished_replicas_leave_every_answer() {
    root_test!();
    let mut c = Cluster::running(3, 3);
    let client1 = with_client(&mut c);
    let client3 = c.bed.container("client3");
    c.attach(3, &client3, "app-net", &[]);
    let api = c.bed.containers("api", 3);
    let ips: Vec<Ipv4Addr> = api
        .iter()
        .map(|n| c.attach(2, n, "app-net", &["--service", "echo_api"]))
        .collect();
    for ns in [&client1, &client3] {
        wait_for(Duration::from_secs(2), "three replicas", || {
            resolve(ns, "echo_api").len() == 3
        });
    }
    // Detach: gone from host 1's and host 3's answers within a second.
    c.cli_ok(2, &["detach", &format!("/run/netns/{}", api[0]), "app-net"]);
    for ns in [&client1, &client3] {
        let took = wait_for(Duration::from_secs(1), "detached replica to leave", || {
            !resolve(ns, "echo_api").contains(&ips[0])
        });
        eprintln!("detach seen from {ns} after {took:?}");
    }
    assert_eq!(sorted(&resolve(&client1, "echo_api")), sorted(&ips[1..]));
    // The namespace goes away (container exit): same within a second.
    c.bed.exec_ok(&client1, "true");
    let gone = &api[1];
    assert!(netagent_tests::sh(&format!("ip netns del {gone}"))
        .status
        .success());
    for ns in [&client1, &client3] {
        let took = wait_for(Duration::from_secs(1), "vanished replica to leave", || {
            resolve(ns, "echo_api") == vec![ips[2]]
        });
        eprintln!("vanished namespace seen from {ns} after {took:?}");
    }
    let eps = c.cli_ok(1, &["endpoints", "--json"]);
    assert!(!eps.contains(&ips[1].to_string()), "{eps}");
}

#[test]
fn a_dead_host_leaves_the_answers_and_comes_back_with_the_same_addresses() {
    root_test!();
    let mut c = Cluster::running(3, 3);
    let client = with_client(&mut c);
    let a2 = c.bed.container("a2");
    let a3 = c.bed.container("a3");
    let ip2 = c.attach(2, &a2, "app-net", &["--service", "echo_api"]);
    let ip3 = c.attach(3, &a3, "app-net", &["--service", "echo_api"]);
    wait_for(Duration::from_secs(2), "both replicas", || {
        resolve(&client, "echo_api").len() == 2
    });
    c.set_underlay(3, false);
    c.kill_agent(3);
    let limit = Duration::from_secs(c.lease_ttl + 1);
    let took = wait_for(limit, "host 3's replica to leave", || {
        resolve(&client, "echo_api") == vec![ip2]
    });
    eprintln!(
        "dead host left the answers {took:?} after kill -9 (lease TTL {}s)",
        c.lease_ttl
    );
    let peers = c.cli_ok(1, &["peers"]);
    assert!(
        peers
            .lines()
            .any(|l| l.starts_with("host3") && l.contains("down")),
        "{peers}"
    );
    c.set_underlay(3, true);
    c.start_agent(3);
    wait_for(Duration::from_secs(3), "host 3's replica back", || {
        sorted(&resolve(&client, "echo_api")) == sorted(&[ip2, ip3])
    });
    assert_eq!(tcp_transfer(&a3, ip3, &client, 1 << 16), 1 << 16);
}

#[test]
fn a_partitioned_host_rejoins_by_itself() {
    root_test!();
    let mut c = Cluster::running(3, 2);
    let client = with_client(&mut c);
    let a2 = c.bed.container("a2");
    let a3 = c.bed.container("a3");
    let ip2 = c.attach(2, &a2, "app-net", &["--service", "echo_api"]);
    let ip3 = c.attach(3, &a3, "app-net", &["--service", "echo_api"]);
    let both = sorted(&[ip2, ip3]);
    wait_for(Duration::from_secs(2), "both replicas", || {
        sorted(&resolve(&client, "echo_api")) == both
    });
    c.set_underlay(3, false);
    wait_for(
        Duration::from_secs(c.lease_ttl + 2),
        "host 3 to expire",
        || resolve(&client, "echo_api") == vec![ip2],
    );
    // Longer than the lease, the agent on host 3 still running.
    std::thread::sleep(Duration::from_secs(c.lease_ttl));
    c.set_underlay(3, true);
    let took = wait_for(Duration::from_secs(2), "host 1 to see host 3 again", || {
        sorted(&resolve(&client, "echo_api")) == both
    });
    eprintln!("host 3 back in host 1's answers {took:?} after the underlay returned");
    wait_for(Duration::from_secs(2), "host 3 to see everyone", || {
        sorted(&resolve(&a3, "echo_api")) == both && resolve(&a3, "client").len() == 1
    });
    wait_for(Duration::from_secs(2), "traffic to host 3", || {
        c.bed.ping(&client, ip3)
    });
}

/// The store as host `host`'s agent sees it: connected or not.
fn store_connected(c: &Cluster, host: usize) -> bool {
    let status: serde_json::Value =
        serde_json::from_str(&c.cli_ok(host, &["status", "--json"])).unwrap();
    status["store"]["connected"] == serde_json::Value::Bool(true)
}

#[test]
fn a_host_cut_off_from_etcd_catches_up_from_history_or_reads_again_after_compaction() {
    root_test!();
    let mut c = Cluster::running(2, 30);
    let client = with_client(&mut c);
    let b = c.bed.container("b");
    c.attach(2, &b, "app-net", &["--name", "b"]);
    // When host 2's node key was last written: a reconnect that keeps its lease
    // leaves it alone (a new lease would write it again, an event for every host).
    let written = |c: &Cluster| {
        let out = c.etcdctl("get /netagent/nodes/host2 -w json");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["kvs"][0]["mod_revision"].as_i64().unwrap()
    };
    let registered = written(&c);
    for (round, compact) in [("resumed", false), ("compacted", true)] {
        c.set_underlay(2, false);
        wait_for(Duration::from_secs(10), "host 2 to lose etcd", || {
            !store_connected(&c, 2)
        });
        // Written while host 2's watch is down: only etcd's history (or a full
        // read, once that history is compacted) can tell host 2.
        let late = c.bed.container(&format!("late{round}"));
        let name = format!("late-{round}");
        let ip = c.attach(1, &late, "app-net", &["--name", &name]);
        if compact {
            let out = c.etcdctl("endpoint status -w json");
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let revision = status[0]["Status"]["header"]["revision"].as_i64().unwrap();
            let out = c.etcdctl(&format!("compact {revision}"));
            assert!(out.status.success(), "{out:?}");
        }
        c.set_underlay(2, true);
        wait_for(
            Duration::from_secs(5),
            &format!("host 2 to learn {name}"),
            || resolve(&b, &name) == vec![ip],
        );
        assert_eq!(resolve(&client, "b").len(), 1);
        wait_for(Duration::from_secs(5), "host 2 back on etcd", || {
            store_connected(&c, 2)
        });
        assert_eq!(
            written(&c),
            registered,
            "{round}: host 2's node key rewritten"
        );
    }
}

#[test]
fn an_agent_reads_a_store_larger_than_one_page_whole() {
    root_test!();
    let mut c = Cluster::new(2, 5);
    c.start_agent(1);
    with_client(&mut c);
    // 450 keys sorting before every record the agent needs: a full read that
    // stopped after its first page (200 keys) would see no network and no client.
    for batch in 0..5 {
        let puts: String = (0..90)
            .map(|i| format!("put /netagent/a-filler/{batch}-{i} x\n"))
            .collect();
        let script = c.dir.join("filler.txn");
        std::fs::write(&script, format!("\n{puts}\n\n")).unwrap();
        let out = c.etcdctl(&format!("txn < {}", script.display()));
        assert!(out.status.success(), "{out:?}");
    }
    c.start_agent(2);
    let b = c.bed.container("b");
    c.attach(2, &b, "app-net", &["--name", "b"]);
    wait_for(
        Duration::from_secs(5),
        "host 2 to resolve host 1's client",
        || resolve(&b, "client").len() == 1,
    );
}

#[test]
fn restarting_an_agent_loses_no_ping() {
    root_test!();
    let mut c = Cluster::running(2, 3);
    let client = with_client(&mut c);
    let server = c.bed.container("server");
    let ip = c.attach(2, &server, "app-net", &["--service", "web"]);
    assert!(c.bed.ping(&client, ip));
    let pinger = c.bed.spawn(
        &client,
        "ping",
        &["-n", "-q", "-i", "0.05", "-c", "80", &ip.to_string()],
    );
    std::thread::sleep(Duration::from_millis(500));
    c.stop_agent(2);
    c.stop_agent(1);
    c.start_agent(1);
    c.start_agent(2);
    let out = c.bed.take(pinger).unwrap().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("80 packets transmitted, 80 received"),
        "{text}"
    );
    assert_eq!(resolve(&client, "web"), vec![ip]);
    let eps = c.cli_ok(2, &["endpoints", "--json"]);
    assert!(
        eps.contains(&ip.to_string()),
        "same address after restart: {eps}"
    );
}

#[test]
fn concurrent_attaches_on_three_hosts_get_distinct_addresses() {
    root_test!();
    let mut c = Cluster::running(3, 3);
    c.create_network("app-net", "100.64.0.0/16");
    let per_host: Vec<Vec<String>> = (1..=3)
        .map(|h| c.bed.containers(&format!("h{h}e"), 50))
        .collect();
    let sockets: Vec<_> = (1..=3).map(|h| c.socket(h)).collect();
    let handles: Vec<_> = per_host
        .iter()
        .cloned()
        .zip(sockets)
        .enumerate()
        .map(|(i, (names, socket))| {
            std::thread::spawn(move || {
                names
                    .iter()
                    .enumerate()
                    .map(|(k, n)| {
                        let name = format!("e{}x{k}", i + 1);
                        let path = format!("/run/netns/{n}");
                        let out = netagent_tests::cluster::run_cli(
                            &socket,
                            &["attach", &path, "app-net", "--name", &name, "--json"],
                        );
                        assert!(
                            out.status.success(),
                            "{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                        (
                            name,
                            v["address"].as_str().unwrap().parse::<Ipv4Addr>().unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let all: Vec<(String, Ipv4Addr)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let distinct: BTreeSet<Ipv4Addr> = all.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(distinct.len(), 150);
    // Every name from every host (a client namespace of each host asks).
    for (h, names) in per_host.iter().enumerate() {
        let asker = &names[0];
        for (name, ip) in &all {
            assert_eq!(
                resolve(asker, name),
                vec![*ip],
                "{name} from host {}",
                h + 1
            );
        }
    }
}

#[test]
fn with_etcd_down_names_and_traffic_go_on_and_attach_says_why() {
    root_test!();
    let mut c = Cluster::running(2, 3);
    let client = with_client(&mut c);
    let server = c.bed.container("server");
    let ip = c.attach(2, &server, "app-net", &["--service", "web"]);
    wait_for(Duration::from_secs(2), "web", || {
        resolve(&client, "web") == vec![ip]
    });
    c.stop_etcd();
    // Longer than the lease: nothing may expire while the store is away.
    std::thread::sleep(Duration::from_secs(c.lease_ttl + 1));
    assert_eq!(resolve(&client, "web"), vec![ip]);
    assert!(c.bed.ping(&client, ip));
    let status = c.cli_ok(1, &["status"]);
    assert!(status.contains("degraded"), "{status}");
    let late = c.bed.container("late");
    let out = c.cli(2, &["attach", &format!("/run/netns/{late}"), "app-net"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unreachable") && err.contains("nothing was attached"),
        "{err}"
    );
    assert!(
        !c.bed.exec_ok(&late, "ip -o link").contains("eth"),
        "a failed attach leaves nothing behind"
    );
    c.start_etcd();
    wait_for(Duration::from_secs(10), "status ok again", || {
        c.cli_ok(1, &["status"]).contains("state:      ok")
            && c.cli_ok(2, &["status"]).contains("state:      ok")
    });
    let late_ip = c.attach(2, &late, "app-net", &["--name", "late"]);
    wait_for(Duration::from_secs(2), "late from host 1", || {
        resolve(&client, "late") == vec![late_ip]
    });
}

#[test]
fn the_local_store_keeps_addresses_across_restarts() {
    root_test!();
    let mut c = Cluster::local();
    c.start_agent(1);
    c.create_network("solo", "100.64.0.0/24");
    let a = c.bed.container("a");
    let b = c.bed.container("b");
    let ip_a = c.attach(1, &a, "solo", &["--service", "db", "--alias", "primary"]);
    let ip_b = c.attach(1, &b, "solo", &["--name", "b"]);
    assert_eq!(resolve(&b, "db"), vec![ip_a]);
    assert_eq!(resolve(&b, "primary.solo"), vec![ip_a]);
    assert!(c.bed.ping(&b, ip_a));
    c.stop_agent(1);
    c.start_agent(1);
    assert_eq!(resolve(&b, "db"), vec![ip_a]);
    assert_eq!(resolve(&a, "b"), vec![ip_b]);
    let status = c.cli_ok(1, &["status"]);
    assert!(
        status.contains("local") && status.contains("2 here"),
        "{status}"
    );
}

#[test]
fn bad_input_is_refused_with_the_fix() {
    root_test!();
    let mut c = Cluster::running(1, 3);
    c.create_network("app-net", "100.64.0.0/16");
    let err = |out: std::process::Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(c.cli(
        1,
        &["network", "create", "other", "--subnet", "100.64.8.0/24"],
    ));
    assert!(e.contains("overlaps network \"app-net\""), "{e}");
    let e = err(c.cli(
        1,
        &["network", "create", "app-net", "--subnet", "100.70.0.0/16"],
    ));
    assert!(e.contains("already exists"), "{e}");
    let ns = c.bed.container("x");
    let e = err(c.cli(1, &["attach", &format!("/run/netns/{ns}"), "nope"]));
    assert!(
        e.contains("network \"nope\" not found; create it with: netagent network create nope"),
        "{e}"
    );
    let e = err(c.cli(1, &["attach", "/run/netns/does-not-exist", "app-net"]));
    assert!(e.contains("/run/netns/does-not-exist"), "{e}");
    let ip = c.attach(1, &ns, "app-net", &[]);
    let e = err(c.cli(1, &["network", "rm", "app-net"]));
    assert!(e.contains("--force"), "{e}");
    c.cli_ok(1, &["network", "rm", "app-net", "--force"]);
    wait_for(
        Duration::from_secs(2),
        "the endpoint's interface to go",
        || {
            !c.bed
                .exec_ok(&ns, "ip -4 -o addr")
                .contains(&ip.to_string())
        },
    );
    // A bad config value: the agent refuses to start and names the line.
    let bad = c.dir.join("bad.toml");
    std::fs::write(&bad, "node = \"x\"\n[store]\netcd = [\"192.0.2.2:2379\"]\n").unwrap();
    let out = std::process::Command::new(netagent_tests::netagent_bin())
        .args(["agent", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("line 3") && e.contains("http://192.0.2.2:2379"),
        "{e}"
    );
}

#[test]
fn a_namespace_gone_while_its_agent_was_down_is_removed_at_start() {
    root_test!();
    let mut c = Cluster::running(2, 3);
    let client = with_client(&mut c);
    let kept = c.bed.container("kept");
    let lost = c.bed.container("lost");
    let ip_kept = c.attach(2, &kept, "app-net", &["--service", "web"]);
    let ip_lost = c.attach(2, &lost, "app-net", &["--service", "web"]);
    wait_for(Duration::from_secs(2), "both replicas", || {
        resolve(&client, "web").len() == 2
    });
    c.stop_agent(2);
    assert!(netagent_tests::sh(&format!("ip netns del {lost}"))
        .status
        .success());
    c.start_agent(2);
    wait_for(Duration::from_secs(2), "the lost replica to leave", || {
        resolve(&client, "web") == vec![ip_kept]
    });
    let eps = c.cli_ok(1, &["endpoints", "--json"]);
    assert!(!eps.contains(&format!("\"{ip_lost}\"")), "{eps}");
    assert!(eps.contains(&format!("\"{ip_kept}\"")), "{eps}");
}
