//! The agent end to end: etcd and three hosts, each running `netagent agent`; what a
//! user checks with dig, TCP and the CLI.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use netagent_tests::cluster::{resolve, wait_for, Cluster};
use netagent_tests::{require_root, tcp_transfer};

fn sorted(v: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let mut v = v.to_vec();
    v.sort();
    v
}

#[test]
fn replicas_on_other_hosts_resolve_rotated_and_take_tcp() {
    if !require_root("replicas_on_other_hosts_resolve_rotated_and_take_tcp") {
        return;
    }
    let mut c = Cluster::running(3, 3);
    c.cli_ok(
        1,
        &["network", "create", "app-net", "--subnet", "100.64.0.0/16"],
    );
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
