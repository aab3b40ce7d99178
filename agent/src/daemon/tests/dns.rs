//! The embedded DNS as a container sees it: real UDP queries to the listener of its
//! namespace, answering for the networks it is on and no others.

use super::*;
use crate::api::EndpointState;
use crate::model::EndpointRecord;

#[tokio::test]
async fn the_listener_of_an_attached_namespace_answers_its_networks_names() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h1.attach("b", "app", None).await.address;
    let listener = h1.listener("a").await;
    assert_eq!(query_a(listener, "a").await, [a]);
    assert_eq!(query_a(listener, "b").await, [b]);
    assert_eq!(query_a(listener, "b.app").await, [b]);
    assert_eq!(query_a(listener, "api").await, [a]);
    assert_eq!(query_a(listener, "tasks.api").await, [a]);
}

#[tokio::test]
async fn a_namespace_does_not_get_the_names_of_networks_it_is_not_on() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.create_network("db", "100.65.0.0/16").await;
    let a = h1.attach("a", "app", None).await.address;
    let d = h1.attach("d", "db", Some("pg")).await.address;
    let on_app = h1.listener("a").await;
    let on_db = h1.listener("d").await;
    assert!(query_a(on_app, "d").await.is_empty());
    assert!(query_a(on_app, "pg").await.is_empty());
    assert!(query_a(on_app, "pg.db").await.is_empty());
    assert!(query_a(on_db, "a").await.is_empty());
    assert_eq!(query_a(on_db, "pg").await, [d]);
    assert_eq!(query_a(on_app, "a").await, [a]);
}

#[tokio::test]
async fn a_namespace_on_two_networks_has_one_listener_answering_both() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.create_network("db", "100.65.0.0/16").await;
    h1.attach("a", "app", None).await;
    h1.attach("a", "db", None).await;
    let d = h1.attach("d", "db", Some("pg")).await.address;
    let w = h1.attach("w", "app", Some("web")).await.address;
    assert_eq!(
        h1.listener_scope("a").await,
        Some(vec!["app".to_owned(), "db".to_owned()])
    );
    assert_eq!(
        h1.agent.listeners.scopes().await.len(),
        3,
        "one per namespace"
    );
    let listener = h1.listener("a").await;
    assert_eq!(query_a(listener, "pg").await, [d]);
    assert_eq!(query_a(listener, "web").await, [w]);
}

#[tokio::test]
async fn the_listener_closes_when_the_namespaces_last_endpoint_detaches() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.create_network("db", "100.65.0.0/16").await;
    h1.attach("a", "app", None).await;
    h1.attach("a", "db", None).await;
    h1.agent.detach("/run/netns/a", "app").await.unwrap();
    assert_eq!(h1.listener_scope("a").await, Some(vec!["db".to_owned()]));
    let listener = h1.listener("a").await;
    h1.agent.detach("/run/netns/a", "db").await.unwrap();
    assert_eq!(h1.listener_scope("a").await, None);
    // Its socket is closed: the port is free again.
    std::net::UdpSocket::bind(listener).expect("the listener's port is free");
}

#[tokio::test]
async fn a_service_answers_every_replica_on_every_host() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let c = h1.attach("c", "app", Some("api")).await.address;
    let b = h2.attach("b", "app", Some("api")).await.address;
    let listener = h1.listener("a").await;
    let all = sorted(vec![a, b, c]);
    for _ in 0..500 {
        if sorted(query_a(listener, "api").await) == all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sorted(query_a(listener, "api").await), all);
    let services = h1.agent.services(Some("app"));
    assert_eq!(services.len(), 1);
    assert_eq!(sorted(services[0].replicas.clone()), all);
}

#[tokio::test]
async fn an_unhealthy_replica_leaves_the_service_but_keeps_its_own_name() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h1.attach("b", "app", Some("api")).await.address;
    let key = format!("endpoints/app/{b}");
    let mut record: EndpointRecord = bed.store.get(&key).await.expect("b's record");
    record.in_service = false;
    bed.store.put(&key, &record).await;
    eventually("b leaves the service", || h1.resolve("app", "api") == [a]).await;
    assert_eq!(h1.resolve("app", "b"), [b]);
    let listener = h1.listener("a").await;
    assert_eq!(query_a(listener, "api").await, [a]);
    assert_eq!(query_a(listener, "b").await, [b]);
    let state = h1
        .agent
        .endpoints()
        .into_iter()
        .find(|e| e.address == b)
        .map(|e| e.state);
    assert_eq!(state, Some(EndpointState::Unhealthy));
    assert_eq!(h1.agent.services(None)[0].replicas, [a]);
    // Still attached: it is only out of the rotation.
    assert_eq!(h1.kernel.endpoints().len(), 2);
}

#[tokio::test]
async fn a_reverse_query_names_the_endpoint_in_its_network() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    let b = h1.attach("b", "app", None).await.address;
    let listener = h1.listener("a").await;
    assert_eq!(query_ptr(listener, b).await, ["b.app."]);
}

#[tokio::test]
async fn an_endpoint_answers_to_its_given_name_and_aliases() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1
        .attach_with("a", "app", None, |req| {
            req.name = Some("frontend".into());
            req.aliases = vec!["www".into()];
        })
        .await
        .address;
    let listener = h1.listener("a").await;
    assert_eq!(query_a(listener, "frontend").await, [a]);
    assert_eq!(query_a(listener, "www.app").await, [a]);
    assert!(
        query_a(listener, "a").await.is_empty(),
        "the path's name is not used"
    );
}

#[tokio::test]
async fn a_service_on_both_networks_of_a_namespace_answers_from_both() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.create_network("db", "100.65.0.0/16").await;
    h1.attach("c", "app", None).await;
    h1.attach("c", "db", None).await;
    let on_app = h1.attach("x", "app", Some("api")).await.address;
    let on_db = h1.attach("y", "db", Some("api")).await.address;
    let listener = h1.listener("c").await;
    assert_eq!(sorted(query_a(listener, "api").await), [on_app, on_db]);
    assert_eq!(query_a(listener, "api.db").await, [on_db]);
}

#[tokio::test]
async fn a_replica_asking_for_one_per_answer_puts_its_service_in_that_mode() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", Some("api")).await;
    h1.attach("b", "app", Some("api")).await;
    assert_eq!(
        h1.resolve("app", "api").len(),
        2,
        "every replica by default"
    );
    h1.attach_with("c", "app", Some("api"), |req| req.one_per_answer = true)
        .await;
    let answers: Vec<Vec<Ipv4Addr>> = (0..3).map(|_| h1.resolve("app", "api")).collect();
    assert!(answers.iter().all(|a| a.len() == 1), "{answers:?}");
    let seen: std::collections::BTreeSet<Ipv4Addr> = answers.into_iter().flatten().collect();
    assert_eq!(seen.len(), 3, "each replica in turn");
    // The container's own name still answers with it alone; the mode ends with the
    // replica that asked for it.
    assert_eq!(h1.resolve("app", "c"), [ip("100.64.0.4")]);
    h1.agent.detach("/run/netns/c", "app").await.unwrap();
    assert_eq!(h1.resolve("app", "api").len(), 2);
}

#[tokio::test]
async fn one_per_answer_holds_for_a_namespace_on_two_networks() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.create_network("db", "100.65.0.0/16").await;
    h1.attach("c", "app", None).await;
    h1.attach("c", "db", None).await;
    h1.attach("x", "app", Some("api")).await;
    h1.attach("y", "db", Some("api")).await;
    h1.attach_with("z", "app", Some("api"), |req| req.one_per_answer = true)
        .await;
    let listener = h1.listener("c").await;
    for _ in 0..3 {
        assert_eq!(query_a(listener, "api").await.len(), 1);
    }
}

#[tokio::test]
async fn replicas_with_named_ports_answer_srv_queries() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let mut addresses = Vec::new();
    for ns in ["a", "b", "c"] {
        let attached = h1
            .attach_with(ns, "app", Some("echo_api"), |req| {
                req.ports = vec!["http:8080".parse().unwrap(), "dns:53/udp".parse().unwrap()];
            })
            .await;
        addresses.push(attached.address);
    }
    h1.attach("d", "app", Some("db")).await;
    let listener = h1.listener("d").await;
    let (first, additional) = query_srv(listener, "_http._tcp.echo_api").await;
    let mut answers = first.clone();
    answers.sort();
    let want: Vec<(u16, u16, u16, String)> = ["a.", "b.", "c."]
        .iter()
        .map(|t| (0, 10, 8080, t.to_string()))
        .collect();
    assert_eq!(answers, want);
    assert_eq!(additional, 3, "each target's address alongside");
    let (second, _) = query_srv(listener, "_http._tcp.echo_api").await;
    assert_ne!(first[0], second[0], "rotated");
    assert_eq!(query_a(listener, "b").await, [addresses[1]]);
    let (udp, _) = query_srv(listener, "_dns._udp.echo_api").await;
    assert!(udp.len() == 3 && udp.iter().all(|s| s.2 == 53));
    assert_eq!(query_srv(listener, "echo_api.service").await.0.len(), 3);
    assert_eq!(query_srv(listener, "_http._tcp.c").await.0.len(), 1);
    assert!(
        query_srv(listener, "db").await.0.is_empty(),
        "no ports: no data"
    );
    // The ports are in the store for the other hosts.
    let key = format!("endpoints/app/{}", addresses[0]);
    let record: EndpointRecord = bed.store.get(&key).await.expect("a's record");
    assert_eq!(record.ports.len(), 2);
    // A request with an impossible port attaches nothing.
    let e = h1
        .try_attach_with("e", "app", Some("echo_api"), |req| {
            req.ports = vec![crate::model::Port {
                name: "HTTP".into(),
                port: 80,
                protocol: crate::model::Protocol::Tcp,
            }];
        })
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("is not a service name"), "{e:#}");
}

/// An upstream on loopback that answers every A query with `address` (TTL 60),
/// echoing the question as asked; counts the queries it gets.
async fn upstream_answering(
    address: Ipv4Addr,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Header and question as asked (no EDNS record), one answer added.
            let mut end = 12;
            while end < n && buf[end] != 0 {
                end += 1 + buf[end] as usize;
            }
            let mut r = buf[..end + 5].to_vec();
            r[2] = 0x81; // response, recursion desired
            r[3] = 0x80; // recursion available, NOERROR
            r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&address.octets());
            let _ = socket.send_to(&r, from).await;
        }
    });
    (addr, asked)
}

#[tokio::test]
async fn namespaces_with_their_own_dns_servers_forward_to_them_and_caches_never_mix() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let (first, first_asked) = upstream_answering(ip("198.51.100.1")).await;
    let (second, _) = upstream_answering(ip("198.51.100.2")).await;
    for (ns, own) in [("a", first), ("b", second), ("c", first)] {
        h1.attach_with(ns, "app", None, |req| req.dns = vec![own])
            .await;
    }
    // d uses the host's servers (127.0.0.1:9 in the test config: nothing there).
    h1.attach("d", "app", None).await;
    let (a, b, c, d) = (
        h1.listener("a").await,
        h1.listener("b").await,
        h1.listener("c").await,
        h1.listener("d").await,
    );
    // a asks first: its answer is cached for its servers, and only for them.
    assert_eq!(query_a(a, "whoami.example").await, [ip("198.51.100.1")]);
    assert_eq!(query_a(b, "whoami.example").await, [ip("198.51.100.2")]);
    assert_eq!(query_a(a, "whoami.example").await, [ip("198.51.100.1")]);
    // c names the same servers as a: one forwarder, one cache between them.
    assert_eq!(query_a(c, "whoami.example").await, [ip("198.51.100.1")]);
    assert_eq!(
        first_asked.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "a's and c's answers came from one upstream exchange"
    );
    assert!(
        query_a(d, "whoami.example").await.is_empty(),
        "another namespace's servers are not the host's"
    );
    // Local names are still local.
    assert_eq!(query_a(b, "d").await.len(), 1);
}

#[tokio::test]
async fn a_restarted_agent_keeps_each_namespace_s_own_dns_servers() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let (own, _) = upstream_answering(ip("198.51.100.7")).await;
    h1.attach_with("a", "app", None, |req| req.dns = vec![own])
        .await;
    let kernel = h1.crash().await;
    let h1 = bed.host_on("h1", 11, kernel).await;
    let a = h1.listener("a").await;
    assert_eq!(query_a(a, "whoami.example").await, [ip("198.51.100.7")]);
}
