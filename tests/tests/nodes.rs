//! Dead hosts end to end: etcd and three agents; a host killed for good is listed
//! gone, removed by hand once its lease expired, or reclaimed by the agents after
//! `[store] reclaim_after_secs`, and every other host lets go of its routes and names.

use std::time::Duration;

use netagent_tests::cluster::{resolve, wait_for, Cluster};
use netagent_tests::root_test;
use serde_json::Value;

/// Node `name` as `netagent node ls --json` on `host` shows it (None: not listed).
fn node(c: &Cluster, host: usize, name: &str) -> Option<Value> {
    let out = c.cli_ok(host, &["node", "ls", "--json"]);
    let nodes: Vec<Value> = serde_json::from_str(&out).unwrap();
    nodes.into_iter().find(|n| n["name"] == name)
}

/// Whether host `host`'s kernel routes `block`.
fn routes(c: &Cluster, host: usize, block: &str) -> bool {
    c.bed
        .exec_ok(&c.bed.hosts[host - 1].netns, "ip route")
        .contains(block)
}

/// `app-net` with a client on hosts 1 and 2 and `web3` on host 3; returns host 2's
/// client namespace and host 3's block, once host 2 resolves and routes it.
fn web_on_host3(c: &mut Cluster) -> (String, String) {
    c.create_network("app-net", "100.64.0.0/16");
    let client1 = c.bed.container("client1");
    let client2 = c.bed.container("client2");
    let web = c.bed.container("web");
    c.attach(1, &client1, "app-net", &[]);
    c.attach(2, &client2, "app-net", &[]);
    let ip = c.attach(3, &web, "app-net", &["--name", "web3"]);
    wait_for(Duration::from_secs(3), "web3 from host 2", || {
        resolve(&client2, "web3") == vec![ip]
    });
    let block = format!("{}.0/24", {
        let [a, b, c3, _] = ip.octets();
        format!("{a}.{b}.{c3}")
    });
    assert!(routes(c, 2, &block), "host 2 routes host 3's block {block}");
    (client2, block)
}

#[test]
fn a_dead_host_is_listed_gone_and_removed_once_its_lease_expired() {
    root_test!();
    let mut c = Cluster::running(3, 4);
    let (client2, block) = web_on_host3(&mut c);
    let up = node(&c, 1, "host3").expect("host3 listed");
    assert_eq!(up["state"], "up");
    c.kill_agent(3);
    // The lease outlives the agent for up to its TTL: refused, with the fix.
    let refused = c.cli(1, &["node", "rm", "host3"]);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "node rm of a live node succeeded"
    );
    assert!(
        why.contains("stop the agent on host3") && why.contains("4 s"),
        "{why}"
    );
    wait_for(Duration::from_secs(10), "host3 gone in node ls", || {
        node(&c, 1, "host3").is_some_and(|n| n["state"] == "gone" && n["gone_since"].is_u64())
    });
    let gone = node(&c, 1, "host3").unwrap();
    assert_eq!(gone["blocks"][0]["block"], block.as_str(), "{gone}");
    assert_eq!(gone["endpoints"][0]["name"], "web3", "{gone}");
    let table = c.cli_ok(1, &["node", "ls"]);
    let row = table.lines().find(|l| l.starts_with("host3")).unwrap_or("");
    assert!(row.contains("gone") && row.contains(&block), "{table}");
    // Gone, but its routes stay until its blocks go.
    assert!(routes(&c, 2, &block));
    let removed = c.cli_ok(1, &["node", "rm", "host3"]);
    assert!(removed.contains("removed node host3"), "{removed}");
    wait_for(
        Duration::from_secs(3),
        "host 2 drops host 3's route",
        || !routes(&c, 2, &block),
    );
    assert!(resolve(&client2, "web3").is_empty());
    assert!(node(&c, 1, "host3").is_none(), "host3 still listed");
    assert!(
        node(&c, 2, "host3").is_none(),
        "host3 still listed on host 2"
    );
    let inspect = c.cli_ok(2, &["network", "inspect", "app-net"]);
    assert!(!inspect.contains(&block), "{inspect}");
}

#[test]
fn a_host_gone_longer_than_reclaim_after_loses_its_block_without_any_command() {
    root_test!();
    let mut c = Cluster::new(3, 3);
    let tls = c.pki.as_ref().map(|p| p.store_keys()).unwrap_or_default();
    for keys in &mut c.store_keys {
        *keys = Some(format!("{tls}reclaim_after_secs = 10\n"));
    }
    for h in 1..=3 {
        c.start_agent(h);
    }
    let (client2, block) = web_on_host3(&mut c);
    c.kill_agent(3);
    wait_for(Duration::from_secs(10), "host3 gone in node ls", || {
        node(&c, 2, "host3").is_some_and(|n| n["reclaim_in_secs"].is_u64())
    });
    // Lease (3 s) and delay (10 s), and a second of checks.
    let took = wait_for(Duration::from_secs(30), "host3's block reclaimed", || {
        node(&c, 1, "host3").is_none()
    });
    eprintln!("reclaimed {took:?} after host3 was seen gone");
    assert!(took >= Duration::from_secs(8), "reclaimed early: {took:?}");
    wait_for(
        Duration::from_secs(3),
        "host 2 drops host 3's route",
        || !routes(&c, 2, &block),
    );
    assert!(resolve(&client2, "web3").is_empty());
    let inspect = c.cli_ok(1, &["network", "inspect", "app-net"]);
    assert!(!inspect.contains(&block), "{inspect}");
    let reclaimed: Vec<usize> = (1..=2)
        .filter(|&h| c.log(h).contains("reclaimed a gone node"))
        .collect();
    assert_eq!(reclaimed.len(), 1, "reclaimed by hosts {reclaimed:?}");
}
