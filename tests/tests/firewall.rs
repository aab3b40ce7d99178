//! The firewall against hostile containers, end to end: etcd and agents on the test
//! bed, containers as namespaces. A container reaches no host's services, the store
//! or the mesh; it cannot inject VXLAN into another network; and a firewall reload
//! that flushes the ruleset opens nothing for long.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use netagent_tests::cluster::{wait_for, Cluster, ETCD_ADDRESS};
use netagent_tests::vxlan::{address_on, forged_vxlan, listen_once, vxlan_mac};
use netagent_tests::{in_netns, root_test, sh, tcp_transfer, OUTSIDE_ADDRESS};

/// A port some host service listens on (sshd's stand-in).
const SERVICE_PORT: u16 = 2222;

/// A TCP listener on every address of `netns` (never accepting: the kernel completes
/// handshakes into the backlog, which is all a reachability probe needs).
fn listen_everywhere(netns: &str, port: u16) -> TcpListener {
    in_netns(netns, move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind")
    })
    .join()
    .unwrap()
}

/// A TCP server in `netns` that accepts and closes every connection until dropped.
struct Acceptor(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Acceptor {
    fn start(netns: &str, port: u16) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let listener = listen_everywhere(netns, port);
        listener.set_nonblocking(true).unwrap();
        let stopping = stop.clone();
        std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Acceptor(stop)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Which of `targets` a TCP connection from `netns` reaches (probed in parallel).
fn reachable(netns: &str, targets: &[SocketAddr]) -> Vec<SocketAddr> {
    let probes: Vec<_> = targets
        .iter()
        .map(|t| {
            let t = *t;
            in_netns(netns, move || {
                TcpStream::connect_timeout(&t, Duration::from_millis(800)).is_ok()
            })
        })
        .collect();
    targets
        .iter()
        .zip(probes)
        .filter_map(|(t, p)| p.join().unwrap().then_some(*t))
        .collect()
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn containers_reach_no_host_store_or_mesh_but_the_outside() {
    root_test!();
    let mut c = Cluster::running(2, 3);
    c.create_network("app", "100.64.0.0/16");
    c.create_encrypted_network("secure", "100.66.0.0/16");
    let (app_vni, secure_vni) = (c.vni("app"), c.vni("secure"));
    let (a1, a2, s1, s2) = (
        c.bed.container("a1"),
        c.bed.container("a2"),
        c.bed.container("s1"),
        c.bed.container("s2"),
    );
    let ip_a1 = c.attach(1, &a1, "app", &[]);
    let ip_a2 = c.attach(2, &a2, "app", &[]);
    c.attach(1, &s1, "secure", &[]);
    let ip_s2 = c.attach(2, &s2, "secure", &[]);
    wait_for(Duration::from_secs(10), "the mesh", || {
        c.bed.ping(&s1, ip_s2)
    });
    let (h1, h2) = (c.bed.hosts[0].clone(), c.bed.hosts[1].clone());
    let _services: Vec<TcpListener> = [&h1.netns, &h2.netns, &c.bed.outside_ns]
        .iter()
        .map(|ns| listen_everywhere(ns, SERVICE_PORT))
        .collect();
    let gw = |host: &str, vni: u32| address_on(host, &format!("nax{vni}"));
    let forbidden = [
        at(gw(&h1.netns, app_vni), SERVICE_PORT),
        at(gw(&h1.netns, secure_vni), SERVICE_PORT),
        at(h1.underlay, SERVICE_PORT),
        at(address_on(&h1.netns, "nawg0"), SERVICE_PORT),
        at(gw(&h2.netns, app_vni), SERVICE_PORT),
        at(h2.underlay, SERVICE_PORT),
        at(address_on(&h2.netns, "nawg0"), SERVICE_PORT),
        at(ETCD_ADDRESS, 2379),
    ];
    for ns in [&a1, &s1] {
        assert_eq!(
            reachable(ns, &forbidden),
            vec![],
            "a container reached these"
        );
    }
    // The outside world, through the masquerade, and the network itself still work.
    let outside = at(OUTSIDE_ADDRESS, SERVICE_PORT);
    assert_eq!(reachable(&a1, &[outside]), vec![outside]);
    assert!(c.bed.ping(&a1, OUTSIDE_ADDRESS));
    assert_eq!(tcp_transfer(&a2, ip_a2, &a1, 1 << 20), 1 << 20);
    // The host's own connections to containers (here and on the peer) get their replies.
    assert!(c.bed.ping(&h1.netns, ip_a1));
    assert!(c.bed.ping(&h1.netns, ip_a2));
    assert_eq!(tcp_transfer(&a1, ip_a1, &h1.netns, 1 << 16), 1 << 16);
    // Pinging one's own gateway is still allowed (a network's first check; the
    // agents' RTT probe between gateways).
    assert!(c.bed.ping(&a1, gw(&h1.netns, app_vni)));
    wait_for(
        Duration::from_secs(5),
        "host 2's round trip in `peers`",
        || {
            let out = c.cli_ok(1, &["peers", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let rtt = |p: &serde_json::Value| p["rtt_ms"].as_f64();
            v.as_array()
                .is_some_and(|peers| peers.iter().any(|p| rtt(p).is_some()))
        },
    );
}

/// Sends `packet` three times from inside `netns` to `to`.
fn send_from(netns: &str, packet: Vec<u8>, to: SocketAddr) {
    in_netns(netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..3 {
            let _ = s.send_to(&packet, to);
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_container_cannot_inject_vxlan_into_another_network() {
    root_test!();
    let mut c = Cluster::running(2, 3);
    c.create_network("a", "100.64.0.0/16");
    c.create_network("b", "100.65.0.0/16");
    c.create_encrypted_network("secure", "100.66.0.0/16");
    let (b_vni, secure_vni) = (c.vni("b"), c.vni("secure"));
    let (a1, a2, b1, b2, s2) = (
        c.bed.container("a1"),
        c.bed.container("a2"),
        c.bed.container("b1"),
        c.bed.container("b2"),
        c.bed.container("s2"),
    );
    let ip_a1 = c.attach(1, &a1, "a", &[]);
    let ip_a2 = c.attach(2, &a2, "a", &[]);
    let ip_b1 = c.attach(1, &b1, "b", &[]);
    let ip_b2 = c.attach(2, &b2, "b", &[]);
    let s1 = c.bed.container("s1");
    c.attach(1, &s1, "secure", &[]);
    let ip_s2 = c.attach(2, &s2, "secure", &[]);
    wait_for(Duration::from_secs(10), "the mesh", || {
        c.bed.ping(&s1, ip_s2)
    });
    let (h1, h2) = (c.bed.hosts[0].clone(), c.bed.hosts[1].clone());
    let gw_a1 = address_on(&h1.netns, &format!("nax{}", c.vni("a")));
    // (target namespace, its address, host whose device decapsulates, where to send)
    let cases = [
        ("own gateway", &b1, ip_b1, &h1.netns, at(gw_a1, 4789), b_vni),
        (
            "own host",
            &b1,
            ip_b1,
            &h1.netns,
            at(h1.underlay, 4789),
            b_vni,
        ),
        (
            "peer host",
            &b2,
            ip_b2,
            &h2.netns,
            at(h2.underlay, 4789),
            b_vni,
        ),
        (
            "peer's mesh address",
            &s2,
            ip_s2,
            &h2.netns,
            at(address_on(&h2.netns, "nawg0"), 4790),
            secure_vni,
        ),
    ];
    let mut delivered = Vec::new();
    for (what, target, ip, host, to, vni) in cases {
        let got = listen_once(target, ip, Duration::from_millis(1500));
        send_from(
            &a1,
            forged_vxlan(vni, vxlan_mac(host, vni), ip_a1, ip, b"forged"),
            to,
        );
        if got.join().unwrap().is_some() {
            delivered.push(format!("from a container to the {what} ({to}) into {ip}"));
        }
    }
    // A machine on the underlay that is no peer: dropped too.
    let got = listen_once(&b2, ip_b2, Duration::from_millis(1500));
    send_from(
        &c.bed.underlay_ns.clone(),
        forged_vxlan(b_vni, vxlan_mac(&h2.netns, b_vni), ip_b1, ip_b2, b"forged"),
        at(h2.underlay, 4789),
    );
    if got.join().unwrap().is_some() {
        delivered.push(format!("from a non-peer on the underlay into {ip_b2}"));
    }
    assert_eq!(
        delivered,
        Vec::<String>::new(),
        "forged VXLAN was delivered"
    );
    // The networks themselves still work.
    assert!(c.bed.ping(&a1, ip_a2));
    assert_eq!(tcp_transfer(&b2, ip_b2, &b1, 1 << 20), 1 << 20);
    assert!(c.bed.ping(&s1, ip_s2));
}

#[test]
fn a_flushed_ruleset_is_restored_within_a_second() {
    root_test!();
    let mut c = Cluster::running(1, 3);
    c.create_network("a", "100.64.0.0/16");
    c.create_network("b", "100.65.0.0/16");
    let (a1, a1b, b1) = (
        c.bed.container("a1"),
        c.bed.container("a1b"),
        c.bed.container("b1"),
    );
    let ip_a1 = c.attach(1, &a1, "a", &[]);
    c.attach(1, &a1b, "a", &[]);
    c.attach(1, &b1, "b", &[]);
    let _service = Acceptor::start(&a1, SERVICE_PORT);
    let service = at(ip_a1, SERVICE_PORT);
    let b_reaches_a = || {
        let t = service;
        in_netns(&b1, move || {
            TcpStream::connect_timeout(&t, Duration::from_millis(150)).is_ok()
        })
        .join()
        .unwrap()
    };
    assert!(!b_reaches_a(), "b1 reached a1 before the flush");
    assert!(c.bed.ping(&a1b, ip_a1));
    // A→A traffic all along: 100 pings, 20 ms apart.
    let pinger = c.bed.spawn(
        &a1b,
        "ping",
        &["-n", "-q", "-i", "0.02", "-c", "100", &ip_a1.to_string()],
    );
    std::thread::sleep(Duration::from_millis(300));
    let host = c.bed.hosts[0].netns.clone();
    let flushed = Instant::now();
    let out = sh(&format!("ip netns exec {host} nft flush ruleset"));
    assert!(out.status.success(), "{out:?}");
    // Polled: b1's connections fail again once the table is back.
    let mut closed = None;
    while flushed.elapsed() < Duration::from_secs(3) {
        if !b_reaches_a() {
            closed = Some(flushed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let closed = closed.expect("b1 still reaches a1 3 s after the flush");
    eprintln!("b1 cut off from a1 again {closed:?} after the flush");
    assert!(closed < Duration::from_secs(1), "took {closed:?}");
    assert!(
        sh(&format!("ip netns exec {host} nft list table ip netagent"))
            .status
            .success(),
        "the table is back"
    );
    for _ in 0..3 {
        assert!(!b_reaches_a(), "b1 reached a1 after the restore");
    }
    let out = c.bed.take(pinger).unwrap().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("100 packets transmitted, 100 received"),
        "{text}"
    );
    assert_eq!(tcp_transfer(&a1, ip_a1, &a1b, 1 << 20), 1 << 20);
    // Restored once, and our own re-apply did not set the guard off again.
    std::thread::sleep(Duration::from_millis(500));
    let log = c.log(1);
    let restored = log
        .matches("firewall table deleted by another program; restored")
        .count();
    assert_eq!(restored, 1, "{log}");
    assert_eq!(log.matches("by another program").count(), 1, "{log}");
    if let Some(line) = log.lines().find(|l| l.contains("restored")) {
        eprintln!("{line}");
    }
}
