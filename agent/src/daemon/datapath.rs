//! Every kernel operation the agent performs, as one trait: the real one drives the
//! `overlay` crate; a recording fake (`fake.rs`) lets the agent's logic run in unit
//! tests without root. Blocking work (a `stat` of a namespace, joining threads)
//! happens off the runtime's workers inside the implementation.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use netagent_overlay::{
    ApplyReport, DockerForward, Endpoint, FirewallGuard, Host, HostState, KeyPair, Mesh,
    MeshOptions, MeshPeer, Netns, NetnsRef, NetnsWatch, NetworkSpec, OnFailure, PeerStats, Result,
    Underlay,
};

/// The running encrypted mesh, as the agent steers it.
pub trait MeshDatapath: Send + Sync {
    /// This host's address on the mesh.
    fn address(&self) -> Ipv4Addr;
    /// Why the datapath stopped by itself, if it did.
    fn failure(&self) -> Option<String>;
    fn set_peers(&self, peers: &[MeshPeer]);
    fn set_keys(&self, keys: KeyPair);
    fn stats(&self) -> Vec<PeerStats>;
    /// Received datagrams dropped, by reason (every reason, zero included).
    fn dropped(&self) -> Vec<(&'static str, u64)>;
}

pub trait Datapath: Send + Sync + 'static {
    /// Makes the kernel match `state` (idempotent; repairs drift).
    fn apply(&self, state: &HostState) -> impl Future<Output = Result<ApplyReport>> + Send;

    /// Adds one endpoint to a network whose device is already in place.
    fn attach(
        &self,
        network: &NetworkSpec,
        endpoint: &Endpoint,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Removes the endpoint holding `address`.
    fn detach(&self, address: Ipv4Addr) -> impl Future<Output = Result<()>> + Send;

    /// Lets overlay traffic through dockerd's FORWARD chain.
    fn open_docker_forward(&self) -> impl Future<Output = Result<DockerForward>> + Send;

    /// Makes an endpoint's veth pair for Docker to move into the container; returns
    /// the name of the end Docker moves.
    fn prepare_docker_endpoint(
        &self,
        network: &NetworkSpec,
        endpoint: &Endpoint,
    ) -> impl Future<Output = Result<String>> + Send;

    /// Waits until `netns` names a network namespace; returns its identity.
    fn wait_for_namespace(
        &self,
        netns: &NetnsRef,
        limit: Duration,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Keeps Docker's embedded resolver from taking port 53 at 127.0.0.11 in a
    /// namespace Docker also serves, so queries reach the embedded DNS.
    fn divert_docker_dns(
        &self,
        netns: &NetnsRef,
        identity: u64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Starts the encrypted mesh at `address`/`prefix`.
    fn start_mesh(
        &self,
        keys: KeyPair,
        address: Ipv4Addr,
        prefix: u8,
        options: MeshOptions,
        on_failure: OnFailure,
    ) -> impl Future<Output = Result<Box<dyn MeshDatapath>>> + Send;

    /// Stops a mesh (its threads are joined off the runtime's workers).
    fn stop_mesh(&self, mesh: Box<dyn MeshDatapath>) -> impl Future<Output = ()> + Send;

    /// The identity of the namespace `netns` leads to now (see `NetnsRef::identity`).
    fn identity(&self, netns: &NetnsRef) -> impl Future<Output = Result<u64>> + Send;

    /// Which of `watched` no longer lead to the namespace they were attached to.
    fn gone<K: Send + 'static>(
        &self,
        watched: Vec<(K, NetnsRef, u64)>,
    ) -> impl Future<Output = Vec<K>> + Send;

    /// Returns once a namespace attached in the kernel (by `apply` or `attach`) may
    /// have gone since the last return, at once if one may have meanwhile; `gone`
    /// tells which. It cannot see everything (an unmount that leaves the file in
    /// place): callers still check every few seconds.
    fn namespace_may_be_gone(&self) -> impl Future<Output = ()> + Send;

    /// The identities of the host's own namespaces, which no endpoint may be.
    fn host_namespaces(&self) -> impl Future<Output = Vec<u64>> + Send;

    /// A UDP socket and a TCP listener at `addr` inside the namespace, which must
    /// still be the one with `identity`.
    fn bind_dns(
        &self,
        netns: &NetnsRef,
        identity: u64,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<(std::net::UdpSocket, std::net::TcpListener)>> + Send;

    /// Round trips to `targets` over the overlay; those that did not answer are absent.
    fn rtt(
        &self,
        targets: Vec<Ipv4Addr>,
        deadline: Duration,
    ) -> impl Future<Output = HashMap<Ipv4Addr, Duration>> + Send;
}

/// The real datapath: this host's namespace through the `overlay` crate.
pub struct KernelDatapath {
    host: Host,
    underlay: Underlay,
    /// Restores the firewall table when another program removes it; held for life.
    _firewall_guard: FirewallGuard,
    /// Watches the namespaces in `attached`.
    netns_watch: NetnsWatch,
    /// The namespaces attached in the kernel, by endpoint address. Changes to
    /// endpoints come one at a time (the agent serialises them), so the set handed
    /// to the watch after each is the latest.
    attached: Mutex<HashMap<Ipv4Addr, NetnsRef>>,
}

impl KernelDatapath {
    /// Opens the agent's own namespace; `underlay` is the address peers reach it at.
    pub async fn open(underlay: Ipv4Addr, interface: Option<&str>) -> anyhow::Result<Self> {
        let host = Host::open(&NetnsRef::Current).await?;
        let underlay = host.underlay(underlay, interface).await?;
        let firewall_guard = host
            .guard_firewall()
            .await
            .context("cannot watch the firewall for reloads")?;
        let netns_watch =
            NetnsWatch::start().context("cannot watch attached namespaces for removal")?;
        Ok(KernelDatapath {
            host,
            underlay,
            _firewall_guard: firewall_guard,
            netns_watch,
            attached: Mutex::new(HashMap::new()),
        })
    }

    /// Changes the set of attached namespaces and has the watch follow it.
    fn follow_attached(&self, change: impl FnOnce(&mut HashMap<Ipv4Addr, NetnsRef>)) {
        let refs: Vec<NetnsRef> = {
            let mut attached = self.attached.lock().unwrap();
            change(&mut attached);
            attached.values().cloned().collect()
        };
        self.netns_watch.watch(refs);
    }
}

impl MeshDatapath for Mesh {
    fn address(&self) -> Ipv4Addr {
        self.address
    }
    fn failure(&self) -> Option<String> {
        Mesh::failure(self)
    }
    fn set_peers(&self, peers: &[MeshPeer]) {
        Mesh::set_peers(self, peers)
    }
    fn set_keys(&self, keys: KeyPair) {
        Mesh::set_keys(self, keys)
    }
    fn stats(&self) -> Vec<PeerStats> {
        Mesh::stats(self)
    }
    fn dropped(&self) -> Vec<(&'static str, u64)> {
        Mesh::dropped(self)
    }
}

/// A `stat` per namespace, on a blocking thread.
async fn identities<K: Send + 'static>(watched: Vec<(K, NetnsRef, u64)>) -> Vec<K> {
    if watched.is_empty() {
        return Vec::new();
    }
    tokio::task::spawn_blocking(move || {
        watched
            .into_iter()
            .filter(|(_, netns, ino)| netns.identity().ok() != Some(*ino))
            .map(|(k, _, _)| k)
            .collect()
    })
    .await
    .unwrap_or_default()
}

impl Datapath for KernelDatapath {
    async fn apply(&self, state: &HostState) -> Result<ApplyReport> {
        let report = self.host.apply(state).await;
        // Even after a failure: watching a namespace too many only costs a check.
        self.follow_attached(|attached| {
            *attached = state
                .networks
                .iter()
                .flat_map(|n| &n.endpoints)
                .map(|e| (e.address, e.netns.clone()))
                .collect();
        });
        report
    }

    async fn attach(&self, network: &NetworkSpec, endpoint: &Endpoint) -> Result<()> {
        self.host.attach(network, endpoint).await?;
        self.follow_attached(|attached| {
            attached.insert(endpoint.address, endpoint.netns.clone());
        });
        Ok(())
    }

    async fn detach(&self, address: Ipv4Addr) -> Result<()> {
        let detached = self.host.detach(address).await;
        self.follow_attached(|attached| {
            attached.remove(&address);
        });
        detached
    }

    async fn prepare_docker_endpoint(
        &self,
        network: &NetworkSpec,
        endpoint: &Endpoint,
    ) -> Result<String> {
        self.host.prepare_for_docker(network, endpoint).await
    }

    async fn wait_for_namespace(&self, netns: &NetnsRef, limit: Duration) -> Result<u64> {
        let netns = netns.clone();
        tokio::task::spawn_blocking(move || netns.wait_for_namespace(limit))
            .await
            .map_err(|e| netagent_overlay::Error::Worker(format!("waiting for a namespace: {e}")))?
    }

    async fn divert_docker_dns(&self, netns: &NetnsRef, identity: u64) -> Result<()> {
        netagent_overlay::divert_dns_from_docker(netns, identity).await
    }

    async fn open_docker_forward(&self) -> Result<DockerForward> {
        self.host.open_docker_forward().await
    }

    async fn start_mesh(
        &self,
        keys: KeyPair,
        address: Ipv4Addr,
        prefix: u8,
        options: MeshOptions,
        on_failure: OnFailure,
    ) -> Result<Box<dyn MeshDatapath>> {
        let mesh = self
            .host
            .start_mesh(keys, &self.underlay, address, prefix, options, on_failure)
            .await?;
        Ok(Box::new(mesh))
    }

    async fn stop_mesh(&self, mesh: Box<dyn MeshDatapath>) {
        // Dropping joins the datapath threads: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || drop(mesh)).await;
    }

    async fn identity(&self, netns: &NetnsRef) -> Result<u64> {
        let probe = netns.clone();
        tokio::task::spawn_blocking(move || probe.identity())
            .await
            .map_err(|e| netagent_overlay::Error::Worker(format!("identity check: {e}")))?
    }

    async fn gone<K: Send + 'static>(&self, watched: Vec<(K, NetnsRef, u64)>) -> Vec<K> {
        identities(watched).await
    }

    async fn namespace_may_be_gone(&self) {
        self.netns_watch.changed().await;
    }

    async fn host_namespaces(&self) -> Vec<u64> {
        let host = self.host.netns().reference().clone();
        tokio::task::spawn_blocking(move || {
            // The agent's host's and init's (the same on a real host; init's may be
            // unreadable in a sandbox).
            [host, NetnsRef::Pid(1)]
                .iter()
                .filter_map(|n| n.identity().ok())
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    async fn bind_dns(
        &self,
        netns: &NetnsRef,
        identity: u64,
        addr: SocketAddr,
    ) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
        Netns::open_expecting(netns, identity)?
            .bind_listeners(addr)
            .await
    }

    async fn rtt(&self, targets: Vec<Ipv4Addr>, deadline: Duration) -> HashMap<Ipv4Addr, Duration> {
        if targets.is_empty() {
            return HashMap::new();
        }
        netagent_overlay::overlay_rtt(targets, deadline)
            .await
            .unwrap_or_default()
    }
}
