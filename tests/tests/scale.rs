//! Scale: 1,000 namespaces on one host in a 5-host mesh, with the kernel's default
//! neighbour-table limits. Kernel tables grow with hosts, not with containers.

use netagent_tests::{apply, root_test, sh, Mesh, Testbed};

#[test]
fn a_thousand_namespaces_on_one_host_reach_other_hosts() {
    root_test!();
    const N: usize = 1000;
    let mut bed = Testbed::new(5);
    let local = bed.containers("s", N);
    let mut mesh = Mesh::new(&bed).network("a", 100, "100.64.0.0/16");
    // 1,000 addresses do not fit in a /24: this network gets /22 blocks.
    mesh.networks[0].subnet = "100.64.0.0/14".parse().unwrap();
    let mut remotes = Vec::new();
    for host in 2..=5 {
        let ns = bed.container(&format!("r{host}"));
        remotes.push((ns.clone(), mesh.endpoint(host, "a", &ns, 10)));
    }
    let mut addresses = Vec::new();
    for (i, ns) in local.iter().enumerate() {
        addresses.push(mesh.endpoint_at(1, "a", ns, 10 + i as u32));
    }
    for (i, h) in bed.hosts.iter().enumerate() {
        apply(&h.path(), &mesh.state(i + 1)).unwrap_or_else(|e| panic!("apply on {}: {e}", h.name));
    }
    // Every local namespace pings a namespace on another host (spread over hosts 2-5).
    let script: String = local
        .iter()
        .enumerate()
        .map(|(i, ns)| format!("{ns} {}\n", remotes[i % remotes.len()].1))
        .collect();
    let file = std::env::temp_dir().join(format!("{}-pings", bed.id));
    std::fs::write(&file, script).unwrap();
    let out = sh(&format!(
        "xargs -P 8 -L 1 sh -c 'ip netns exec $0 ping -n -q -c 1 -W 3 $1 >/dev/null || echo FAIL $0 $1' < {}",
        file.display()
    ));
    let _ = std::fs::remove_file(&file);
    let failures = String::from_utf8_lossy(&out.stdout);
    assert!(failures.trim().is_empty(), "unreachable:\n{failures}");

    let h1 = &bed.hosts[0].netns;
    let count = |cmd: &str| {
        bed.exec_ok(h1, &format!("{cmd} | wc -l"))
            .trim()
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!(
        count("ip neigh show dev nax100"),
        4,
        "one neighbour per remote host"
    );
    assert_eq!(
        count("bridge fdb show dev nax100 | grep dst"),
        4,
        "one FDB entry per remote host"
    );
    assert_eq!(
        count("ip route show dev nax100"),
        4,
        "one route per remote host"
    );
    // Local endpoints are permanent entries, which the neighbour GC does not count;
    // nothing dynamic piles up on the host.
    assert!(
        count("ip neigh show | grep -v PERMANENT") < 10,
        "{}",
        bed.exec_ok(h1, "ip neigh show | grep -v PERMANENT | head")
    );
    assert_eq!(addresses.len(), N);
}
