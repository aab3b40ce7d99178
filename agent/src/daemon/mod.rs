//! The agent: keeps this host's datapath and DNS in line with the cluster store.
//!
//! Data flows one way. The store's watch feeds the [`ClusterView`] (what every host
//! has published); from it the DNS snapshot is derived at once (no kernel work on that
//! path, so a name resolves on other hosts within milliseconds of an attach), and a
//! reconcile pass brings the kernel in line ([`reconcile::desired_host_state`]:
//! networks this host holds a block of, their peers, the namespaces attached here).
//!
//! The agent is made of parts that each own their state: the cluster view, this
//! host's endpoints, the reconciler, the DNS publisher and listeners, the mesh, the
//! Docker link; the kernel is reached only through a [`Datapath`]. Changes to this
//! host's endpoints (attach, detach, removal, a reconcile pass) are serialised by one
//! lock, `changes`, held across the kernel and store calls of one change: an attach
//! picks a free address, programs the kernel and claims the address in the store as
//! one step, and a second change interleaved with it could pick the same address or
//! undo its kernel work. No other lock is held across an await.

mod attach;
mod attached_file;
mod cluster_view;
mod containers;
mod datapath;
mod dns_publish;
mod docker_driver;
mod docker_mirror;
mod keys;
mod listeners;
mod liveness;
mod local;
mod mesh;
mod metrics;
mod networks;
mod nodes;
mod picture;
mod plugin_driver;
mod protected;
mod reconcile;
mod rtt;
mod server;
mod uapi;
mod views;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use netagent_dns::{DnsServer, Forwarder};
use netagent_overlay::NetnsRef;
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use crate::config::Config;
use crate::model::{self, EndpointRecord, NodeRecord};
use crate::store::{Store, StoreEvent, Txn};

use cluster_view::ClusterView;
use datapath::{Datapath, KernelDatapath};
use dns_publish::DnsPublisher;
use listeners::Listeners;
use local::{LocalEndpoint, LocalEndpoints};
use mesh::MeshState;
use reconcile::{HostFacts, Reconciler};

pub use metrics::starting_metrics_text;
pub use picture::Picture;
pub use plugin_driver::PluginDriver;
pub use server::{bind_api, serve_api, serve_requests};

/// How often the whole datapath is compared with the kernel even without a change.
const RESYNC: Duration = Duration::from_secs(15);

pub struct Agent<S: Store, D: Datapath = KernelDatapath> {
    cfg: Config,
    datapath: D,
    node: NodeRecord,
    started: Instant,
    view: ClusterView<S>,
    local: LocalEndpoints,
    reconciler: Reconciler,
    dns: DnsPublisher,
    listeners: Listeners,
    mesh: MeshState,
    /// None: Docker integration is off.
    docker: Option<containers::DockerLink>,
    /// What Docker's engine told the network and IPAM driver.
    docker_book: docker_driver::DriverBook,
    /// Serialises changes to this host's endpoints (see the module's comment).
    changes: Mutex<()>,
    /// Wakes the reconciler; shared with the mesh's datapath threads, which call it
    /// when the datapath stops by itself.
    reconcile: Arc<Notify>,
    rtt: StdMutex<HashMap<String, f64>>,
    /// The store's addresses, kept from containers by the firewall.
    store_addresses: Vec<Ipv4Addr>,
    /// Identities of the host's own network namespaces (the agent's and init's),
    /// which no endpoint may be: they never change, so they are read once.
    host_namespaces: Vec<u64>,
    /// The agent's own tasks, aborted by [`Agent::stop`].
    tasks: StdMutex<Vec<tokio::task::AbortHandle>>,
}

impl<S: Store> Agent<S> {
    /// Starts the agent on this host's kernel.
    pub async fn start(cfg: Config, store: S) -> Result<Arc<Self>> {
        let address = match cfg.underlay_address {
            Some(a) => a,
            None => detect_underlay().context(
                "no underlay_address in the config and none found from the routing table; set underlay_address = \"A.B.C.D\"",
            )?,
        };
        let datapath = KernelDatapath::open(address, cfg.underlay_interface.as_deref()).await?;
        Agent::start_with(cfg, store, datapath, address).await
    }
}

impl<S: Store, D: Datapath> Agent<S, D> {
    /// Starts the agent on `datapath`, at underlay `address`: reads the store,
    /// adopts this host's endpoints, reconciles once, then follows the store.
    pub async fn start_with(
        cfg: Config,
        store: S,
        datapath: D,
        address: Ipv4Addr,
    ) -> Result<Arc<Self>> {
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
        let started_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let node = NodeRecord {
            name: cfg.node.clone(),
            underlay: address,
            version: env!("CARGO_PKG_VERSION").into(),
            started: started_unix,
        };
        let keys = keys::load_or_create_key(&cfg.state_dir).await?;
        let store_addresses = protected::store_addresses(&cfg).await;
        let host_namespaces = datapath.host_namespaces().await;
        let listeners = take_kept_sockets(&cfg).await;
        let agent = Arc::new(Agent {
            view: ClusterView::new(store, &node.name),
            local: LocalEndpoints::new(&cfg.state_dir),
            reconciler: Reconciler::default(),
            dns: DnsPublisher::new(DnsServer::new(forwarder, cfg.dns_ttl)),
            listeners,
            mesh: MeshState::new(keys),
            docker: cfg.docker_socket.clone().map(containers::DockerLink::new),
            docker_book: docker_driver::DriverBook::load(&cfg.state_dir).await,
            changes: Mutex::new(()),
            reconcile: Arc::new(Notify::new()),
            rtt: StdMutex::new(HashMap::new()),
            store_addresses,
            host_namespaces,
            tasks: StdMutex::new(Vec::new()),
            datapath,
            node,
            started: Instant::now(),
            cfg,
        });
        let ttl = match &agent.cfg.store {
            crate::config::StoreConfig::Etcd { lease_ttl, .. } => *lease_ttl,
            crate::config::StoreConfig::Local => Duration::from_secs(5),
        };
        let store = agent.view.store();
        store.register(
            model::node_key(&agent.node.name),
            model::encode(&agent.node),
            ttl,
        );
        let mut events = store.watch();
        info!(node = %agent.node.name, underlay = %address, "waiting for the cluster store");
        // Nothing is decided before the first full read of the store.
        loop {
            match events.recv().await {
                Some(event @ StoreEvent::Reset(_)) => {
                    agent.view.apply_event(event);
                    break;
                }
                Some(StoreEvent::Changes { .. }) => continue,
                None => anyhow::bail!("the store's watch ended before the first read"),
            }
        }
        agent.adopt().await;
        let waiting: Vec<(String, NetnsRef)> = agent.local.read(|endpoints| {
            endpoints
                .iter()
                .filter(|(_, e)| e.ino == 0 && e.docker_endpoint.is_some())
                .map(|(k, e)| (k.clone(), e.netns.clone()))
                .collect()
        });
        for (key, netns) in waiting {
            agent.spawn(agent.clone().finish_docker_join(key, netns));
        }
        agent.publish_dns();
        agent.reconcile_once(true).await;
        agent.listeners.release_unclaimed();
        info!(node = %agent.node.name, "agent ready");
        agent.spawn(agent.clone().follow_store(events));
        agent.spawn(agent.clone().reconcile_loop());
        agent.spawn(agent.clone().liveness_loop());
        agent.spawn(agent.clone().rtt_loop());
        agent.spawn(agent.clone().docker_loop());
        agent.spawn(agent.clone().gone_nodes_loop());
        agent.spawn(agent.clone().uapi_loop());
        Ok(agent)
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        self.tasks.lock().unwrap().push(handle);
    }

    /// Stops following the store and the engine and closes the DNS listeners; the
    /// kernel keeps forwarding, as it does when the process exits.
    pub async fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        self.listeners.close_all().await;
    }

    /// Takes over this host's endpoints as the store lists them: the ones whose
    /// namespace still exists, and that this host's own list says it attached, keep
    /// their addresses; the others are removed.
    async fn adopt(&self) {
        let mine: Vec<(String, EndpointRecord)> = self.view.read(|c| {
            c.endpoints
                .values()
                .filter(|e| e.node == self.node.name)
                .map(|e| (model::endpoint_key(&e.network, e.address), e.clone()))
                .collect()
        });
        let list_path = self.local.file().to_owned();
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
            let listed = list.as_ref().and_then(|l| l.get(&key));
            // A Docker endpoint's record names the engine's endpoint, not the
            // namespace: this host's list has the namespace.
            let recorded = match listed.filter(|a| a.docker_endpoint.is_some()) {
                Some(a) => NetnsRef::parse(&a.netns).ok().map(|n| (n, a.ino)),
                None => liveness::recorded_namespace(&record),
            };
            let recorded = recorded
                .filter(|(_, ino)| !self.host_namespaces.contains(ino))
                .filter(|(_, ino)| {
                    list.as_ref().is_none_or(|l| {
                        l.get(&key)
                            .is_some_and(|a| a.netns == record.netns && a.ino == *ino)
                    })
                });
            match recorded {
                Some((netns, ino)) => {
                    let listed = list.as_ref().and_then(|l| l.get(&key));
                    let upstreams = listed.map(|a| a.upstreams.clone()).unwrap_or_default();
                    let docker_endpoint = listed.and_then(|a| a.docker_endpoint.clone());
                    found.insert(
                        key,
                        LocalEndpoint {
                            record,
                            netns,
                            ino,
                            upstreams,
                            docker_endpoint,
                        },
                    );
                }
                None => {
                    warn!(
                        key,
                        netns = record.netns,
                        "store record names this host, but this host did not attach it; removing it"
                    );
                    unreadable.push(key);
                }
            }
        }
        let watched = found
            .iter()
            // A Docker sandbox not made yet is waited for again, not taken as gone.
            .filter(|(_, e)| e.ino != 0)
            .map(|(k, e)| (k.clone(), e.netns.clone(), e.ino))
            .collect();
        let gone = self.datapath.gone(watched).await;
        for key in gone.into_iter().chain(unreadable) {
            found.remove(&key);
            info!(
                key,
                "namespace gone while the agent was down; removing its endpoint"
            );
            self.view.delete_or_owe(&key).await;
        }
        self.local.replace(found);
        self.update_own_blocks().await;
    }

    /// Blocks record the owner's underlay; a host that moved updates its own.
    async fn update_own_blocks(&self) {
        let stale: Vec<(String, model::BlockRecord)> = self.view.read(|c| {
            c.blocks
                .values()
                .filter(|b| b.node == self.node.name && b.underlay != self.node.underlay)
                .map(|b| (model::block_key(&b.network, b.block), b.clone()))
                .collect()
        });
        for (key, mut block) in stale {
            block.underlay = self.node.underlay;
            let txn = Txn::default().put(key.clone(), model::encode(&block));
            if let Err(e) = self.view.commit(txn).await {
                warn!(key, error = %e, "cannot update this host's underlay on its block");
            }
        }
    }

    async fn follow_store(self: Arc<Self>, mut events: tokio::sync::mpsc::Receiver<StoreEvent>) {
        while let Some(event) = events.recv().await {
            self.view.apply_event(event);
            if let Some(link) = &self.docker {
                link.networks_changed();
            }
            self.publish_dns();
            self.reconcile.notify_one();
        }
    }

    /// Publishes the DNS records the cluster view gives now.
    fn publish_dns(&self) {
        let _one = self.dns.one_at_a_time();
        let whole = self
            .view
            .read_changed(|c, dirty| self.dns.publish_changed(c, dirty));
        if let Some(records) = whole {
            self.dns.publish(records);
        }
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

    /// What this host's kernel should hold now, less the networks that clash.
    fn desired_state(&self) -> netagent_overlay::HostState {
        let facts = HostFacts {
            node: &self.node.name,
            underlay: self.node.underlay,
            underlay_interface: self.cfg.underlay_interface.as_deref(),
            mesh_address: self.mesh.address(),
            store_addresses: &self.store_addresses,
        };
        // A copy first: the view's lock is never taken inside another.
        let endpoints = self.local.snapshot();
        let desired = self
            .view
            .read(|c| reconcile::desired_host_state(c, &endpoints, &facts));
        self.reconciler.applicable(desired)
    }

    /// Brings the kernel and the DNS listeners in line with the cluster. `full`
    /// applies even when nothing seems to have changed (repairs drift).
    async fn reconcile_once(&self, full: bool) {
        self.ensure_mesh().await;
        let full = full || self.mesh.take_restarted();
        let _changes = self.changes.lock().await;
        // Someone deleted this host's endpoints in the store: confirmed, they go.
        let deleted = self.view.confirm_deleted(self.view.take_suspects()).await;
        // A confirmation may have put back what a stale event hid.
        self.publish_dns();
        let networks: BTreeSet<String> = self.view.read(|c| c.networks.keys().cloned().collect());
        for key in self.local.retain(|key, ep| {
            networks.contains(&ep.record.network) && !deleted.iter().any(|d| d == key)
        }) {
            info!(key, "endpoint removed from the store; detaching");
        }
        let _ = self
            .reconciler
            .apply(&self.datapath, self.desired_state(), full)
            .await;
        self.local_endpoints_changed().await;
        drop(_changes);
        if full && self.docker.is_some() {
            // dockerd may have been (re)started since: its FORWARD policy drops.
            self.open_docker_forward().await;
        }
    }

    /// What follows a change of this host's endpoints: their list on disk (which
    /// adoption trusts) and their DNS listeners.
    async fn local_endpoints_changed(&self) {
        self.local.save().await;
        let mut endpoints = self.local.snapshot();
        // A Docker sandbox not made yet has no DNS yet.
        endpoints.retain(|_, e| e.ino != 0);
        self.listeners
            .sync(&self.datapath, self.dns.server(), &endpoints)
            .await;
    }
}

/// The DNS listeners, with the keeper that holds their sockets across restarts (and
/// the sockets it kept from the previous agent) when the configuration asks for one.
async fn take_kept_sockets(cfg: &Config) -> Listeners {
    let (socket, grace) = (cfg.dns_keeper_socket.clone(), cfg.dns_keep_sockets);
    if grace.is_zero() {
        // Keeping is off: a keeper left from before would hold sockets this agent
        // must bind again.
        let stopped =
            tokio::task::spawn_blocking(move || crate::keeper::stop_keeper(&socket)).await;
        return match stopped {
            Ok(Ok(true)) => {
                info!("keeping DNS sockets is off: told the running keeper to let go");
                Listeners::after_keeper_stopped()
            }
            Ok(Err(e)) => {
                warn!(error = %e, "keeping DNS sockets is off, and a keeper could not be told to let go");
                Listeners::default()
            }
            _ => Listeners::default(),
        };
    }
    let opened = tokio::task::spawn_blocking(move || {
        crate::keeper::KeeperLink::open(&socket, grace, listeners::DNS_ADDRESS)
            .map_err(|e| format!("{}: {e}", socket.display()))
    })
    .await;
    match opened {
        Ok(Ok((link, inherited, refused))) => Listeners::kept(link, inherited, refused),
        Ok(Err(e)) => {
            warn!(error = %e, "no DNS socket keeper: queries sent while the agent restarts will go unanswered");
            Listeners::default()
        }
        Err(e) => {
            warn!(error = %e, "no DNS socket keeper");
            Listeners::default()
        }
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
