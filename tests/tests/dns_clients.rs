//! The DNS server against real clients inside a namespace, at 127.0.0.11:53 as a
//! container sees it: dig (UDP and TCP), the C library's resolver (getent) and busybox
//! nslookup, with fake upstream resolvers that the test itself starts on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use netagent_dns::{DnsServer, EndpointRecord, Forwarder, SnapshotBuilder};
use netagent_tests::{in_netns, root_test, upstream, Testbed};

fn ep(network: &str, ip: [u8; 4], name: &str, service: &str) -> EndpointRecord {
    EndpointRecord::replica(network, Ipv4Addr::from(ip), name, Some(service))
}

/// A fake upstream on 127.0.0.1, UDP and TCP on one port (see `upstream_reply`).
/// When `silent`, it receives and never answers.
fn start_upstream(rt: &tokio::runtime::Runtime, silent: bool) -> SocketAddr {
    let socket = rt
        .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let tcp = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
    rt.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = tcp.accept().await {
            let Ok(len) = conn.read_u16().await else {
                continue;
            };
            let mut q = vec![0u8; len as usize];
            if silent || conn.read_exact(&mut q).await.is_err() {
                continue;
            }
            if let Some(r) = upstream::reply(&q, false) {
                let _ = conn.write_all(&(r.len() as u16).to_be_bytes()).await;
                let _ = conn.write_all(&r).await;
            }
        }
    });
    rt.spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            if silent {
                continue;
            }
            if let Some(r) = upstream::reply(&buf[..n], true) {
                let _ = socket.send_to(&r, peer).await;
            }
        }
    });
    addr
}

/// Opens 127.0.0.11:53 (UDP and TCP) inside `netns`, serves it with `server` for the
/// networks in `scope`, and points the namespace's resolv.conf at it.
fn serve_in(rt: &tokio::runtime::Runtime, server: &Arc<DnsServer>, netns: &str, scope: &[&str]) {
    let (udp, tcp) = in_netns(netns, || {
        let udp = std::net::UdpSocket::bind("127.0.0.11:53").expect("bind udp 127.0.0.11:53");
        let tcp = std::net::TcpListener::bind("127.0.0.11:53").expect("bind tcp 127.0.0.11:53");
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        (udp, tcp)
    })
    .join()
    .unwrap();
    let scope = netagent_dns::Scope::new(scope.iter().map(|s| s.to_string()).collect());
    let _guard = rt.enter();
    server.serve_udp(tokio::net::UdpSocket::from_std(udp).unwrap(), scope.clone());
    server.serve_tcp(tokio::net::TcpListener::from_std(tcp).unwrap(), scope);
    let dir = format!("/etc/netns/{netns}");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        format!("{dir}/resolv.conf"),
        "nameserver 127.0.0.11\noptions attempts:1\n",
    )
    .unwrap();
}

struct EtcNetns(Vec<String>);
impl Drop for EtcNetns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

#[test]
fn real_clients_resolve_services_names_and_outside_names() {
    root_test!();
    let mut bed = Testbed::new(0);
    let c = bed.container("dns");
    let quiet = bed.container("quiet");
    let _etc = EtcNetns(vec![c.clone(), quiet.clone()]);
    // An attached container has an address; getaddrinfo's AI_ADDRCONFIG (used by
    // getent ahosts) returns no IPv4 answer at all in a namespace with loopback only.
    bed.exec_ok(&c, "ip link add d0 type veth peer name d1 && ip addr add 100.64.1.50/32 dev d0 && ip link set d1 up && ip link set d0 up");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let snapshot = || {
        SnapshotBuilder::new()
            .endpoint(ep("app-net", [100, 64, 1, 11], "db", "db"))
            .endpoint(ep("app-net", [100, 64, 2, 10], "echo_api.1", "echo_api"))
            .endpoint(ep("app-net", [100, 64, 2, 11], "echo_api.2", "echo_api"))
            .endpoint(ep("app-net", [100, 64, 3, 12], "echo_api.3", "echo_api"))
            .endpoint(ep("other-net", [100, 65, 3, 10], "secret", "secret"))
            .endpoint(ep("app-net", [100, 64, 5, 10], "pair.1", "pair"))
            .endpoint(ep("app-net", [100, 64, 5, 11], "pair.2", "pair"))
            .endpoints(
                (0..100u8).map(|i| ep("app-net", [100, 64, 4, i + 10], &format!("web.{i}"), "web")),
            )
            .build()
    };
    let server = DnsServer::new(Forwarder::new(vec![start_upstream(&rt, false)]).unwrap(), 5);
    server.update(snapshot());
    serve_in(&rt, &server, &c, &["app-net"]);
    let replicas = vec!["100.64.2.10", "100.64.2.11", "100.64.3.12"];

    // dig over UDP and TCP: every replica, first one rotating per query.
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let out = bed.exec_ok(&c, "dig @127.0.0.11 echo_api +short");
        assert_eq!(lines(&out), replicas, "dig echo_api");
        firsts.insert(out.lines().next().unwrap().to_string());
    }
    assert_eq!(
        firsts.len(),
        3,
        "the first address rotates over all replicas: {firsts:?}"
    );
    assert_eq!(
        lines(&bed.exec_ok(&c, "dig +tcp @127.0.0.11 echo_api +short")),
        replicas
    );
    assert_eq!(
        lines(&bed.exec_ok(&c, "dig @127.0.0.11 DB.app-net. +short")),
        vec!["100.64.1.11"]
    );
    assert_eq!(
        lines(&bed.exec_ok(&c, "dig @127.0.0.11 tasks.echo_api +short")),
        replicas
    );

    // AAAA of a local name: NOERROR, no answer. PTR of an endpoint.
    let aaaa = bed.exec_ok(&c, "dig @127.0.0.11 echo_api AAAA");
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "{aaaa}"
    );
    assert_eq!(
        bed.exec_ok(&c, "dig @127.0.0.11 -x 100.64.3.12 +short")
            .trim(),
        "echo_api.3.app-net."
    );

    // 100 replicas: truncated over UDP without EDNS, whole over TCP (dig retries itself).
    let tc = bed.exec_ok(&c, "dig @127.0.0.11 web +noedns +ignore");
    assert!(tc.contains(" tc"), "expected the TC flag: {tc}");
    assert_eq!(
        lines(&bed.exec_ok(&c, "dig @127.0.0.11 web +noedns +short")).len(),
        100
    );

    // The C library's resolver and busybox.
    let getent = bed.exec_ok(&c, "getent ahostsv4 echo_api | cut -d\" \" -f1 | sort -u");
    assert_eq!(lines(&getent), replicas, "getent ahostsv4");
    // Two replicas and the C library, which asks A and AAAA for every lookup: the
    // first address still alternates from one lookup to the next.
    let firsts: std::collections::BTreeSet<String> = (0..4)
        .map(|_| bed.exec_ok(&c, "getent ahosts pair | head -n 1 | cut -d\" \" -f1"))
        .map(|s| s.trim().to_owned())
        .collect();
    assert_eq!(
        firsts.into_iter().collect::<Vec<_>>(),
        vec!["100.64.5.10", "100.64.5.11"],
        "first address of getent ahosts pair over 4 lookups"
    );
    let getent = bed.exec_ok(&c, "getent hosts db");
    assert!(
        getent.starts_with("100.64.1.11"),
        "getent hosts db: {getent}"
    );
    let ns = bed.exec_ok(&c, "busybox nslookup echo_api 127.0.0.11");
    for ip in &replicas {
        assert!(ns.contains(ip), "busybox nslookup lacks {ip}: {ns}");
    }

    // Outside names go to the upstream; other networks' names do not exist here.
    assert_eq!(
        bed.exec_ok(&c, "dig @127.0.0.11 outside.test +short")
            .trim(),
        "203.0.113.7"
    );
    let cached = bed.exec_ok(&c, "dig @127.0.0.11 OUTSIDE.test");
    assert!(
        cached.contains("203.0.113.7") && cached.contains("OUTSIDE.test."),
        "cached answer keeps the asker's question: {cached}"
    );
    assert!(bed
        .exec_ok(&c, "dig @127.0.0.11 secret")
        .contains("status: NXDOMAIN"));
    // Truncated upstream answer over UDP: the forwarder retries over TCP.
    assert_eq!(
        bed.exec_ok(&c, "dig @127.0.0.11 big.test +short").trim(),
        "203.0.113.8"
    );
    // Cached answers count their TTL down.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let ttl: u32 = bed
        .exec_ok(&c, "dig @127.0.0.11 outside.test +noall +answer")
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .expect("an answer line with a TTL");
    assert!(ttl < 60, "cached TTL did not count down: {ttl}");

    // An upstream that never answers: SERVFAIL within 2 s, as dig measures it.
    let deaf = DnsServer::new(Forwarder::new(vec![start_upstream(&rt, true)]).unwrap(), 5);
    serve_in(&rt, &deaf, &quiet, &["app-net"]);
    let out = bed.exec_ok(&quiet, "dig @127.0.0.11 nowhere.test +tries=1 +time=5");
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let ms: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix(";; Query time: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("dig prints the query time");
    assert!(ms < 2000, "SERVFAIL took {ms} ms");
    drop(rt);
}

/// Three replicas attached through the agent with `--port http:8080`: dig's SRV query
/// lists each with its port and own name, and that name resolves to its address.
#[test]
fn dig_finds_service_ports_by_srv() {
    root_test!();
    let mut c = netagent_tests::cluster::Cluster::local();
    c.start_agent(1);
    c.create_network("app", "100.64.0.0/24");
    let mut replicas = Vec::new();
    for i in 1..=3 {
        let ns = c.bed.container(&format!("srv{i}"));
        let name = format!("echo{i}");
        let args = [
            "--service",
            "echo_api",
            "--port",
            "http:8080",
            "--name",
            &name,
        ];
        let address = c.attach(1, &ns, "app", &args);
        replicas.push((ns, name, address));
    }
    let asker = &replicas[0].0;
    let dig = |q: &str| {
        let out = netagent_tests::run::sh_ok(&format!(
            "ip netns exec {asker} dig +short +tries=1 +time=2 {q} @127.0.0.11"
        ));
        lines(&out)
    };
    let mut want: Vec<String> = replicas
        .iter()
        .map(|(_, name, _)| format!("0 10 8080 {name}."))
        .collect();
    want.sort();
    assert_eq!(dig("SRV _http._tcp.echo_api"), want);
    for (_, name, address) in &replicas {
        assert_eq!(dig(&format!("A {name}")), vec![address.to_string()]);
    }
    // The targets' addresses come along in the additional section.
    let full = netagent_tests::run::sh_ok(&format!(
        "ip netns exec {asker} dig +tries=1 +time=2 SRV _http._tcp.echo_api @127.0.0.11"
    ));
    assert!(
        full.contains("ADDITIONAL: 4"),
        "3 addresses and OPT: {full}"
    );
}
