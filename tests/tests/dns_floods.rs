//! One container floods its own 127.0.0.11 through the running agent; what it can
//! make the agent hold stays bounded, and the other containers' names (local and
//! forwarded) answer as before.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::{in_netns, root_test, upstream, OUTSIDE_ADDRESS};

/// The agent's open descriptors.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent is running")
        .count()
}

/// `dig` from inside `ns` at the embedded DNS; its full output.
fn dig(c: &Cluster, ns: &str, args: &str) -> String {
    String::from_utf8_lossy(
        &c.bed
            .exec(ns, &format!("dig +tries=2 +time=2 @127.0.0.11 {args}"))
            .stdout,
    )
    .into_owned()
}

fn short(c: &Cluster, ns: &str, args: &str) -> Vec<Ipv4Addr> {
    dig(c, ns, &format!("+short {args}"))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// One agent on the local store with network "app": a flooding namespace and a
/// victim namespace that is also service "db".
fn two_containers(c: &mut Cluster) -> (String, String, Ipv4Addr) {
    c.start_agent(1);
    c.create_network("app", "100.64.0.0/16");
    let flood = c.bed.container("flood");
    let victim = c.bed.container("victim");
    c.attach(1, &flood, "app", &[]);
    let db = c.attach(1, &victim, "app", &["--service", "db"]);
    wait_for(Duration::from_secs(5), "the embedded DNS in both", || {
        short(c, &victim, "db") == vec![db] && short(c, &flood, "db") == vec![db]
    });
    (flood, victim, db)
}

#[test]
fn a_thousand_stalled_tcp_connections_hold_no_more_than_a_few_descriptors() {
    root_test!();
    let mut c = Cluster::local();
    let (flood, victim, db) = two_containers(&mut c);
    let pid = c.agent_pid(1).expect("agent pid");
    let idle = fds(pid);

    // 1,000 connections left stalled: half send nothing, half a length and half a
    // body. Connections the agent closes at once are counted, not an error.
    let clients = in_netns(&flood, || {
        let dns: SocketAddr = "127.0.0.11:53".parse().unwrap();
        let mut held = Vec::new();
        for i in 0..1000 {
            let Ok(mut s) = TcpStream::connect_timeout(&dns, Duration::from_secs(2)) else {
                continue;
            };
            if i % 2 == 1 {
                let _ = s.write_all(&[0, 40, 0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0]);
            }
            held.push(s);
        }
        held
    })
    .join()
    .unwrap();
    eprintln!(
        "{} connections opened; agent fds idle {idle}",
        clients.len()
    );

    let bound = idle + 100;
    for _ in 0..10 {
        let now = fds(pid);
        assert!(
            now < bound,
            "the agent holds {now} descriptors (idle {idle}) for one namespace's stalled connections"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The other namespace's names answer over UDP and TCP meanwhile.
    assert_eq!(short(&c, &victim, "db"), vec![db], "udp");
    assert_eq!(short(&c, &victim, "+tcp db"), vec![db], "tcp");
    let now = fds(pid);
    assert!(now < bound, "{now} descriptors (idle {idle})");

    // The container leaves: its listener and every connection of it close, whatever
    // the client still holds.
    c.cli_ok(1, &["detach", &format!("/run/netns/{flood}"), "app"]);
    wait_for(
        Duration::from_secs(5),
        "the agent's descriptors back to idle",
        || fds(pid) <= idle + 5,
    );
    let mut open = 0;
    for mut s in clients {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if matches!(s.read(&mut [0u8; 64]), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
        {
            open += 1;
        }
    }
    assert_eq!(open, 0, "connections still open after the detach");
    assert_eq!(short(&c, &victim, "+tcp db"), vec![db]);
}

#[test]
fn a_udp_flood_of_stalled_forwards_leaves_the_others_their_upstream() {
    root_test!();
    let mut c = Cluster::local();
    // The upstream answers every zone but flood.test, which it takes and never answers.
    upstream::serve_udp_silent_for_in(
        &c.bed.outside_ns,
        SocketAddr::from((OUTSIDE_ADDRESS, 53)),
        ".flood.test.",
    );
    c.dns_extra = format!("upstream = [\"{OUTSIDE_ADDRESS}:53\"]\n");
    let (flood, victim, db) = two_containers(&mut c);

    // As fast as one thread sends: distinct names, so nothing comes from a cache.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let flooder = {
        let (stop, sent, answered) = (stop.clone(), sent.clone(), answered.clone());
        in_netns(&flood, move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect("127.0.0.11:53").unwrap();
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 512];
            let mut i: u32 = 0;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    i = i.wrapping_add(1);
                    if s.send(&query(i as u16, &format!("q{i}.flood.test")))
                        .is_ok()
                    {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                while s.recv(&mut buf).is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Longer than the forward deadline: every slot the flood can take is taken.
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    let outside = dig(&c, &victim, "outside.test");
    let others: Vec<String> = (0..5)
        .map(|i| dig(&c, &victim, &format!("n{i}.answers.test")))
        .collect();
    let local = short(&c, &victim, "db");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    eprintln!(
        "flood: {} sent, {} answered; the victim's 7 queries took {took:?}",
        sent.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed)
    );

    assert!(
        outside.contains("status: NOERROR") && outside.contains("203.0.113.7"),
        "a forwarded name of another namespace during the flood:\n{outside}"
    );
    for out in &others {
        // NXDOMAIN is the upstream's own answer; SERVFAIL would be the agent giving up.
        assert!(out.contains("status: NXDOMAIN"), "{out}");
    }
    assert_eq!(local, vec![db], "a local name during the flood");
}

/// An A query for `name`, recursion desired.
fn query(id: u16, name: &str) -> Vec<u8> {
    netagent_dns::stub_query(id, name, 1)
}
