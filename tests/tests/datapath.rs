//! End-to-end tests of the overlay datapath on the test bed: real namespaces, real
//! kernel VXLAN, bridges, veths and nftables.

use netagent_tests::{apply, block, root_test, tcp_transfer, Mesh, Testbed, OUTSIDE_ADDRESS};

fn mesh_ab(bed: &Testbed) -> Mesh {
    Mesh::new(bed)
        .network("a", 100, "100.64.0.0/16")
        .network("b", 200, "100.65.0.0/16")
}

fn apply_all(bed: &Testbed, mesh: &Mesh) {
    for (i, h) in bed.hosts.iter().enumerate() {
        apply(&h.path(), &mesh.state(i + 1)).unwrap_or_else(|e| panic!("apply on {}: {e}", h.name));
    }
}

#[test]
fn namespaces_on_different_hosts_talk_at_full_mtu() {
    root_test!();
    let mut bed = Testbed::new(3);
    let c1 = bed.container("a1");
    let c3 = bed.container("a3");
    let mut mesh = mesh_ab(&bed);
    let ip1 = mesh.endpoint(1, "a", &c1, 10);
    let ip3 = mesh.endpoint(3, "a", &c3, 10);
    apply_all(&bed, &mesh);

    assert!(bed.ping(&c1, ip3), "{ip1} on h1 cannot ping {ip3} on h3");
    // The namespace's MTU is the underlay's minus VXLAN's 50 bytes, and a packet of
    // exactly that size crosses with DF set: no black hole.
    let mtu = bed.exec_ok(&c1, "cat /sys/class/net/eth0/mtu");
    assert_eq!(mtu.trim(), "1450");
    let full = bed.exec(
        &c1,
        &format!("ping -n -q -c 2 -i 0.2 -W 1 -M do -s 1422 {ip3}"),
    );
    assert!(full.status.success(), "1450-byte DF ping failed: {full:?}");
    let received = tcp_transfer(&c3, ip3, &c1, 10 << 20);
    assert_eq!(received, 10 << 20);
}

#[test]
fn networks_are_isolated_on_one_host_and_across_hosts() {
    root_test!();
    let mut bed = Testbed::new(3);
    let a1 = bed.container("a1");
    let a3 = bed.container("a3");
    let b1 = bed.container("b1");
    let b3 = bed.container("b3");
    let mut mesh = mesh_ab(&bed);
    let ip_a1 = mesh.endpoint(1, "a", &a1, 10);
    let ip_a3 = mesh.endpoint(3, "a", &a3, 10);
    let ip_b1 = mesh.endpoint(1, "b", &b1, 10);
    let ip_b3 = mesh.endpoint(3, "b", &b3, 10);
    let a1b = bed.container("a1b");
    let ip_a1b = mesh.endpoint(1, "a", &a1b, 11);
    apply_all(&bed, &mesh);

    assert!(
        bed.ping(&a1, ip_a1b),
        "a1 -> a1b on the same host must work"
    );

    assert!(bed.ping(&a1, ip_a3), "a1 -> a3 must work");
    assert!(bed.ping(&b1, ip_b3), "b1 -> b3 must work");
    assert!(!bed.ping(&b1, ip_a1), "b1 reached a1 on the same host");
    assert!(!bed.ping(&b3, ip_a1), "b3 reached a1 across hosts");
    assert!(!bed.ping(&a1, ip_b3), "a1 reached b3 across hosts");
    assert!(!bed.ping(&a3, ip_b1), "a3 reached b1 across hosts");
    assert!(!bed.ping(&a1, ip_b1), "a1 reached b1 on the same host");
    let gw_a1 = block("100.64.0.0/16".parse().unwrap(), 1).network();
    let gw_a1 = std::net::Ipv4Addr::from(u32::from(gw_a1) + 1);
    assert!(!bed.ping(&b1, gw_a1), "b1 reached network a's gateway");
    assert!(bed.ping(&a1, gw_a1), "a1 must reach its own gateway");
}

#[test]
fn reapply_changes_nothing_and_removal_is_exact() {
    root_test!();
    let mut bed = Testbed::new(3);
    let c1 = bed.container("a1");
    let c2 = bed.container("a2");
    let c3 = bed.container("a3");
    let mut mesh = mesh_ab(&bed);
    let ip1 = mesh.endpoint(1, "a", &c1, 10);
    let ip2 = mesh.endpoint(1, "a", &c2, 11);
    let ip3 = mesh.endpoint(3, "a", &c3, 10);
    apply_all(&bed, &mesh);
    let h1 = &bed.hosts[0];
    let before = bed.dump(&h1.netns);
    let report = apply(&h1.path(), &mesh.state(1)).unwrap();
    assert!(
        report.is_empty(),
        "second apply changed something: {report:?}"
    );
    assert_eq!(
        before,
        bed.dump(&h1.netns),
        "second apply changed the kernel"
    );

    // Removing one endpoint removes its veth and its neighbour entry, nothing else.
    let mut smaller = mesh.clone();
    smaller.endpoints.retain(|e| e.address != ip2);
    let report = apply(&h1.path(), &smaller.state(1)).unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert!(report.created.is_empty(), "{report:?}");
    let veth = netagent_overlay::host_veth_name(ip2);
    let links = bed.exec_ok(&h1.netns, "ip -o link show");
    assert!(!links.contains(&veth), "{veth} left behind");
    let neigh = bed.exec_ok(&h1.netns, "ip neigh show nud permanent");
    assert!(
        !neigh.contains(&format!("{ip2} ")),
        "neighbour of {ip2} left: {neigh}"
    );
    assert!(
        neigh.contains(&format!("{ip1} ")),
        "neighbour of {ip1} removed too: {neigh}"
    );
    assert_eq!(
        bed.exec_ok(&c2, "ip -o link show | grep -c eth || true")
            .trim(),
        "0"
    );
    assert!(bed.ping(&c1, ip3), "remaining endpoint must still work");

    // Removing host 3 removes its route, neighbour and FDB entry on every other host.
    let without3 = smaller.without_host(3);
    for host in [1, 2] {
        let h = &bed.hosts[host - 1];
        apply(&h.path(), &without3.state(host)).unwrap();
        let u3 = bed.hosts[2].underlay.to_string();
        let b3 = block("100.64.0.0/16".parse().unwrap(), 3).to_string();
        assert!(
            !bed.exec_ok(&h.netns, "bridge fdb show dev nax100")
                .contains(&u3),
            "fdb to h3 left on {}",
            h.name
        );
        assert!(
            !bed.exec_ok(&h.netns, "ip route").contains(&b3),
            "route to h3 left on {}",
            h.name
        );
        let neigh = bed.exec_ok(&h.netns, "ip neigh show dev nax100");
        assert!(
            !neigh.contains("100.64.3.0"),
            "neighbour of h3 left on {}: {neigh}",
            h.name
        );
        // Exactly one FDB entry per remaining remote host.
        let fdb = bed.exec_ok(&h.netns, "bridge fdb show dev nax100 | grep -c dst");
        assert_eq!(fdb.trim(), "1", "on {}", h.name);
    }
}

#[test]
fn egress_reaches_the_outside_through_the_host() {
    root_test!();
    let mut bed = Testbed::new(2);
    let c = bed.container("e");
    let mut mesh = mesh_ab(&bed);
    mesh.endpoint(2, "a", &c, 10);
    apply_all(&bed, &mesh);
    // The outside namespace has no route back to 100.64.0.0/16: only a masqueraded
    // packet (source = host 2's underlay address) can be answered.
    assert!(!bed.exec_ok(&bed.outside_ns, "ip route").contains("100.64"));
    assert!(
        bed.ping(&c, OUTSIDE_ADDRESS),
        "no egress to {OUTSIDE_ADDRESS}"
    );
    let seen = bed.exec_ok(&bed.outside_ns, "ip neigh show");
    assert!(seen.contains(&bed.hosts[1].underlay.to_string()), "{seen}");
}
