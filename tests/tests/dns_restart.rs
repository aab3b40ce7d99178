//! The embedded DNS across a restart, an upgrade and a crash of the agent: a client
//! in an attached namespace asks every 5 ms, and every query is answered. The DNS
//! sockets are held by the keeper while no agent runs; queries wait in them.

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netagent_tests::cluster::{resolve, wait_for, Cluster};
use netagent_tests::{in_netns, root_test};

/// What a client saw: queries sent, those answered with the right address, the
/// slowest answer, and when the first answer after `mark` came.
struct Seen {
    sent: usize,
    answered: usize,
    wrong: usize,
    slowest: Duration,
    unanswered: Vec<u16>,
    answers_at: Vec<Instant>,
}

/// A client in `netns` asking for `name` (which must resolve to `expect`) every 5 ms
/// over one UDP socket, as a stub resolver would, until stopped.
struct Client {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl Client {
    fn start(netns: &str, name: &str, expect: Ipv4Addr) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let query_name = name.to_string();
        let thread = in_netns(netns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect("127.0.0.11:53").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let mut sent_at: HashMap<u16, Instant> = HashMap::new();
            let mut seen = Seen {
                sent: 0,
                answered: 0,
                wrong: 0,
                slowest: Duration::ZERO,
                unanswered: Vec::new(),
                answers_at: Vec::new(),
            };
            let mut next = Instant::now();
            let mut stopped_at: Option<Instant> = None;
            let mut buf = [0u8; 512];
            loop {
                let now = Instant::now();
                if stopped_at.is_none() && stopping.load(Ordering::Relaxed) {
                    stopped_at = Some(now);
                }
                match stopped_at {
                    // Stragglers get 3 s, far more than a stub's first retry.
                    Some(t) if sent_at.is_empty() || t.elapsed() > Duration::from_secs(3) => break,
                    None if now >= next => {
                        let id = seen.sent as u16;
                        // A query that fails to go out counts as unanswered.
                        let _ = s.send(&netagent_dns::stub_query(id, &query_name, 1));
                        sent_at.insert(id, now);
                        seen.sent += 1;
                        next += Duration::from_millis(5);
                    }
                    _ => {}
                }
                let Ok(n) = s.recv(&mut buf) else { continue };
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let Some(t) = sent_at.remove(&id) else {
                    continue;
                };
                let at = Instant::now();
                seen.slowest = seen.slowest.max(at - t);
                seen.answers_at.push(at);
                if first_address(&buf[..n]) == Some(expect) {
                    seen.answered += 1;
                } else {
                    seen.wrong += 1;
                }
            }
            seen.unanswered = sent_at.into_keys().collect();
            seen.unanswered.sort();
            seen
        });
        Client { stop, thread }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("client thread")
    }
}

/// The first A record of a response.
fn first_address(r: &[u8]) -> Option<Ipv4Addr> {
    if r.len() < 12 || r[3] & 0x0f != 0 || u16::from_be_bytes([r[6], r[7]]) == 0 {
        return None;
    }
    // Skip the question: its name, then type and class.
    let mut i = 12;
    while *r.get(i)? != 0 {
        i += 1 + r[i] as usize;
    }
    i += 5;
    // The answer's name (a pointer or labels), type, class, TTL, length, data.
    if r.get(i)? & 0xc0 == 0xc0 {
        i += 2;
    } else {
        while *r.get(i)? != 0 {
            i += 1 + r[i] as usize;
        }
        i += 1;
    }
    let data = r.get(i + 10..i + 14)?;
    Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]))
}

/// One host with the local store, `db` attached and a client namespace attached.
fn host_with_db(keep_secs: u64) -> (Cluster, String, Ipv4Addr) {
    let mut c = Cluster::local();
    c.dns_extra = format!("keep_sockets_secs = {keep_secs}\n");
    c.start_agent(1);
    c.create_network("app", "100.64.0.0/16");
    let db = c.bed.container("db");
    let ip = c.attach(1, &db, "app", &["--name", "db"]);
    let client = c.bed.container("client");
    c.attach(1, &client, "app", &["--name", "client"]);
    wait_for(Duration::from_secs(5), "db to resolve", || {
        resolve(&client, "db") == vec![ip]
    });
    (c, client, ip)
}

fn assert_every_query_answered(seen: &Seen, what: &str) {
    eprintln!(
        "{what}: {} sent, {} answered, {} wrong, slowest {:?}",
        seen.sent, seen.answered, seen.wrong, seen.slowest
    );
    assert!(
        seen.sent > 200,
        "{what}: the client ran ({} queries)",
        seen.sent
    );
    assert_eq!(seen.wrong, 0, "{what}: answers without db's address");
    assert!(
        seen.unanswered.is_empty(),
        "{what}: {} of {} queries never answered (ids {:?}...)",
        seen.unanswered.len(),
        seen.sent,
        &seen.unanswered[..seen.unanswered.len().min(10)]
    );
    // The gap is ~0.3 s; 2 s is well inside a stub's 5 s timeout and still catches
    // a restart that got slow.
    assert!(
        seen.slowest < Duration::from_secs(2),
        "{what}: an answer took {:?}",
        seen.slowest
    );
}

#[test]
fn a_graceful_restart_loses_no_query() {
    root_test!();
    let (mut c, client, ip) = host_with_db(60);
    let asking = Client::start(&client, "db", ip);
    std::thread::sleep(Duration::from_millis(500));
    let old = c.agent_pid(1).unwrap();
    c.stop_agent(1);
    let keeper = c.keeper_pid(1).expect("the keeper outlives the agent");
    // A slow start: what arrives meanwhile waits in the kept socket.
    std::thread::sleep(Duration::from_millis(300));
    c.start_agent(1);
    assert_ne!(c.agent_pid(1), Some(old));
    std::thread::sleep(Duration::from_millis(500));
    let seen = asking.finish();
    assert_every_query_answered(&seen, "restart");
    assert_eq!(
        c.keeper_pid(1),
        Some(keeper),
        "the same keeper serves the next agent"
    );
    assert!(
        c.log(1)
            .contains("took over the previous agent's DNS sockets"),
        "the new agent used the kept sockets"
    );
}

#[test]
fn an_upgrade_to_another_binary_loses_no_query() {
    root_test!();
    let (mut c, client, ip) = host_with_db(60);
    // Another program file: the same build with bytes appended (ELF ignores them).
    let upgraded: PathBuf = c.dir.join("netagent-upgraded");
    let mut program = std::fs::read(netagent_tests::netagent_bin()).unwrap();
    program.extend_from_slice(b"\0upgraded build\0");
    std::fs::write(&upgraded, &program).unwrap();
    std::fs::set_permissions(
        &upgraded,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let asking = Client::start(&client, "db", ip);
    std::thread::sleep(Duration::from_millis(500));
    c.stop_agent(1);
    std::thread::sleep(Duration::from_millis(300));
    c.spawn_agent_from(1, &upgraded);
    let socket = c.socket(1);
    wait_for(Duration::from_secs(20), "the upgraded agent's API", || {
        netagent_tests::cluster::run_cli(&socket, &["status"])
            .status
            .success()
    });
    // The `ip netns exec` wrapper has become the agent by now (it execs).
    let pid = c.agent_pid(1).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, upgraded, "the new agent runs the upgraded program");
    std::thread::sleep(Duration::from_millis(500));
    assert_every_query_answered(&asking.finish(), "upgrade");
}

#[test]
fn after_a_crash_answers_are_back_within_a_second_of_the_new_start() {
    root_test!();
    let (mut c, client, ip) = host_with_db(60);
    let asking = Client::start(&client, "db", ip);
    std::thread::sleep(Duration::from_millis(500));
    c.kill_agent(1);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    c.spawn_agent(1);
    std::thread::sleep(Duration::from_millis(1500));
    let seen = asking.finish();
    let back = seen
        .answers_at
        .iter()
        .find(|t| **t > started)
        .map(|t| *t - started)
        .expect("answers after the new start");
    eprintln!(
        "crash: first answer {back:?} after the new start; {} of {} answered",
        seen.answered, seen.sent
    );
    assert!(
        back < Duration::from_secs(1),
        "answers came back {back:?} after the new start"
    );
    // What the killed agent had read and not yet answered is lost (at most one
    // batch); everything sent while no agent ran waited in the socket.
    assert!(
        seen.unanswered.len() <= 32,
        "{} queries unanswered after a crash",
        seen.unanswered.len()
    );
    assert_eq!(seen.wrong, 0);
}

#[test]
fn a_stopped_agent_s_sockets_are_let_go_after_the_grace_period() {
    root_test!();
    let (mut c, client, _) = host_with_db(2);
    let keeper = c.keeper_pid(1).expect("a keeper runs beside the agent");
    c.stop_agent(1);
    // While kept, the socket still takes queries (they wait for the next agent)...
    assert!(c.keeper_pid(1).is_some());
    wait_for(Duration::from_secs(10), "the keeper to exit", || {
        !std::path::Path::new(&format!("/proc/{keeper}")).exists()
    });
    // ...after the grace nothing listens there: the namespace is not kept alive
    // by a socket of ours.
    let refused = in_netns(&client, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("127.0.0.11:53").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = s.send(&netagent_dns::stub_query(1, "db", 1));
        let mut buf = [0u8; 512];
        matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .join()
    .unwrap();
    assert!(
        refused,
        "nothing listens at 127.0.0.11:53 once the keeper let go"
    );
    assert!(
        !c.keeper_socket(1).exists(),
        "the keeper removed its socket"
    );
}

#[test]
fn sockets_handed_over_under_another_namespace_s_name_are_refused() {
    root_test!();
    let (mut c, client, ip) = host_with_db(60);
    c.stop_agent(1);
    let keeper = c.keeper_pid(1).expect("a keeper");
    // SAFETY: kill takes no pointers; the keeper was started by this test's agent.
    unsafe { libc::kill(keeper as i32, libc::SIGKILL) };
    // A keeper that files a socket of another namespace (bound at 127.0.0.11:53
    // there) under the client's namespace: served, it would give that namespace
    // the client's names and leave the client without DNS.
    let decoy = c.bed.container("decoy");
    let (udp, tcp) = in_netns(&decoy, || {
        (
            std::net::UdpSocket::bind("127.0.0.11:53").unwrap(),
            std::net::TcpListener::bind("127.0.0.11:53").unwrap(),
        )
    })
    .join()
    .unwrap();
    let client_ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(format!("/run/netns/{client}")).unwrap(),
    );
    let socket = c.keeper_socket(1);
    wait_for(Duration::from_secs(5), "the killed keeper to go", || {
        !std::path::Path::new(&format!("/proc/{keeper}")).exists()
    });
    let listener = netagent_overlay::HandoverListener::bind(&socket).unwrap();
    let fake = std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let agent = listener.accept().unwrap();
        let (message, _) = agent.recv().unwrap().unwrap();
        assert_eq!(message, b"TAKE");
        agent
            .send(
                format!("HOLD dns:{client_ino}").as_bytes(),
                &[udp.as_fd(), tcp.as_fd()],
            )
            .unwrap();
        agent.send(b"END", &[]).unwrap();
        // Hold the connection (and the decoy sockets) while the agent runs.
        while let Ok(Some(_)) = agent.recv() {}
        (udp, tcp)
    });
    c.start_agent(1);
    assert!(
        c.log(1).contains("not usable"),
        "the agent names the refused sockets"
    );
    // The client has DNS from a socket of its own...
    wait_for(
        Duration::from_secs(5),
        "db to resolve in the client",
        || resolve(&client, "db") == vec![ip],
    );
    // ...and nobody answers the decoy namespace with the client's names.
    let answered = in_netns(&decoy, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("127.0.0.11:53").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.send(&netagent_dns::stub_query(7, "db", 1)).unwrap();
        let mut buf = [0u8; 512];
        s.recv(&mut buf).is_ok()
    })
    .join()
    .unwrap();
    assert!(
        !answered,
        "the decoy namespace got an answer from the agent"
    );
    c.stop_agent(1);
    drop(fake);
}

#[test]
fn sockets_the_agent_does_not_take_back_are_let_go_so_it_can_bind_its_own() {
    root_test!();
    let (mut c, client, ip) = host_with_db(60);
    let ino = |ns: &str| {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/run/netns/{ns}")).unwrap())
    };
    let db_ns = c
        .bed
        .namespaces()
        .iter()
        .find(|n| n.ends_with("cdb"))
        .unwrap()
        .clone();
    let (db_ino, client_ino) = (ino(&db_ns), ino(&client));
    c.stop_agent(1);
    // Take the real sockets from the keeper, then let it go.
    let socket = c.keeper_socket(1);
    let keeper = netagent_overlay::HandoverChannel::connect(&socket).unwrap();
    keeper.send(b"TAKE", &[]).unwrap();
    let mut held = std::collections::HashMap::new();
    loop {
        let (message, fds) = keeper.recv().unwrap().unwrap();
        let text = String::from_utf8(message).unwrap();
        match text.strip_prefix("HOLD dns:") {
            Some(ino) => {
                held.insert(ino.parse::<u64>().unwrap(), fds);
            }
            None => break,
        }
    }
    assert!(held.contains_key(&db_ino) && held.contains_key(&client_ino));
    keeper.send(b"QUIT", &[]).unwrap();
    wait_for(Duration::from_secs(5), "the keeper to quit", || {
        c.keeper_pid(1).is_none()
    });
    // A keeper that files each namespace's sockets under the other's name: both
    // are refused, and still hold 127.0.0.11:53 until the keeper forgets them.
    let listener = netagent_overlay::HandoverListener::bind(&socket).unwrap();
    let fake = std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let agent = listener.accept().unwrap();
        let (message, _) = agent.recv().unwrap().unwrap();
        assert_eq!(message, b"TAKE");
        let mut kept = std::collections::HashMap::new();
        for (filed_as, real) in [(db_ino, client_ino), (client_ino, db_ino)] {
            let fds = held.remove(&real).unwrap();
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            agent
                .send(format!("HOLD dns:{filed_as}").as_bytes(), &borrowed)
                .unwrap();
            kept.insert(filed_as, fds);
        }
        agent.send(b"END", &[]).unwrap();
        let mut forgotten = Vec::new();
        while let Ok(Some((message, _))) = agent.recv() {
            let text = String::from_utf8(message).unwrap();
            if let Some(ino) = text.strip_prefix("FORGET dns:") {
                let ino: u64 = ino.parse().unwrap();
                // Closed here, as the keeper does.
                kept.remove(&ino);
                forgotten.push(ino);
            }
        }
        forgotten
    });
    c.start_agent(1);
    wait_for(
        Duration::from_secs(5),
        "db to resolve in the client",
        || resolve(&client, "db") == vec![ip],
    );
    assert!(!resolve(&db_ns, "client").is_empty(), "db has DNS too");
    c.stop_agent(1);
    let mut forgotten = fake.join().unwrap();
    forgotten.sort();
    forgotten.dedup();
    let mut both = vec![db_ino, client_ino];
    both.sort();
    assert_eq!(forgotten, both, "the agent told the keeper to forget both");
}

#[test]
fn turning_keeping_off_lets_the_running_keeper_go() {
    root_test!();
    let (mut c, client, ip) = host_with_db(60);
    c.stop_agent(1);
    let keeper = c.keeper_pid(1).expect("a keeper");
    c.dns_extra = "keep_sockets_secs = 0\n".into();
    c.start_agent(1);
    wait_for(Duration::from_secs(5), "the keeper to exit", || {
        !std::path::Path::new(&format!("/proc/{keeper}")).exists()
    });
    // The agent binds its own sockets where the keeper's were.
    wait_for(
        Duration::from_secs(5),
        "db to resolve in the client",
        || resolve(&client, "db") == vec![ip],
    );
    assert!(c.log(1).contains("told the running keeper to let go"));
    assert!(c.keeper_pid(1).is_none(), "no keeper while keeping is off");
}
