//! systemd's notify protocol end to end: a real agent started with `NOTIFY_SOCKET`
//! and `WATCHDOG_USEC`, as a `Type=notify` unit with `WatchdogSec=` runs it, and
//! what it sends read from the socket systemd would listen on.

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use netagent_tests::cluster::Cluster;
use netagent_tests::root_test;

/// What arrives on the socket, read by a thread of its own: a datagram socket's
/// queue is short, and a full one would lose the agent's messages.
struct Received(Receiver<String>);

impl Received {
    fn new(socket: UnixDatagram) -> Self {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        Received(rx)
    }

    /// Every message that arrives within `limit`.
    fn during(&self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.0.recv_timeout(left) {
                Ok(m) => got.push(m),
                Err(_) => break,
            }
        }
        got
    }

    /// Messages up to and including the first that starts with `prefix`.
    fn until(&self, prefix: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(m) = self.0.recv_timeout(left) else {
                break;
            };
            let done = m.starts_with(prefix);
            got.push(m);
            if done {
                return got;
            }
        }
        panic!("no {prefix} within {limit:?}; got {got:?}");
    }
}

#[test]
fn the_agent_tells_systemd_its_state_and_pings_the_watchdog() {
    root_test!();
    let mut c = Cluster::new(1, 3);
    let path = c.dir.join("notify.sock");
    let received = Received::new(UnixDatagram::bind(&path).unwrap());
    c.agent_env[0] = vec![
        format!("NOTIFY_SOCKET={}", path.display()),
        "WATCHDOG_USEC=1000000".into(),
    ];

    // etcd down: the agent says what it waits for, and is not ready.
    c.stop_etcd();
    c.spawn_agent(1);
    let first = received.until("STATUS=starting", Duration::from_secs(20));
    assert!(
        first.last().unwrap().contains("waiting for etcd at"),
        "{first:?}"
    );
    let waiting = received.during(Duration::from_secs(3));
    assert!(
        !first.iter().chain(&waiting).any(|m| m == "READY=1"),
        "ready without its store: {first:?} {waiting:?}"
    );

    // etcd up: ready, then a status line about the running agent.
    c.start_etcd();
    received.until("READY=1", Duration::from_secs(30));
    let status = received.until("STATUS=", Duration::from_secs(10));
    let line = status.last().unwrap();
    assert!(line.starts_with("STATUS=ok: 0 peers"), "{status:?}");

    // The watchdog is pinged every half of WATCHDOG_USEC.
    let pings = received
        .during(Duration::from_secs(2))
        .into_iter()
        .filter(|m| m == "WATCHDOG=1")
        .count();
    assert!(pings >= 3, "{pings} watchdog pings in 2 s");

    // SIGTERM: stopping.
    c.stop_agent(1);
    let last = received.during(Duration::from_millis(500));
    assert!(
        last.iter().any(|m| m == "STOPPING=1"),
        "no STOPPING=1 on SIGTERM: {last:?}"
    );
}

/// What `netagent-plugin.socket` does at boot: systemd listens on the plugin socket
/// before any service starts and hands it to the agent (`LISTEN_FDS`), so a dockerd
/// that connects before the agent runs is answered once it does, with no socket file
/// of the agent's own. Here a small program plays systemd's part: it binds and
/// listens, then execs the agent with the socket as descriptor 3.
#[test]
fn the_agent_serves_the_plugin_socket_systemd_passes_it() {
    root_test!();
    let mut c = Cluster::new(1, 3);
    let socket = c.dir.join("plugins").join("netagent.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    // The engine is not needed to answer the handshake; the agent only says it is away.
    c.docker_sockets[0] = Some(c.dir.join("no-docker.sock"));
    c.plugin_sockets[0] = Some(socket.clone());
    let systemd = "import os, socket, sys\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
        s.bind(sys.argv[1]); s.listen(16)\n\
        os.dup2(s.fileno(), 3); os.set_inheritable(3, True)\n\
        os.environ['LISTEN_PID'] = str(os.getpid())\n\
        os.execv(sys.argv[2], sys.argv[2:])\n";
    c.agent_env[0] = vec![
        "LISTEN_FDS=1".into(),
        "LISTEN_FDNAMES=docker-plugin".into(),
        "python3".into(),
        "-c".into(),
        systemd.into(),
        socket.display().to_string(),
    ];
    // etcd down: the agent is still starting, and the plugin socket answers anyway.
    c.stop_etcd();
    c.spawn_agent(1);
    let activate = || {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "3", "-X", "POST", "--unix-socket"])
            .arg(&socket)
            .arg("http://plugin/Plugin.Activate")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    netagent_tests::cluster::wait_for(Duration::from_secs(20), "the plugin's handshake", || {
        activate().contains("\"NetworkDriver\"")
    });
    assert_eq!(
        activate(),
        r#"{"Implements":["NetworkDriver","IpamDriver"]}"#
    );
    let log = c.log(1);
    assert!(
        log.contains("Docker plugin socket passed by systemd"),
        "{log}"
    );
    // A driver call before the store is read: refused at once, saying why.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "3", "-X", "POST", "--unix-socket"])
        .arg(&socket)
        .args([
            "-d",
            r#"{"Pool":"100.80.0.0/16"}"#,
            "http://plugin/IpamDriver.RequestPool",
        ])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("netagent is starting"), "{reply}");
    // The socket stays systemd's: the agent's exit leaves it in place.
    c.kill_agent(1);
    assert!(socket.exists());
}
