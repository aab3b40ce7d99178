//! The agent: keeps this host's datapath and DNS in line with the cluster store.
//!
//! Data flows one way. The store's watch feeds [`Cluster`] (what every host has
//! published); from it the DNS snapshot is derived at once (no kernel work on that
//! path, so a name resolves on other hosts within milliseconds of an attach), and a
//! reconcile pass brings the kernel in line (networks this host holds a block of,
//! their peers, the namespaces attached here). Attach and detach change the kernel
//! and the store under one host-local lock; nothing needs a cluster-wide lock.

mod attach;
mod attached_file;
mod containers;
mod listeners;
mod liveness;
mod mesh;
mod networks;
mod protected;
mod server;
mod views;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use netagent_dns::{DnsServer, Forwarder, Snapshot};
use netagent_overlay::{
    Endpoint, Host, HostState, NetnsRef, NetworkSpec, NetworkState, Peer, Underlay,
};
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use crate::config::Config;
use crate::model::{self, Cluster, EndpointRecord, NodeRecord};
use crate::store::{Store, StoreEvent};

pub use server::{bind_api, serve_api, serve_requests};

/// How often the whole datapath is compared with the kernel even without a change.
const RESYNC: Duration = Duration::from_secs(15);

/// An endpoint attached on this host.
#[derive(Clone, Debug)]
struct LocalEndpoint {
    record: EndpointRecord,
    netns: NetnsRef,
    /// Identity of the namespace at attach time (see `NetnsRef::identity`).
    ino: u64,
}

/// What only this host knows, changed only under its lock.
#[derive(Default)]
struct LocalState {
    /// By store key.
    endpoints: BTreeMap<String, LocalEndpoint>,
    /// DNS listeners, one per attached namespace (by identity).
    listeners: HashMap<u64, listeners::Listener>,
    /// The last state applied to the kernel.
    applied: Option<HostState>,
    /// What `attached.json` last said (saved again when the endpoints differ).
    saved: Option<attached_file::AttachedList>,
}

pub struct Agent<S: Store> {
    cfg: Config,
    store: S,
    host: Host,
    underlay: Underlay,
    node: NodeRecord,
    started: Instant,
    cluster: RwLock<Cluster>,
    local: Mutex<LocalState>,
    dns: Arc<DnsServer>,
    /// The DNS records last published, and the snapshot they make.
    dns_records: StdMutex<(BTreeMap<String, netagent_dns::EndpointRecord>, Snapshot)>,
    /// Keys of this host's endpoints that someone deleted in the store.
    deleted_here: StdMutex<Vec<String>>,
    /// Store deletions that failed while the store was away; retried.
    pending_deletes: StdMutex<BTreeSet<String>>,
    /// Shared with the mesh's datapath threads, which wake the reconciler when the
    /// datapath stops by itself.
    reconcile: Arc<Notify>,
    rtt: StdMutex<HashMap<String, f64>>,
    /// None: Docker integration is off.
    docker: Option<containers::DockerLink>,
    /// This host's WireGuard key pair (private half: here and in its file only).
    keys: StdMutex<netagent_overlay::KeyPair>,
    /// The encrypted mesh, once this host holds a block of an encrypted network.
    mesh: StdMutex<Option<netagent_overlay::Mesh>>,
    mesh_starting: Mutex<()>,
    /// The store's addresses, kept from containers by the firewall.
    store_addresses: Vec<Ipv4Addr>,
    /// Identities of the host's own network namespaces (the agent's and init's),
    /// which no endpoint may be: they never change, so they are read once.
    host_namespaces: Vec<u64>,
    /// Restores the firewall table when another program removes it; held for life.
    _firewall_guard: netagent_overlay::FirewallGuard,
    /// The mesh was started again: the next reconcile applies in full (its device's
    /// VXLAN devices went with the old one).
    mesh_restarted: std::sync::atomic::AtomicBool,
    /// Networks the last reconcile left out of the datapath (their records clash), with why.
    networks_left_out: StdMutex<Vec<(String, String)>>,
}

impl<S: Store> Agent<S> {
    pub async fn start(cfg: Config, store: S) -> Result<Arc<Self>> {
        let host = Host::open(&NetnsRef::Current).await?;
        let address = match cfg.underlay_address {
            Some(a) => a,
            None => detect_underlay().context(
                "no underlay_address in the config and none found from the routing table; set underlay_address = \"A.B.C.D\"",
            )?,
        };
        let underlay = host
            .underlay(address, cfg.underlay_interface.as_deref())
            .await?;
        let upstreams = if cfg.dns_upstream.is_empty() {
            let text = tokio::fs::read_to_string("/etc/resolv.conf")
                .await
                .unwrap_or_default();
            netagent_dns::upstreams_from_resolv_conf(&text)
        } else {
            cfg.dns_upstream.clone()
        };
        // Bound here, in the host namespace: upstream sockets never live in a container.
        let forwarder = Forwarder::new(upstreams).context("cannot forward DNS queries")?;
        let dns = DnsServer::new(forwarder, cfg.dns_ttl);
        let started_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let node = NodeRecord {
            name: cfg.node.clone(),
            underlay: address,
            version: env!("CARGO_PKG_VERSION").into(),
            started: started_unix,
        };
        let cfg_docker = cfg.docker_socket.clone();
        let keys = mesh::load_or_create_key(&cfg.state_dir).await?;
        let store_addresses = protected::store_addresses(&cfg).await;
        let host_namespaces = attach::host_namespaces(&host).await;
        let firewall_guard = host
            .guard_firewall()
            .await
            .context("cannot watch the firewall for reloads")?;
        let agent = Arc::new(Agent {
            cfg,
            store,
            host,
            underlay,
            node,
            started: Instant::now(),
            cluster: RwLock::new(Cluster::default()),
            local: Mutex::new(LocalState::default()),
            dns,
            dns_records: StdMutex::new(Default::default()),
            deleted_here: StdMutex::new(Vec::new()),
            pending_deletes: StdMutex::new(BTreeSet::new()),
            reconcile: Arc::new(Notify::new()),
            rtt: StdMutex::new(HashMap::new()),
            docker: cfg_docker.map(containers::DockerLink::new),
            networks_left_out: StdMutex::new(Vec::new()),
            keys: StdMutex::new(keys),
            mesh: StdMutex::new(None),
            mesh_starting: Mutex::new(()),
            store_addresses,
            host_namespaces,
            _firewall_guard: firewall_guard,
            mesh_restarted: std::sync::atomic::AtomicBool::new(false),
        });
        let ttl = match &agent.cfg.store {
            crate::config::StoreConfig::Etcd { lease_ttl, .. } => *lease_ttl,
            crate::config::StoreConfig::Local => Duration::from_secs(5),
        };
        agent.store.register(
            model::node_key(&agent.node.name),
            model::encode(&agent.node),
            ttl,
        );
        let mut events = agent.store.watch();
        info!(node = %agent.node.name, underlay = %address, "waiting for the cluster store");
        // Nothing is decided before the first full read of the store.
        loop {
            match events.recv().await {
                Some(StoreEvent::Reset(loaded)) => {
                    *agent.cluster.write().unwrap() = Cluster::from_loaded(&loaded);
                    break;
                }
                Some(StoreEvent::Changes(_)) => continue,
                None => anyhow::bail!("the store's watch ended before the first read"),
            }
        }
        agent.adopt().await;
        agent.refresh_dns();
        agent.reconcile_once(true).await;
        info!(node = %agent.node.name, "agent ready");
        tokio::spawn(agent.clone().follow_store(events));
        tokio::spawn(agent.clone().reconcile_loop());
        tokio::spawn(agent.clone().liveness_loop());
        tokio::spawn(agent.clone().rtt_loop());
        tokio::spawn(agent.clone().docker_loop());
        Ok(agent)
    }

    /// Takes over this host's endpoints as the store lists them: the ones whose
    /// namespace still exists keep their addresses; the others are removed.
    async fn adopt(&self) {
        let mine: Vec<(String, EndpointRecord)> = {
            let c = self.cluster.read().unwrap();
            c.endpoints
                .iter()
                .filter(|(_, e)| e.node == self.node.name)
                .map(|(_, e)| (model::endpoint_key(&e.network, e.address), e.clone()))
                .collect()
        };
        let list_path = attached_file::path(&self.cfg.state_dir);
        let list = match attached_file::load(&list_path).await {
            Ok(list) => list,
            Err(e) => {
                warn!(path = %list_path.display(), error = %e, "cannot read this host's list of attached namespaces; adopting none");
                Some(Default::default())
            }
        };
        if list.is_none() {
            info!(path = %list_path.display(), "no list of attached namespaces yet (first start of this version); adopting the store's records for this host");
        }
        let mut found = BTreeMap::new();
        let mut unreadable = Vec::new();
        for (key, record) in mine {
            let recorded = liveness::recorded_namespace(&record).filter(|(_, ino)| {
                list.as_ref().is_none_or(|l| {
                    l.get(&key)
                        .is_some_and(|a| a.netns == record.netns && a.ino == *ino)
                })
            });
            if recorded.is_none() {
                warn!(
                    key,
                    netns = record.netns,
                    "store record names this host, but this host did not attach it; removing it"
                );
            }
            match recorded {
                Some((netns, ino)) => {
                    found.insert(key, LocalEndpoint { record, netns, ino });
                }
                None => unreadable.push(key),
            }
        }
        let watched = found
            .iter()
            .map(|(k, e)| (k.clone(), e.netns.clone(), e.ino))
            .collect();
        let gone = liveness::gone(watched).await;
        for key in gone.into_iter().chain(unreadable) {
            found.remove(&key);
            info!(
                key,
                "namespace gone while the agent was down; removing its endpoint"
            );
            self.forget_in_store(&key).await;
        }
        self.local.lock().await.endpoints = found;
        self.update_own_blocks().await;
    }

    /// Blocks record the owner's underlay; a host that moved updates its own.
    async fn update_own_blocks(&self) {
        let stale: Vec<(String, model::BlockRecord)> = {
            let c = self.cluster.read().unwrap();
            c.blocks
                .iter()
                .filter(|(_, b)| b.node == self.node.name && b.underlay != self.node.underlay)
                .map(|(_, b)| (model::block_key(&b.network, b.block), b.clone()))
                .collect()
        };
        for (key, mut block) in stale {
            block.underlay = self.node.underlay;
            let txn = crate::store::Txn::default().put(key.clone(), model::encode(&block));
            if let Err(e) = self.store.txn(txn).await {
                warn!(key, error = %e, "cannot update this host's underlay on its block");
            }
        }
    }

    async fn follow_store(self: Arc<Self>, mut events: tokio::sync::mpsc::Receiver<StoreEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                StoreEvent::Reset(loaded) => {
                    *self.cluster.write().unwrap() = Cluster::from_loaded(&loaded);
                }
                StoreEvent::Changes(changes) => {
                    let mut deleted = Vec::new();
                    {
                        let mut c = self.cluster.write().unwrap();
                        for ch in changes.iter().filter(|ch| ch.value.is_none()) {
                            if ch
                                .key
                                .strip_prefix(model::ENDPOINTS)
                                .and_then(|k| c.endpoints.get(k))
                                .is_some_and(|e| e.node == self.node.name)
                            {
                                deleted.push(ch.key.clone());
                            }
                        }
                        c.apply(&changes);
                    }
                    self.deleted_here.lock().unwrap().extend(deleted);
                }
            }
            if let Some(link) = &self.docker {
                link.networks_changed();
            }
            self.refresh_dns();
            self.reconcile.notify_one();
        }
    }

    /// Derives the DNS records from the cluster and publishes the difference.
    fn refresh_dns(&self) {
        let wanted: BTreeMap<String, netagent_dns::EndpointRecord> = {
            let c = self.cluster.read().unwrap();
            c.endpoints
                .iter()
                .filter(|(_, e)| c.is_alive(&e.node) && c.networks.contains_key(&e.network))
                .map(|(k, e)| (k.clone(), dns_record(e)))
                .collect()
        };
        let mut guard = self.dns_records.lock().unwrap();
        let (current, snapshot) = &mut *guard;
        if *current == wanted {
            return;
        }
        let removed: Vec<_> = current
            .iter()
            .filter(|(k, r)| wanted.get(*k) != Some(r))
            .map(|(_, r)| r.clone())
            .collect();
        let added: Vec<_> = wanted
            .iter()
            .filter(|(k, r)| current.get(*k) != Some(r))
            .map(|(_, r)| r.clone())
            .collect();
        *snapshot = snapshot.apply(&removed, &added);
        *current = wanted;
        self.dns.update(snapshot.clone());
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RESYNC);
        tick.tick().await;
        loop {
            let full = tokio::select! {
                _ = self.reconcile.notified() => false,
                _ = tick.tick() => true,
            };
            self.reconcile_once(full).await;
        }
    }

    /// Brings the kernel and the DNS listeners in line with the cluster. `full`
    /// applies even when nothing seems to have changed (repairs drift).
    async fn reconcile_once(&self, full: bool) {
        self.ensure_mesh().await;
        let full = full
            || self
                .mesh_restarted
                .swap(false, std::sync::atomic::Ordering::Relaxed);
        let mut state = self.local.lock().await;
        let deleted: Vec<String> = std::mem::take(&mut *self.deleted_here.lock().unwrap());
        let networks: BTreeSet<String> = self
            .cluster
            .read()
            .unwrap()
            .networks
            .keys()
            .cloned()
            .collect();
        let before = state.endpoints.len();
        state.endpoints.retain(|key, ep| {
            let keep = networks.contains(&ep.record.network) && !deleted.contains(key);
            if !keep {
                info!(key, "endpoint removed from the store; detaching");
            }
            keep
        });
        let desired = self.applicable_host_state(&state);
        if full || state.applied.as_ref() != Some(&desired) || before != state.endpoints.len() {
            match self.host.apply(&desired).await {
                Ok(report) if !report.is_empty() => info!(
                    created = report.created.len(),
                    removed = report.removed.len(),
                    "datapath reconciled"
                ),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "datapath reconcile incomplete; retrying later"),
            }
            state.applied = Some(desired);
        }
        self.local_endpoints_changed(&mut state).await;
        drop(state);
        if full && self.docker.is_some() {
            // dockerd may have been (re)started since: its FORWARD policy drops.
            self.open_docker_forward().await;
        }
    }

    /// What follows a change of this host's endpoints: their list on disk (which
    /// adoption trusts) and their DNS listeners.
    async fn local_endpoints_changed(&self, state: &mut LocalState) {
        attached_file::save_if_changed(&self.cfg.state_dir, state).await;
        self.sync_listeners(state).await;
    }

    /// [`Self::desired_host_state`] less the networks whose records clash (named in
    /// `status` and the log): one bad network must not stop the others.
    fn applicable_host_state(&self, state: &LocalState) -> HostState {
        let (desired, left_out) = self.desired_host_state(state).without_invalid_networks();
        let left_out: Vec<(String, String)> = left_out
            .into_iter()
            .map(|(n, e)| (n, e.to_string()))
            .collect();
        let mut known = self.networks_left_out.lock().unwrap();
        for (network, why) in left_out.iter().filter(|l| !known.contains(l)) {
            warn!(
                network,
                why, "network left out of this host's datapath; the others are applied"
            );
        }
        *known = left_out;
        desired
    }

    /// The kernel state this host should have: every network it holds a block of,
    /// with every other block of it as a peer, and the namespaces attached here.
    fn desired_host_state(&self, state: &LocalState) -> HostState {
        let mesh_address = self.mesh_address();
        let c = self.cluster.read().unwrap();
        let mut networks = Vec::new();
        for net in c.networks.values() {
            let Some(mine) = c.blocks_of(&net.name).find(|b| b.node == self.node.name) else {
                continue;
            };
            if net.encrypted && mesh_address.is_none() {
                // Waits for the mesh: never plaintext on the underlay.
                continue;
            }
            // Encrypted networks reach their peers at mesh addresses, inside WireGuard.
            let peers = c
                .blocks_of(&net.name)
                .filter(|b| b.node != self.node.name)
                .filter_map(|b| {
                    let underlay = if net.encrypted {
                        c.mesh_of(&b.node)?.address
                    } else {
                        b.underlay
                    };
                    Some(Peer {
                        name: b.node.clone(),
                        underlay,
                        block: b.block,
                    })
                })
                .collect();
            let endpoints = state
                .endpoints
                .values()
                .filter(|e| e.record.network == net.name)
                .map(|e| Endpoint {
                    id: e.record.id.clone(),
                    netns: e.netns.clone(),
                    address: e.record.address,
                    mac: None,
                    identity: Some(e.ino),
                })
                .collect();
            networks.push(NetworkState {
                network: network_spec(net, mine.block),
                peers,
                endpoints,
            });
        }
        HostState {
            underlay_address: self.node.underlay,
            underlay_interface: self.cfg.underlay_interface.clone(),
            mesh_address,
            networks,
            protected: protected::protected(&c, &self.store_addresses),
        }
    }

    /// Deletes a key, or remembers to when the store is away.
    async fn forget_in_store(&self, key: &str) {
        let txn = crate::store::Txn::default().delete(key);
        if let Err(e) = self.store.txn(txn).await {
            warn!(key, error = %e, "cannot remove the endpoint from the store yet; will retry");
            self.pending_deletes.lock().unwrap().insert(key.to_owned());
        }
    }
}

pub fn network_spec(net: &model::NetworkRecord, block: ipnet::Ipv4Net) -> NetworkSpec {
    NetworkSpec {
        name: net.name.clone(),
        vni: net.vni,
        subnet: net.subnet,
        block,
        mtu: net.mtu,
        encrypted: net.encrypted,
    }
}

fn dns_record(e: &EndpointRecord) -> netagent_dns::EndpointRecord {
    netagent_dns::EndpointRecord {
        network: e.network.clone(),
        address: e.address,
        // Every endpoint answers to some name of its own, for PTR.
        name: e
            .name
            .clone()
            .unwrap_or_else(|| e.address.to_string().replace('.', "-")),
        service: e.service.clone(),
        aliases: e.aliases.clone(),
        in_service: e.in_service,
    }
}

/// The source address the kernel would use toward the outside world. Connecting a
/// UDP socket only looks up a route; nothing is sent.
fn detect_underlay() -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(a) if !a.is_unspecified() => Some(a),
        _ => None,
    }
}
