//! The embedded DNS's forwarding against hostile containers, through the running
//! agent: namespaces attached with `netagent attach` ask 127.0.0.11 as containers
//! do, and the agent forwards to a fake upstream in the test bed's outside
//! namespace that answers as an attacker's path might (see
//! `upstream::hostile_replies`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netagent_tests::cluster::{resolve, wait_for, Cluster};
use netagent_tests::{in_netns, root_test, upstream, OUTSIDE_ADDRESS};

/// The flood test measures the agent's descriptors; the others must not add load
/// on two cores meanwhile.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// One host whose agent forwards to the hostile upstream, with networks `neta` and
/// `netb`.
fn host() -> Cluster {
    let mut c = Cluster::local();
    upstream::serve_udp_with(
        &c.bed.outside_ns,
        SocketAddr::from((OUTSIDE_ADDRESS, 53)),
        upstream::hostile_replies,
    );
    c.dns_extra = format!("upstream = [\"{OUTSIDE_ADDRESS}:53\"]\n");
    c.start_agent(1);
    c.create_network("neta", "100.64.1.0/24");
    c.create_network("netb", "100.64.2.0/24");
    c
}

/// A new namespace attached to `network` under `name`, its DNS answering.
fn container(c: &mut Cluster, name: &str, network: &str, extra: &[&str]) -> (String, Ipv4Addr) {
    let ns = c.bed.container(name);
    let mut args = vec!["--name", name];
    args.extend_from_slice(extra);
    let ip = c.attach(1, &ns, network, &args);
    wait_for(Duration::from_secs(5), "the namespace's DNS", || {
        resolve(&ns, name) == vec![ip]
    });
    (ns, ip)
}

fn dig(c: &Cluster, ns: &str, args: &str) -> String {
    let out = c
        .bed
        .exec(ns, &format!("dig +tries=1 +time=4 @127.0.0.11 {args}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_dotted_label_from_one_network_does_not_poison_the_name_for_another() {
    root_test!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = host();
    let (a, _) = container(&mut c, "alpha", "neta", &[]);
    let (b, _) = container(&mut c, "bravo", "netb", &[]);

    // Network A asks the single label `outside2\.example`: it does not exist.
    let out = dig(&c, &a, "'outside2\\.example' A");
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(
        out.contains("outside2\\.example."),
        "the asker's label: {out}"
    );

    // Network B asks the real two-label name and gets its address.
    assert_eq!(resolve(&b, "outside2.example"), vec![upstream::OUTSIDE2]);
    assert_eq!(resolve(&a, "OUTSIDE2.example"), vec![upstream::OUTSIDE2]);
    // Both are cached apart: the single label still does not exist, for anyone.
    let out = dig(&c, &b, "'outside2\\.example' A");
    assert!(out.contains("status: NXDOMAIN"), "{out}");
}

/// An A query for `name` (labels split at '.') with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    netagent_dns::stub_query(id, name, 1)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_query_flood_to_a_dead_zone_holds_descriptors_and_local_names_answer() {
    root_test!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = host();
    let (flooder, _) = container(&mut c, "flood", "neta", &[]);
    let (calm, _) = container(&mut c, "calm", "netb", &[]);
    let (_, db_ip) = container(&mut c, "dbhost", "netb", &["--service", "db"]);
    let pid = c.agent_pid(1).expect("agent running");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "netagent", "the agent's own process");
    // One forward first, so whatever the forwarder opens once is open.
    assert_eq!(
        resolve(&flooder, "outside2.example"),
        vec![upstream::OUTSIDE2]
    );
    std::thread::sleep(Duration::from_millis(300));
    let idle = open_fds(pid);

    let done = Arc::new(AtomicBool::new(false));
    let flood = {
        let done = done.clone();
        in_netns(&flooder, move || {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(1)))
                .unwrap();
            let mut buf = [0u8; 512];
            let mut replies = 0usize;
            for i in 0..10_000u32 {
                let _ = socket.send_to(
                    &query(i as u16, &format!("q{i}.silent.test")),
                    "127.0.0.11:53",
                );
                if i % 50 == 49 {
                    // Paced a little, so the flood lasts long enough to overlap the
                    // checks below, and read what came back.
                    while socket.recv(&mut buf).is_ok() {
                        replies += 1;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            done.store(true, Ordering::SeqCst);
            replies
        })
    };
    // Meanwhile, another namespace's local name answers.
    let checks = {
        let (calm, done) = (calm.clone(), done.clone());
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.is_empty() || !done.load(Ordering::SeqCst) {
                let out = netagent_tests::sh(&format!(
                    "ip netns exec {calm} dig +short +tries=1 +time=2 @127.0.0.11 db A"
                ));
                got.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
            }
            got
        })
    };
    let mut most = idle;
    let mut settled: Option<Instant> = None;
    loop {
        most = most.max(open_fds(pid));
        if done.load(Ordering::SeqCst) {
            // Until every forward of the flood has met its deadline.
            let since = *settled.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(2500) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let replies = flood.join().expect("flood thread");
    let answers = checks.join().expect("check thread");
    eprintln!("idle {idle} fds, at most {most} during the flood; {replies} replies read");
    assert!(
        most < idle + 100,
        "open descriptors grew from {idle} to {most} under a flood from one namespace"
    );
    assert!(
        answers.iter().all(|a| a == &db_ip.to_string()),
        "the local name `db` during the flood: {answers:?}"
    );
    // Forwarding works again once the flood's forwards are over.
    wait_for(Duration::from_secs(5), "forwarding after the flood", || {
        resolve(&calm, "outside2.example") == vec![upstream::OUTSIDE2]
    });
}

#[test]
fn forged_upstream_answers_are_not_accepted() {
    root_test!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = host();
    let (a, _) = container(&mut c, "alpha", "neta", &[]);
    // Forged answers (another id, the question in another letter case, another
    // question) come first; only the real one is taken.
    assert_eq!(resolve(&a, "spoofed.test"), vec![upstream::SPOOFED_REAL]);
    // Forged answers only: no answer is better than a forged one.
    let out = dig(&c, &a, "onlyspoofed.test A");
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(!out.contains(&upstream::FORGED.to_string()), "{out}");
}
