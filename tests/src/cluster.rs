//! A cluster on the test bed: etcd in the underlay namespace (192.0.2.2:2379, on the
//! bridge every host hangs off) and a real `netagent agent` per host, each with its
//! own config, state directory and API socket under a temporary directory. etcd
//! serves TLS and wants a client certificate (`--client-cert-auth`), as in a real
//! cluster; [`Cluster::plaintext`] runs it over plain http instead.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::pki::Pki;
use crate::run::{netagent_bin, sh, sh_ok};
use crate::testbed::Testbed;

pub const ETCD_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// How the cluster's etcd is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtcdTransport {
    /// https, server certificate checked, client certificate required.
    MutualTls,
    /// http: the explicit plaintext choice.
    Plaintext,
}

pub struct Cluster {
    pub bed: Testbed,
    pub dir: PathBuf,
    pub lease_ttl: u64,
    etcd: Option<u32>,
    agents: Vec<Option<u32>>,
    /// Extra lines for every agent's `[dns]` table.
    pub dns_extra: String,
    /// No etcd: agents use the embedded local store.
    local_store: bool,
    /// Per host: the Docker engine its agent follows (None: integration off).
    pub docker_sockets: Vec<Option<PathBuf>>,
    /// Per host: where its agent serves Docker's network and IPAM plugin API
    /// (`[docker] plugin_socket`; None: not served, `plugin_socket = ""`).
    pub plugin_sockets: Vec<Option<PathBuf>>,
    /// Per host: lines for its agent's `[mesh]` table.
    pub mesh_config: Vec<String>,
    /// etcd's CA and certificates (None: plaintext etcd or the local store).
    pub pki: Option<Pki>,
    /// Per host: the `[store]` keys after `etcd = [...]` and `lease_ttl_secs`, in place
    /// of the cluster's own credentials (None: the cluster's).
    pub store_keys: Vec<Option<String>>,
    /// Per host: whole tables (`[http]`, ...) appended to its agent's config.
    pub extra_tables: Vec<String>,
    /// Per host: `NAME=value` pairs added to its agent's environment.
    pub agent_env: Vec<Vec<String>>,
}

impl Cluster {
    /// `hosts` hosts with etcd over mutual TLS, agents not started yet.
    pub fn new(hosts: usize, lease_ttl: u64) -> Self {
        Cluster::with_etcd(hosts, lease_ttl, EtcdTransport::MutualTls)
    }

    /// `hosts` hosts with etcd over plain http, agents not started yet.
    pub fn plaintext(hosts: usize, lease_ttl: u64) -> Self {
        Cluster::with_etcd(hosts, lease_ttl, EtcdTransport::Plaintext)
    }

    pub fn with_etcd(hosts: usize, lease_ttl: u64, transport: EtcdTransport) -> Self {
        let bed = Testbed::new(hosts);
        let dir = std::env::temp_dir().join(format!("{}-cluster", bed.id));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        sh_ok(&format!(
            "ip -n {u} addr add {ETCD_ADDRESS}/24 dev br0",
            u = bed.underlay_ns
        ));
        let mut c = Cluster {
            bed,
            dir,
            lease_ttl,
            etcd: None,
            agents: vec![None; hosts],
            dns_extra: String::new(),
            local_store: false,
            docker_sockets: vec![None; hosts],
            plugin_sockets: vec![None; hosts],
            mesh_config: vec![String::new(); hosts],
            pki: None,
            store_keys: vec![None; hosts],
            extra_tables: vec![String::new(); hosts],
            agent_env: vec![Vec::new(); hosts],
        };
        if transport == EtcdTransport::MutualTls {
            c.pki = Some(Pki::generate(
                &c.dir.join("pki"),
                "netagent-test-ca",
                ETCD_ADDRESS,
            ));
        }
        c.start_etcd();
        c
    }

    /// One host whose agent uses the embedded local store (no etcd).
    pub fn local() -> Self {
        let bed = Testbed::new(1);
        let dir = std::env::temp_dir().join(format!("{}-cluster", bed.id));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Cluster {
            bed,
            dir,
            lease_ttl: 0,
            etcd: None,
            agents: vec![None],
            dns_extra: String::new(),
            local_store: true,
            docker_sockets: vec![None],
            plugin_sockets: vec![None],
            mesh_config: vec![String::new()],
            pki: None,
            store_keys: vec![None],
            extra_tables: vec![String::new()],
            agent_env: vec![Vec::new()],
        }
    }

    /// `hosts` running agents with the encrypted network "secure", container s1 on
    /// host 1 and s2 on host 2 in it, and the mesh between them up: the cluster, s1,
    /// s2 and s2's address.
    pub fn encrypted_pair(hosts: usize) -> (Self, String, String, Ipv4Addr) {
        Cluster::encrypted_pair_of(Cluster::new(hosts, 3))
    }

    /// [`Cluster::encrypted_pair`] of a cluster configured beforehand (its agents
    /// not started yet).
    pub fn encrypted_pair_of(mut c: Cluster) -> (Self, String, String, Ipv4Addr) {
        for host in 1..=c.agents.len() {
            c.start_agent(host);
        }
        c.create_encrypted_network("secure", "100.66.0.0/16");
        let s1 = c.bed.container("s1");
        let s2 = c.bed.container("s2");
        c.attach(1, &s1, "secure", &[]);
        let ip_s2 = c.attach(2, &s2, "secure", &[]);
        wait_for(Duration::from_secs(10), "the mesh", || {
            c.bed.ping(&s1, ip_s2)
        });
        (c, s1, s2, ip_s2)
    }

    /// A cluster with every agent running.
    pub fn running(hosts: usize, lease_ttl: u64) -> Self {
        let mut c = Cluster::new(hosts, lease_ttl);
        for i in 1..=hosts {
            c.start_agent(i);
        }
        c
    }

    /// `https://192.0.2.2:2379`, or `http://` for a plaintext cluster.
    pub fn etcd_endpoint(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{ETCD_ADDRESS}:2379")
    }

    /// Runs `etcdctl ARGS` in the underlay namespace with the cluster's client
    /// certificate (where etcd wants one).
    pub fn etcdctl(&self, args: &str) -> Output {
        let tls = self
            .pki
            .as_ref()
            .map(Pki::etcdctl_flags)
            .unwrap_or_default();
        sh(&format!(
            "ip netns exec {} etcdctl --endpoints {} --dial-timeout 1s --command-timeout 3s {tls} {args}",
            self.bed.underlay_ns,
            self.etcd_endpoint()
        ))
    }

    pub fn start_etcd(&mut self) {
        let data = self.dir.join("etcd");
        let client = self.etcd_endpoint();
        let u = self.bed.underlay_ns.clone();
        let tls: Vec<String> = match &self.pki {
            Some(p) => vec![
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                p.ca.display().to_string(),
                "--cert-file".into(),
                p.server_cert.display().to_string(),
                "--key-file".into(),
                p.server_key.display().to_string(),
            ],
            None => Vec::new(),
        };
        let mut args = vec![
            "--name",
            "t",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "t=http://127.0.0.1:2380",
            "--log-level",
            "error",
            // Request counts for the scale benchmark, on the underlay namespace's loopback.
            "--listen-metrics-urls",
            "http://127.0.0.1:2381",
        ];
        args.extend(tls.iter().map(String::as_str));
        let pid = self.bed.spawn(&u, "etcd", &args);
        self.etcd = Some(pid);
        wait_for(Duration::from_secs(20), "etcd to answer", || {
            self.etcdctl("endpoint health").status.success()
        });
    }

    /// etcd's own metrics (Prometheus text), from its loopback metrics listener.
    pub fn etcd_metrics(&self) -> String {
        let out = sh(&format!(
            "ip netns exec {} curl -sf --max-time 3 http://127.0.0.1:2381/metrics",
            self.bed.underlay_ns
        ));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops etcd (SIGKILL); its data stays for `start_etcd`.
    pub fn stop_etcd(&mut self) {
        if let Some(pid) = self.etcd.take() {
            self.bed.kill(pid);
        }
    }

    pub fn config_path(&self, host: usize) -> PathBuf {
        self.dir.join(format!("h{host}.toml"))
    }

    pub fn log_path(&self, host: usize) -> PathBuf {
        self.dir.join(format!("h{host}.log"))
    }

    /// Host `host`'s agent log so far (every start appends).
    pub fn log(&self, host: usize) -> String {
        std::fs::read_to_string(self.log_path(host)).unwrap_or_default()
    }

    pub fn socket(&self, host: usize) -> PathBuf {
        self.dir.join(format!("h{host}.sock"))
    }

    fn write_config(&self, host: usize) {
        let h = &self.bed.hosts[host - 1];
        let store = if self.local_store {
            String::new()
        } else {
            let keys = match &self.store_keys[host - 1] {
                Some(k) => k.clone(),
                None => self.pki.as_ref().map(Pki::store_keys).unwrap_or_default(),
            };
            format!(
                "[store]\netcd = [\"{}\"]\nlease_ttl_secs = {}\n{keys}",
                self.etcd_endpoint(),
                self.lease_ttl
            )
        };
        let mut docker = match &self.docker_sockets[host - 1] {
            Some(socket) => format!("socket = \"{}\"", socket.display()),
            None => "enabled = false".into(),
        };
        // Off unless asked for: the default socket is in the machine's one plugin directory.
        match (
            &self.docker_sockets[host - 1],
            &self.plugin_sockets[host - 1],
        ) {
            (_, Some(plugin)) => {
                docker.push_str(&format!("\nplugin_socket = \"{}\"", plugin.display()))
            }
            (Some(_), None) => docker.push_str("\nplugin_socket = \"\""),
            (None, None) => {}
        }
        let mesh = &self.mesh_config[host - 1];
        // Each host's own UAPI socket: the default path is one per machine.
        let uapi = if mesh.contains("uapi_socket") {
            String::new()
        } else {
            format!("uapi_socket = \"{}\"\n", self.uapi_socket(host).display())
        };
        let text = format!(
            "node = \"host{host}\"\nunderlay_address = \"{}\"\nstate_dir = \"{}\"\napi_socket = \"{}\"\n{store}[docker]\n{docker}\n[mesh]\n{uapi}{mesh}\n[dns]\n{}\n{}",
            h.underlay,
            self.dir.join(format!("h{host}-state")).display(),
            self.socket(host).display(),
            self.dns_extra,
            self.extra_tables[host - 1],
        );
        std::fs::write(self.config_path(host), text).unwrap();
    }

    /// Starts host `host`'s agent (1-based) and waits until its API answers.
    pub fn start_agent(&mut self, host: usize) {
        self.spawn_agent(host);
        let socket = self.socket(host);
        wait_for(Duration::from_secs(20), "the agent's API", || {
            run_cli(&socket, &["status"]).status.success()
        });
    }

    /// Starts host `host`'s agent without waiting for it.
    pub fn spawn_agent(&mut self, host: usize) {
        self.spawn_agent_from(host, &netagent_bin());
    }

    /// Starts host `host`'s agent from the program at `bin` (another build, as an
    /// upgrade installs it) without waiting for it.
    pub fn spawn_agent_from(&mut self, host: usize, bin: &std::path::Path) {
        self.write_config(host);
        let ns = self.bed.hosts[host - 1].netns.clone();
        let config = self.config_path(host);
        let log = self.log_path(host);
        // env(1) execs the agent: the pid stays the agent's.
        let mut args: Vec<&str> = self.agent_env[host - 1]
            .iter()
            .map(String::as_str)
            .collect();
        args.extend([
            bin.to_str().unwrap(),
            "agent",
            "--config",
            config.to_str().unwrap(),
        ]);
        let pid = self.bed.spawn_logged(&ns, "env", &args, &log);
        self.agents[host - 1] = Some(pid);
    }

    /// Where host `host`'s agent answers WireGuard's UAPI (`wg show`).
    pub fn uapi_socket(&self, host: usize) -> PathBuf {
        self.dir.join(format!("h{host}-uapi.sock"))
    }

    /// Where host `host`'s agent keeps its DNS sockets across restarts.
    pub fn keeper_socket(&self, host: usize) -> PathBuf {
        self.dir.join(format!("h{host}-dns-keeper.sock"))
    }

    /// The process id of host `host`'s DNS socket keeper, while it runs.
    pub fn keeper_pid(&self, host: usize) -> Option<u32> {
        let mut pid_file = self.keeper_socket(host).into_os_string();
        pid_file.push(".pid");
        let pid: u32 = std::fs::read_to_string(pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        std::path::Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(pid)
    }

    /// The process id of host `host`'s running agent.
    pub fn agent_pid(&self, host: usize) -> Option<u32> {
        self.agents[host - 1]
    }

    /// SIGKILL, no clean-up (a crash or a dead host).
    pub fn kill_agent(&mut self, host: usize) {
        if let Some(pid) = self.agents[host - 1].take() {
            self.bed.kill(pid);
        }
    }

    /// SIGTERM and wait: a clean stop (systemctl stop).
    pub fn stop_agent(&mut self, host: usize) -> String {
        let Some(pid) = self.agents[host - 1].take() else {
            return String::new();
        };
        // SAFETY: kill takes no pointers; the pid is a child this test bed started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let mut child = self.bed.take(pid).expect("agent process");
        child.wait().expect("agent exits");
        self.log(host)
    }

    /// Cuts host `host` off the underlay (peers and etcd), or restores it.
    pub fn set_underlay(&self, host: usize, up: bool) {
        sh_ok(&format!(
            "ip -n {} link set h{host} {}",
            self.bed.underlay_ns,
            if up { "up" } else { "down" }
        ));
    }

    pub fn cli(&self, host: usize, args: &[&str]) -> Output {
        run_cli(&self.socket(host), args)
    }

    /// Runs a CLI command against host `host`'s agent; it must succeed.
    pub fn cli_ok(&self, host: usize, args: &[&str]) -> String {
        let out = self.cli(host, args);
        assert!(
            out.status.success(),
            "netagent {args:?} on host{host} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates a network (through host 1's agent).
    /// The VNI `netagent network inspect` reports for a network.
    pub fn vni(&self, network: &str) -> u32 {
        let out = self.cli_ok(1, &["network", "inspect", network, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["vni"].as_u64().unwrap() as u32
    }

    pub fn create_network(&self, name: &str, subnet: &str) {
        self.cli_ok(1, &["network", "create", name, "--subnet", subnet]);
    }

    /// Creates an encrypted network (through host 1's agent).
    pub fn create_encrypted_network(&self, name: &str, subnet: &str) {
        self.cli_ok(
            1,
            &["network", "create", name, "--subnet", subnet, "--encrypted"],
        );
    }

    /// Attaches a container namespace on `host`; returns its address.
    pub fn attach(&self, host: usize, netns: &str, network: &str, extra: &[&str]) -> Ipv4Addr {
        let path = format!("/run/netns/{netns}");
        let mut args = vec!["attach", path.as_str(), network, "--json"];
        args.extend_from_slice(extra);
        let out = self.cli_ok(host, &args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["address"].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed test shows what the agents said.
        if std::thread::panicking() {
            for host in 1..=self.agents.len() {
                let log = self.log(host);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- host{host} agent log (last {} lines) ---", tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        // The bed kills agents and etcd; the files go here.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run_cli(socket: &std::path::Path, args: &[&str]) -> Output {
    std::process::Command::new(netagent_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run netagent")
}

/// The A records `name` resolves to from inside `netns`, through the embedded DNS
/// at 127.0.0.11, in the order given.
pub fn resolve(netns: &str, name: &str) -> Vec<Ipv4Addr> {
    let out = sh(&format!(
        "ip netns exec {netns} dig +short +tries=1 +time=1 @127.0.0.11 {name} A"
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Polls `done` every 20 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if done() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
