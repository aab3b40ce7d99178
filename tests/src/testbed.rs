//! Topology builder and guard. See the crate docs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::run::{sh, sh_ok};

const PREFIX: &str = "ntb";
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Address of the outside namespace on the underlay (the hosts' default router).
pub const OUTSIDE_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// An address beyond the hosts, held by the outside namespace.
pub const OUTSIDE_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// One simulated host.
#[derive(Debug, Clone)]
pub struct TestHost {
    /// Short name: h1, h2, ...
    pub name: String,
    /// Its network namespace's name (`ip netns exec <netns> ...`).
    pub netns: String,
    /// Its underlay address (192.0.2.10 + index).
    pub underlay: Ipv4Addr,
}

impl TestHost {
    pub fn path(&self) -> PathBuf {
        netns_path(&self.netns)
    }
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

/// A topology owned by one test. Dropping it tears everything down.
pub struct Testbed {
    pub id: String,
    pub underlay_ns: String,
    pub outside_ns: String,
    pub hosts: Vec<TestHost>,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Testbed {
    /// Builds `n` hosts (at most 200) on one underlay bridge, plus the outside namespace.
    pub fn new(n: usize) -> Self {
        Self::with_prefix(
            &format!(
                "{PREFIX}{}x{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ),
            n,
        )
    }

    /// Like `new` with a chosen id (the demo uses a fixed one); the id must start with "ntb".
    pub fn with_prefix(id: &str, n: usize) -> Self {
        assert!(n <= 200, "at most 200 hosts");
        remove_stale();
        let mut bed = Testbed {
            id: id.to_string(),
            underlay_ns: format!("{id}u"),
            outside_ns: format!("{id}o"),
            hosts: Vec::new(),
            namespaces: Vec::new(),
            children: Vec::new(),
        };
        let u = bed.underlay_ns.clone();
        bed.add_netns(&u);
        sh_ok(&format!(
            "ip -n {u} link add br0 type bridge && ip -n {u} link set br0 up"
        ));
        let o = bed.outside_ns.clone();
        bed.add_netns(&o);
        sh_ok(&format!(
            "ip link add eth0 netns {o} type veth peer name out netns {u} && \
             ip -n {u} link set out master br0 up && \
             ip -n {o} addr add {OUTSIDE_ROUTER}/24 dev eth0 && ip -n {o} link set eth0 up && \
             ip -n {o} addr add {OUTSIDE_ADDRESS}/32 dev lo"
        ));
        for i in 1..=n {
            let name = format!("h{i}");
            let netns = format!("{id}h{i}");
            let underlay = Ipv4Addr::new(192, 0, 2, 10 + i as u8);
            bed.add_netns(&netns);
            sh_ok(&format!(
                "ip link add eth0 netns {netns} type veth peer name {name} netns {u} && \
                 ip -n {u} link set {name} master br0 up && \
                 ip -n {netns} addr add {underlay}/24 dev eth0 && ip -n {netns} link set eth0 up && \
                 ip -n {netns} route add default via {OUTSIDE_ROUTER}"
            ));
            bed.hosts.push(TestHost {
                name,
                netns,
                underlay,
            });
        }
        bed
    }

    fn add_netns(&mut self, name: &str) {
        sh_ok(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        self.namespaces.push(name.to_string());
    }

    /// A fresh "container" namespace, not connected to anything; returns its name.
    /// (Which host it belongs to is decided by the host that attaches it.)
    pub fn container(&mut self, label: &str) -> String {
        let name = format!("{}c{label}", self.id);
        self.add_netns(&name);
        name
    }

    /// Many container namespaces at once (one `ip -batch`), for scale tests.
    pub fn containers(&mut self, label: &str, count: usize) -> Vec<String> {
        let names: Vec<String> = (0..count)
            .map(|i| format!("{}c{label}{i}", self.id))
            .collect();
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        let file = std::env::temp_dir().join(format!("{}-{label}.batch", self.id));
        std::fs::write(&file, batch).unwrap();
        self.namespaces.extend(names.iter().cloned());
        sh_ok(&format!("ip -batch {}", file.display()));
        sh_ok(&format!(
            "for n in {}; do ip -n $n link set lo up; done",
            names.join(" ")
        ));
        let _ = std::fs::remove_file(&file);
        names
    }

    /// Runs a command inside a namespace (through `ip netns exec`) and returns its output.
    pub fn exec(&self, netns: &str, script: &str) -> std::process::Output {
        sh(&format!(
            "ip netns exec {netns} sh -c '{}'",
            script.replace('\'', "'\\''")
        ))
    }

    /// Like `exec`, but the command must succeed; returns stdout.
    pub fn exec_ok(&self, netns: &str, script: &str) -> String {
        sh_ok(&format!(
            "ip netns exec {netns} sh -c '{}'",
            script.replace('\'', "'\\''")
        ))
    }

    /// True when `netns` gets replies to `count` pings of `target` (1 s deadline each).
    pub fn ping(&self, netns: &str, target: Ipv4Addr) -> bool {
        self.exec(netns, &format!("ping -n -q -c 2 -i 0.2 -W 1 {target}"))
            .status
            .success()
    }

    /// Starts a long-running process inside a namespace; it is killed on teardown.
    pub fn spawn(&mut self, netns: &str, program: &str, args: &[&str]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {netns}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Like `spawn`, with stdout and stderr appended to `log` (long-lived chatty
    /// processes must not block on a full pipe nobody reads).
    pub fn spawn_logged(&mut self, netns: &str, program: &str, args: &[&str], log: &Path) -> u32 {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let child = Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {netns}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills a process started with `spawn` (SIGKILL) and reaps it; returns its output.
    pub fn kill(&mut self, pid: u32) -> String {
        let Some(pos) = self.children.iter().position(|c| c.id() == pid) else {
            return String::new();
        };
        let mut child = self.children.remove(pos);
        let _ = child.kill();
        let out = child.wait_with_output().expect("reap");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Takes a started process back from the guard (to wait for it yourself).
    pub fn take(&mut self, pid: u32) -> Option<Child> {
        let pos = self.children.iter().position(|c| c.id() == pid)?;
        Some(self.children.remove(pos))
    }

    /// Every namespace this bed made (for leak checks).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A snapshot of the kernel objects in a namespace that reconciliation manages.
    pub fn dump(&self, netns: &str) -> String {
        self.exec_ok(
            netns,
            "ip -d -o link show | sed -E -e 's/ link-netnsid [0-9]+//' -e 's/[a-z_]*timer +[0-9.]+//g' | sort; \
             ip -4 -o addr show | sort; ip route show | sort; ip neigh show nud permanent | sort; \
             bridge fdb show | grep -v -e \" master \" | sort; nft list ruleset",
        )
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            remove_netns(ns);
        }
    }
}

/// Kills what runs in a namespace and deletes it.
fn remove_netns(ns: &str) {
    let pids = sh(&format!("ip netns pids {ns} 2>/dev/null"));
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: kill takes no pointers; the pid is a process started in this test bed.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = sh(&format!("ip netns del {ns} 2>/dev/null"));
}

/// Removes namespaces left by test processes that no longer exist.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !pid.is_empty() && !alive {
            remove_netns(&name);
        }
    }
}

/// Runs `work` on a new thread that has entered namespace `netns` (sockets it opens
/// live there). Returns the thread's handle.
pub fn in_netns<T, F>(netns: &str, work: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(netns_path(netns))
        .unwrap_or_else(|e| panic!("open netns {netns}: {e}"));
    std::thread::spawn(move || {
        // SAFETY: the fd is an open namespace file owned by `file` for the whole call;
        // setns changes only this (dedicated) thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        work()
    })
}

/// Sends `bytes` of a known pattern over TCP from `client_ns` to a listener in
/// `server_ns` at `server_ip`, and returns what the server received and checked.
pub fn tcp_transfer(server_ns: &str, server_ip: Ipv4Addr, client_ns: &str, bytes: usize) -> usize {
    use std::io::{Read, Write};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_netns(server_ns, move || {
        let listener = std::net::TcpListener::bind((server_ip, 0)).expect("bind");
        ready_tx
            .send(listener.local_addr().unwrap().port())
            .unwrap();
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 65536];
        let mut total = 0usize;
        loop {
            let n = conn.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                assert_eq!(
                    *b,
                    ((total + i) % 251) as u8,
                    "corrupted byte at {}",
                    total + i
                );
            }
            total += n;
        }
        total
    });
    let port = ready_rx.recv().expect("server ready");
    let client = in_netns(client_ns, move || {
        let mut conn = std::net::TcpStream::connect_timeout(
            &(server_ip, port).into(),
            std::time::Duration::from_secs(5),
        )
        .expect("connect across the overlay");
        conn.set_write_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        conn.write_all(&data).expect("write");
    });
    client.join().expect("client");
    server.join().expect("server")
}
