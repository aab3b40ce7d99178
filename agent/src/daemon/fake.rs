//! A datapath that records what the agent asks of the kernel and keeps a model of
//! it, for tests without root. Namespaces are made up by the test (a path and an
//! identity); DNS listeners are real sockets on loopback, so tests can query them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netagent_overlay::{
    ApplyReport, DockerForward, Endpoint, Error, HostState, KeyPair, MeshOptions, MeshPeer,
    NetnsRef, NetworkSpec, OnFailure, PeerStats, Result,
};

use super::datapath::{Datapath, MeshDatapath};

/// One thing the agent asked of the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Apply { networks: Vec<String> },
    Attach { network: String, address: Ipv4Addr },
    Detach { address: Ipv4Addr },
    StartMesh { address: Ipv4Addr },
    OpenDockerForward,
    DivertDockerDns(String),
}

#[derive(Default)]
struct Model {
    calls: Vec<Call>,
    /// The kernel's endpoints: address → (network, namespace identity).
    endpoints: BTreeMap<Ipv4Addr, (String, u64)>,
    /// The networks with a device.
    networks: BTreeSet<String>,
    /// The last state applied.
    applied: Option<HostState>,
    /// Namespaces that exist, by how they are named.
    namespaces: HashMap<String, u64>,
}

#[derive(Clone, Default)]
pub struct FakeDatapath {
    model: Arc<Mutex<Model>>,
    next_identity: Arc<AtomicU64>,
    /// Attaches fail (a kernel refusing, say) while set.
    pub fail_attach: Arc<AtomicBool>,
    /// Mesh starts fail while set.
    pub fail_mesh: Arc<AtomicBool>,
    /// Applies fail (a netlink error, say) while set, changing nothing.
    pub fail_apply: Arc<AtomicBool>,
    mesh: Arc<Mutex<Option<Arc<FakeMesh>>>>,
    /// Woken when a namespace goes, as the kernel's watch is.
    namespace_gone: Arc<tokio::sync::Notify>,
}

impl FakeDatapath {
    /// A namespace at `path` (as `/run/netns/NAME` would be), with a fresh identity.
    pub fn add_namespace(&self, path: &str) -> u64 {
        let ino = 4_026_532_000 + self.next_identity.fetch_add(1, Ordering::Relaxed);
        self.model
            .lock()
            .unwrap()
            .namespaces
            .insert(path.to_owned(), ino);
        ino
    }

    /// A namespace at `path` with the given identity (the host's own is 1).
    pub fn add_namespace_with(&self, path: &str, ino: u64) {
        self.model
            .lock()
            .unwrap()
            .namespaces
            .insert(path.to_owned(), ino);
    }

    pub fn identity_of(&self, path: &str) -> Option<u64> {
        self.model.lock().unwrap().namespaces.get(path).copied()
    }

    /// The namespace at `path` goes away (its container died, `ip netns del`).
    pub fn remove_namespace(&self, path: &str) {
        self.model.lock().unwrap().namespaces.remove(path);
        self.namespace_gone.notify_one();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.model.lock().unwrap().calls.clone()
    }

    /// The kernel's endpoints: address → network.
    pub fn endpoints(&self) -> BTreeMap<Ipv4Addr, String> {
        let m = self.model.lock().unwrap();
        m.endpoints
            .iter()
            .map(|(a, (n, _))| (*a, n.clone()))
            .collect()
    }

    pub fn networks(&self) -> BTreeSet<String> {
        self.model.lock().unwrap().networks.clone()
    }

    pub fn applied(&self) -> Option<HostState> {
        self.model.lock().unwrap().applied.clone()
    }

    pub fn mesh(&self) -> Option<Arc<FakeMesh>> {
        self.mesh.lock().unwrap().clone()
    }

    fn record(&self, call: Call) {
        self.model.lock().unwrap().calls.push(call);
    }
}

impl Datapath for FakeDatapath {
    async fn apply(&self, state: &HostState) -> Result<ApplyReport> {
        // The real apply refuses a state that does not hold together, before any change.
        state.validate()?;
        if self.fail_apply.load(Ordering::Relaxed) {
            return Err(Error::Worker("apply refused by the fake kernel".into()));
        }
        let mut m = self.model.lock().unwrap();
        m.calls.push(Call::Apply {
            networks: state
                .networks
                .iter()
                .map(|n| n.network.name.clone())
                .collect(),
        });
        m.networks = state
            .networks
            .iter()
            .map(|n| n.network.name.clone())
            .collect();
        m.endpoints = state
            .networks
            .iter()
            .flat_map(|n| {
                n.endpoints.iter().map(|e| {
                    (
                        e.address,
                        (n.network.name.clone(), e.identity.unwrap_or_default()),
                    )
                })
            })
            .collect();
        m.applied = Some(state.clone());
        Ok(ApplyReport::default())
    }

    async fn attach(&self, network: &NetworkSpec, endpoint: &Endpoint) -> Result<()> {
        if self.fail_attach.load(Ordering::Relaxed) {
            return Err(Error::Worker("attach refused by the fake kernel".into()));
        }
        let mut m = self.model.lock().unwrap();
        // The real attach opens the namespace expecting the identity it was given.
        let path = endpoint.netns.to_string();
        if endpoint.identity.is_some() && m.namespaces.get(&path).copied() != endpoint.identity {
            return Err(Error::Worker(format!("{path} is another namespace now")));
        }
        if !m.networks.contains(&network.name) {
            return Err(Error::Worker(format!(
                "network {} has no device in the fake kernel",
                network.name
            )));
        }
        m.calls.push(Call::Attach {
            network: network.name.clone(),
            address: endpoint.address,
        });
        m.endpoints.insert(
            endpoint.address,
            (network.name.clone(), endpoint.identity.unwrap_or_default()),
        );
        Ok(())
    }

    async fn detach(&self, address: Ipv4Addr) -> Result<()> {
        let mut m = self.model.lock().unwrap();
        m.calls.push(Call::Detach { address });
        m.endpoints.remove(&address);
        Ok(())
    }

    async fn prepare_docker_endpoint(
        &self,
        network: &NetworkSpec,
        endpoint: &Endpoint,
    ) -> Result<String> {
        let mut m = self.model.lock().unwrap();
        if !m.networks.contains(&network.name) {
            return Err(Error::Worker(format!(
                "network {} has no device in the fake kernel",
                network.name
            )));
        }
        m.endpoints
            .insert(endpoint.address, (network.name.clone(), 0));
        m.calls.push(Call::Attach {
            network: network.name.clone(),
            address: endpoint.address,
        });
        Ok(netagent_overlay::docker_peer_name(endpoint.address))
    }

    async fn wait_for_namespace(&self, netns: &NetnsRef, _limit: Duration) -> Result<u64> {
        self.identity(netns).await
    }

    async fn divert_docker_dns(&self, netns: &NetnsRef, _identity: u64) -> Result<()> {
        self.record(Call::DivertDockerDns(netns.to_string()));
        Ok(())
    }

    async fn open_docker_forward(&self) -> Result<DockerForward> {
        self.record(Call::OpenDockerForward);
        Ok(DockerForward::Opened)
    }

    async fn start_mesh(
        &self,
        keys: KeyPair,
        address: Ipv4Addr,
        _prefix: u8,
        _options: MeshOptions,
        _on_failure: OnFailure,
    ) -> Result<Box<dyn MeshDatapath>> {
        if self.fail_mesh.load(Ordering::Relaxed) {
            return Err(Error::Worker("no TUN device in the fake kernel".into()));
        }
        self.record(Call::StartMesh { address });
        let mesh = Arc::new(FakeMesh {
            address,
            public_key: Mutex::new(keys.public()),
            peers: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        });
        *self.mesh.lock().unwrap() = Some(mesh.clone());
        Ok(Box::new(SharedMesh(mesh)))
    }

    /// The encrypted networks' VXLAN devices live on the mesh device: they go with it.
    async fn stop_mesh(&self, mesh: Box<dyn MeshDatapath>) {
        drop(mesh);
        let mut m = self.model.lock().unwrap();
        let encrypted: Vec<String> = m
            .applied
            .iter()
            .flat_map(|a| &a.networks)
            .filter(|n| n.network.encrypted)
            .map(|n| n.network.name.clone())
            .collect();
        m.networks.retain(|n| !encrypted.contains(n));
        m.endpoints.retain(|_, (n, _)| !encrypted.contains(n));
    }

    async fn identity(&self, netns: &NetnsRef) -> Result<u64> {
        self.model
            .lock()
            .unwrap()
            .namespaces
            .get(&netns.to_string())
            .copied()
            .ok_or_else(|| Error::Worker(format!("{netns}: no such namespace")))
    }

    async fn gone<K: Send + 'static>(&self, watched: Vec<(K, NetnsRef, u64)>) -> Vec<K> {
        let m = self.model.lock().unwrap();
        watched
            .into_iter()
            .filter(|(_, netns, ino)| m.namespaces.get(&netns.to_string()) != Some(ino))
            .map(|(k, _, _)| k)
            .collect()
    }

    async fn namespace_may_be_gone(&self) {
        self.namespace_gone.notified().await;
    }

    async fn host_namespaces(&self) -> Vec<u64> {
        vec![1]
    }

    async fn bind_dns(
        &self,
        netns: &NetnsRef,
        identity: u64,
        _addr: SocketAddr,
    ) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
        if self.identity(netns).await? != identity {
            return Err(Error::Worker(format!("{netns} is another namespace now")));
        }
        let io = |e: std::io::Error| Error::Worker(e.to_string());
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io)?;
        udp.set_nonblocking(true).map_err(io)?;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
        tcp.set_nonblocking(true).map_err(io)?;
        Ok((udp, tcp))
    }

    async fn rtt(
        &self,
        _targets: Vec<Ipv4Addr>,
        _deadline: Duration,
    ) -> HashMap<Ipv4Addr, Duration> {
        HashMap::new()
    }
}

/// The mesh the fake started, as the test sees it.
pub struct FakeMesh {
    pub address: Ipv4Addr,
    pub public_key: Mutex<[u8; 32]>,
    pub peers: Mutex<Vec<MeshPeer>>,
    /// Set by a test: the datapath "stopped by itself".
    pub failure: Mutex<Option<String>>,
}

struct SharedMesh(Arc<FakeMesh>);

impl MeshDatapath for SharedMesh {
    fn address(&self) -> Ipv4Addr {
        self.0.address
    }
    fn failure(&self) -> Option<String> {
        self.0.failure.lock().unwrap().clone()
    }
    fn set_peers(&self, peers: &[MeshPeer]) {
        *self.0.peers.lock().unwrap() = peers.to_vec();
    }
    fn set_keys(&self, keys: KeyPair) {
        *self.0.public_key.lock().unwrap() = keys.public();
    }
    fn stats(&self) -> Vec<PeerStats> {
        Vec::new()
    }
    fn dropped(&self) -> Vec<(&'static str, u64)> {
        vec![("bad_mac", 0)]
    }
}
