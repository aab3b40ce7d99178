//! The agent's logic over a fake kernel and an in-process store: attach, detach,
//! dead nodes, partitions and adoption in milliseconds, without root. The end-to-end
//! tests (tests/) run the same scenarios on the real kernel and etcd.

mod adoption;
mod attach;
mod cluster;
mod desired_state;
mod dns;
mod docker_driver;
mod mesh;
mod networks;
mod nodes;
mod partition;
mod view;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use super::fake::FakeDatapath;
use super::Agent;
use crate::api::{AttachRequest, EndpointInfo, NetworkInfo, PeerInfo};
use crate::config::Config;
use crate::ipam::NewNetwork;
use crate::model;
use crate::store::{self, Loaded, LocalStore, Store, StoreError, StoreEvent, StoreHealth, Txn};

/// A store every test host shares: the embedded one, in a temporary directory, with
/// a switch that cuts this process off from it (a partition).
#[derive(Clone)]
pub struct TestStore {
    inner: Arc<LocalStore>,
    down: Arc<AtomicBool>,
    /// Wakes the watches when the store comes back, to send a fresh picture.
    back: Arc<Notify>,
    health: Arc<watch::Sender<StoreHealth>>,
    /// Every transaction that took effect through the `Store` trait, in order.
    committed: Arc<Mutex<Vec<Txn>>>,
}

impl TestStore {
    pub async fn open(dir: &std::path::Path) -> Self {
        let inner = LocalStore::open(&dir.join("store.json"))
            .await
            .expect("store opens");
        let health = inner.health().borrow().clone();
        TestStore {
            inner: Arc::new(inner),
            down: Arc::new(AtomicBool::new(false)),
            back: Arc::new(Notify::new()),
            health: Arc::new(watch::channel(health).0),
            committed: Arc::default(),
        }
    }

    /// Cuts the agents off from the store (or reconnects them).
    pub fn set_reachable(&self, reachable: bool) {
        self.down.store(!reachable, Ordering::SeqCst);
        self.health.send_modify(|h| {
            h.connected = reachable;
            h.error = (!reachable).then(|| "partitioned by the test".into());
        });
        if reachable {
            self.back.notify_waiters();
        }
    }

    fn unreachable(&self) -> StoreError {
        StoreError::Unreachable {
            endpoint: "test".into(),
            reason: "partitioned by the test".into(),
        }
    }

    /// Writes as another host (or an operator) would, bypassing every agent.
    pub async fn write(&self, txn: Txn) {
        assert!(self.inner.txn(txn).await.expect("store writes").is_some());
    }

    /// The agents' transactions that took effect so far, in order.
    pub fn committed(&self) -> Vec<Txn> {
        self.committed.lock().unwrap().clone()
    }

    /// Every key and value, as a watch's fresh picture has them.
    pub async fn snapshot(&self) -> Loaded {
        self.inner.load().await.expect("store reads")
    }

    pub async fn keys(&self) -> Vec<String> {
        let loaded = self.inner.load().await.expect("store reads");
        loaded.pairs.into_iter().map(|(k, _)| k).collect()
    }

    /// The record at `key`, as another host would read it (even while partitioned).
    pub async fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        let loaded = self.inner.load().await.expect("store reads");
        let (_, value) = loaded.pairs.into_iter().find(|(k, _)| k == key)?;
        Some(serde_json::from_slice(&value).expect("a readable record"))
    }

    /// Puts `record` at `key` as another host would.
    pub async fn put<T: serde::Serialize>(&self, key: &str, record: &T) {
        self.write(Txn::default().put(key, model::encode(record)))
            .await
    }
}

impl Store for TestStore {
    async fn load(&self) -> store::Result<Loaded> {
        if self.down.load(Ordering::SeqCst) {
            return Err(self.unreachable());
        }
        self.inner.load().await
    }

    async fn txn(&self, txn: Txn) -> store::Result<Option<i64>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(self.unreachable());
        }
        let done = self.inner.txn(txn.clone()).await?;
        if done.is_some() {
            self.committed.lock().unwrap().push(txn);
        }
        Ok(done)
    }

    /// Like etcd's: nothing arrives while partitioned, and every reconnection
    /// begins with a fresh picture.
    fn watch(&self) -> mpsc::Receiver<StoreEvent> {
        let mut inner = self.inner.watch();
        let (tx, rx) = mpsc::channel(64);
        let store = self.clone();
        tokio::spawn(async move {
            let mut missed = false;
            loop {
                let event = tokio::select! {
                    e = inner.recv() => match e {
                        Some(e) => Some(e),
                        None => return,
                    },
                    _ = store.back.notified() => None,
                };
                let down = store.down.load(Ordering::SeqCst);
                let send = match event {
                    _ if down => {
                        missed = true;
                        continue;
                    }
                    Some(e) if !missed => e,
                    // The store is back (a reconnection), or changes were missed.
                    _ => {
                        missed = false;
                        match store.inner.load().await {
                            Ok(loaded) => StoreEvent::Reset(loaded),
                            Err(_) => continue,
                        }
                    }
                };
                if tx.send(send).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    fn register(&self, key: String, value: Vec<u8>, ttl: Duration) {
        self.inner.register(key, value, ttl)
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.health.subscribe()
    }
}

static NEXT_BED: AtomicUsize = AtomicUsize::new(0);

/// A cluster of agents over one store, each host with its own fake kernel.
pub struct Bed {
    pub store: TestStore,
    dir: PathBuf,
}

pub type TestAgent = Arc<Agent<TestStore, FakeDatapath>>;

/// One host of the bed.
pub struct Host {
    pub name: String,
    pub agent: TestAgent,
    pub kernel: FakeDatapath,
    pub underlay: Ipv4Addr,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    pub async fn new() -> Bed {
        let dir = std::env::temp_dir().join(format!(
            "netagent-unit-{}-{}",
            std::process::id(),
            NEXT_BED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Bed {
            store: TestStore::open(&dir).await,
            dir,
        }
    }

    pub fn config(&self, name: &str) -> Config {
        Config::parse(&format!(
            "node = {name:?}\nstate_dir = {:?}\n[dns]\nupstream = [\"127.0.0.1:9\"]\nkeep_sockets_secs = 0\nkeeper_socket = {:?}\n[docker]\nenabled = false\n",
            self.dir.join(name).display().to_string(),
            // Never a system path: a keeper found there would be told to let go.
            self.dir.join(format!("{name}-keeper.sock")).display().to_string()
        ))
        .expect("test config parses")
    }

    /// Starts host `name` (underlay 192.0.2.N) on a new fake kernel.
    pub async fn host(&self, name: &str, n: u8) -> Host {
        self.host_on(name, n, FakeDatapath::default()).await
    }

    /// Starts host `name` on `kernel` (the one an earlier agent of it left behind).
    pub async fn host_on(&self, name: &str, n: u8, kernel: FakeDatapath) -> Host {
        self.host_with(name, n, kernel, |_| {}).await
    }

    /// Starts host `name` on `kernel` with the config `edit` finishes.
    pub async fn host_with(
        &self,
        name: &str,
        n: u8,
        kernel: FakeDatapath,
        edit: impl FnOnce(&mut Config),
    ) -> Host {
        let underlay = Ipv4Addr::new(192, 0, 2, n);
        let mut cfg = self.config(name);
        edit(&mut cfg);
        let agent = Agent::start_with(cfg, self.store.clone(), kernel.clone(), underlay)
            .await
            .expect("agent starts");
        Host {
            name: name.into(),
            agent,
            kernel,
            underlay,
        }
    }

    /// A host's lease ran out (the host died): its node record goes.
    pub async fn expire(&self, node: &str) {
        self.store
            .write(Txn::default().delete(model::node_key(node)))
            .await;
    }

    /// A host's lease is back (it came back up): its node record returns.
    pub async fn revive(&self, name: &str, underlay: Ipv4Addr) {
        let node = model::NodeRecord {
            name: name.to_owned(),
            underlay,
            version: env!("CARGO_PKG_VERSION").into(),
            started: 0,
        };
        self.store.put(&model::node_key(name), &node).await;
    }
}

impl Host {
    pub async fn create_network(&self, name: &str, subnet: &str) -> NetworkInfo {
        self.agent
            .create_network(&new_network(name, subnet))
            .await
            .expect("network created")
    }

    /// Makes a namespace `/run/netns/NAME` on this host and attaches it.
    pub async fn attach(&self, ns: &str, network: &str, service: Option<&str>) -> EndpointInfo {
        self.try_attach(ns, network, service)
            .await
            .unwrap_or_else(|e| panic!("attach {ns} to {network}: {e:#}"))
    }

    pub async fn try_attach(
        &self,
        ns: &str,
        network: &str,
        service: Option<&str>,
    ) -> anyhow::Result<EndpointInfo> {
        self.try_attach_with(ns, network, service, |_| {}).await
    }

    /// Attaches namespace `/run/netns/NS` with a request `edit` finishes (names,
    /// ports, DNS servers...).
    pub async fn attach_with(
        &self,
        ns: &str,
        network: &str,
        service: Option<&str>,
        edit: impl FnOnce(&mut AttachRequest),
    ) -> EndpointInfo {
        self.try_attach_with(ns, network, service, edit)
            .await
            .unwrap_or_else(|e| panic!("attach {ns} to {network}: {e:#}"))
    }

    pub async fn try_attach_with(
        &self,
        ns: &str,
        network: &str,
        service: Option<&str>,
        edit: impl FnOnce(&mut AttachRequest),
    ) -> anyhow::Result<EndpointInfo> {
        let path = format!("/run/netns/{ns}");
        if self.kernel.identity_of(&path).is_none() {
            self.kernel.add_namespace(&path);
        }
        let mut req = attach_request(&path, network, service);
        edit(&mut req);
        self.agent.attach(req).await
    }

    /// Stops the agent as a crash would: the kernel keeps its state.
    pub async fn crash(self) -> FakeDatapath {
        self.agent.stop().await;
        self.kernel
    }

    /// Where the DNS listener inside namespace `/run/netns/NS` answers, waiting (up
    /// to 5 s) until it has one.
    pub async fn listener(&self, ns: &str) -> SocketAddr {
        let ino = self
            .kernel
            .identity_of(&format!("/run/netns/{ns}"))
            .unwrap_or_else(|| panic!("no namespace {ns}"));
        for _ in 0..500 {
            if let Some((_, Some(addr))) = self.agent.listeners.scopes().await.get(&ino) {
                return *addr;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no DNS listener in namespace {ns}");
    }

    /// The networks the DNS listener inside namespace `/run/netns/NS` answers for
    /// (None: it has no listener).
    pub async fn listener_scope(&self, ns: &str) -> Option<Vec<String>> {
        let ino = self.kernel.identity_of(&format!("/run/netns/{ns}"))?;
        let scopes = self.agent.listeners.scopes().await;
        scopes.get(&ino).map(|(scope, _)| scope.clone())
    }

    /// Waits (up to 5 s) until namespace `/run/netns/NS` has no DNS listener.
    pub async fn listener_closed(&self, ns: &str) {
        for _ in 0..500 {
            if self.listener_scope(ns).await.is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the DNS listener in namespace {ns} stayed open");
    }

    /// Another host as this one's `peers` shows it.
    pub fn peer(&self, name: &str) -> Option<PeerInfo> {
        self.agent.peers().into_iter().find(|p| p.name == name)
    }

    /// The addresses a DNS query for `name` on `network` answers now, in order.
    pub fn resolve(&self, network: &str, name: &str) -> Vec<Ipv4Addr> {
        let snapshot = self.agent.dns.snapshot();
        let mut out = Vec::new();
        if let Some(set) = snapshot.lookup(network, name.as_bytes()) {
            set.rotated(&mut out);
        }
        out
    }
}

pub fn new_network(name: &str, subnet: &str) -> NewNetwork {
    serde_json::from_value(serde_json::json!({ "name": name, "subnet": subnet }))
        .expect("a network request")
}

pub fn new_encrypted_network(name: &str, subnet: &str) -> NewNetwork {
    NewNetwork {
        encrypted: true,
        ..new_network(name, subnet)
    }
}

pub fn attach_request(target: &str, network: &str, service: Option<&str>) -> AttachRequest {
    AttachRequest {
        target: target.into(),
        network: network.into(),
        name: None,
        service: service.map(str::to_owned),
        aliases: Vec::new(),
        one_per_answer: false,
        ports: Vec::new(),
        dns: Vec::new(),
    }
}

/// Waits (up to 5 s, checking every 10 ms) until `check` holds.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn sorted(mut v: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    v.sort();
    v
}

/// Sends one query to a listener and returns its answer.
async fn exchange(server: SocketAddr, name: &str, qtype: u16) -> Vec<u8> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let query = netagent_dns::stub_query(0x1234, name, qtype);
    socket.send_to(&query, server).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .expect("an answer within 2 s")
        .unwrap();
    buf[..n].to_vec()
}

/// Where each answer record of type `qtype` has its data, and how long it is.
fn answer_data(r: &[u8], qtype: u16) -> Vec<(usize, usize)> {
    let count = u16::from_be_bytes([r[6], r[7]]) as usize;
    let (_, mut at) = read_name(r, 12);
    at += 4;
    let mut out = Vec::new();
    for _ in 0..count {
        let (_, next) = read_name(r, at);
        let kind = u16::from_be_bytes([r[next], r[next + 1]]);
        let len = u16::from_be_bytes([r[next + 8], r[next + 9]]) as usize;
        if kind == qtype {
            out.push((next + 10, len));
        }
        at = next + 10 + len;
    }
    out
}

/// Sends one PTR query for `address` to a listener and returns the names answered.
pub async fn query_ptr(server: SocketAddr, address: Ipv4Addr) -> Vec<String> {
    let [a, b, c, d] = address.octets();
    let r = exchange(server, &format!("{d}.{c}.{b}.{a}.in-addr.arpa"), 12).await;
    answer_data(&r, 12)
        .into_iter()
        .map(|(at, _)| read_name(&r, at).0)
        .collect()
}

/// Sends one A query to a listener and returns the addresses answered.
pub async fn query_a(server: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
    let r = exchange(server, name, 1).await;
    answer_data(&r, 1)
        .into_iter()
        .filter(|(_, len)| *len == 4)
        .map(|(at, _)| Ipv4Addr::new(r[at], r[at + 1], r[at + 2], r[at + 3]))
        .collect()
}

/// Sends one SRV query to a listener and returns (priority, weight, port, target)
/// of each answer, in answer order, and the addresses of the additional section.
pub async fn query_srv(server: SocketAddr, name: &str) -> (Vec<(u16, u16, u16, String)>, usize) {
    let r = exchange(server, name, 33).await;
    let srv = answer_data(&r, 33)
        .into_iter()
        .map(|(at, _)| {
            let field = |i: usize| u16::from_be_bytes([r[at + i], r[at + i + 1]]);
            (field(0), field(2), field(4), read_name(&r, at + 6).0)
        })
        .collect();
    (srv, u16::from_be_bytes([r[10], r[11]]) as usize)
}

/// A name at `at` in message `r` (following compression pointers), and where what
/// follows it starts.
fn read_name(r: &[u8], mut at: usize) -> (String, usize) {
    let mut labels = Vec::new();
    let mut end = None;
    loop {
        let len = r[at] as usize;
        if len & 0xc0 == 0xc0 {
            end.get_or_insert(at + 2);
            at = ((len & 0x3f) << 8) | r[at + 1] as usize;
        } else if len == 0 {
            let end = end.unwrap_or(at + 1);
            return (format!("{}.", labels.join(".")), end);
        } else {
            labels.push(String::from_utf8_lossy(&r[at + 1..at + 1 + len]).into_owned());
            at += 1 + len;
        }
    }
}
