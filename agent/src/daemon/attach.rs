//! Attach and detach: the kernel and the store change together under this host's
//! lock, in an order that leaves nothing half-done (kernel first, then the store;
//! if the store refuses, the kernel change is undone).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use netagent_overlay::{Endpoint, NetnsRef, PinnedProcess};
use tracing::{info, warn};

use super::liveness::endpoint_id;
use super::{network_spec, Agent, LocalEndpoint, LocalState};
use crate::api::{AttachRequest, EndpointInfo};
use crate::docker::{labels, resolv_conf, Container, Engine};
use crate::ipam;
use crate::model::{self, BlockRecord, EndpointRecord};
use crate::names::check_dns_name;
use crate::store::{Change, Compare, Store, Txn};

/// How often a block allocation is retried when another host took the same block.
const BLOCK_RETRIES: usize = 8;

/// What an attach or detach names, resolved: the namespace, its identity, and the
/// Docker container it belongs to, pinned.
#[derive(Clone)]
pub(super) struct Target {
    pub netns: NetnsRef,
    pub ino: u64,
    pub container: Option<Container>,
    /// The container's first process, held so its pid names no other process while
    /// the attach (and the resolv.conf rewrite after it) runs.
    pub pinned: Option<Arc<PinnedProcess>>,
}

/// The identity of a namespace (a `stat`, off the runtime's workers).
async fn identity(netns: &NetnsRef) -> Result<u64> {
    let probe = netns.clone();
    tokio::task::spawn_blocking(move || probe.identity())
        .await
        .context("identity check panicked")?
        .map_err(Into::into)
}

/// A running container's namespace, reached through its first process: pinned by a
/// pidfd, then confirmed by a second inspect (the first one's pid may belong to
/// another process by now if the container exited in between).
pub(super) async fn container_target(engine: &Engine, c: Container) -> Result<Target> {
    let pid = c.pid;
    let (pinned, ino) = tokio::task::spawn_blocking(move || -> netagent_overlay::Result<_> {
        let pinned = PinnedProcess::pin(pid)?;
        let ino = pinned.netns_identity()?;
        Ok((pinned, ino))
    })
    .await
    .context("pinning the container's process panicked")?
    .with_context(|| format!("container {:?} stopped while being attached", c.name))?;
    let again = engine.pid(&c.id).await?;
    if again != pid || !pinned.alive() {
        bail!(
            "container {:?} restarted while being attached; it is attached again by its start event (or run the attach again)",
            c.name
        );
    }
    Ok(Target {
        netns: NetnsRef::Pid(pid),
        ino,
        container: Some(c),
        pinned: Some(Arc::new(pinned)),
    })
}

/// Identities of the host's own network namespaces: the agent's host's and init's
/// (the same on a real host; init's may be unreadable in a sandbox).
pub(super) async fn host_namespaces(host: &netagent_overlay::Host) -> Vec<u64> {
    let host = host.netns().reference().clone();
    tokio::task::spawn_blocking(move || {
        [host, NetnsRef::Pid(1)]
            .iter()
            .filter_map(|n| n.identity().ok())
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// How long the resolv.conf rewrite may take. It runs beside the attach, never in
/// the path of the Docker events: nothing a container does to its file can stall them.
const RESOLV_CONF_DEADLINE: Duration = Duration::from_secs(5);

/// Rewrites in flight at once. A rewrite stuck in the kernel (a hung network
/// filesystem) keeps its blocking thread past the deadline; this bounds how many.
static REWRITES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Points the container's resolver at the embedded DNS, in the background.
fn point_resolver_at_embedded_dns(c: &Container, pinned: Arc<PinnedProcess>) {
    let container = c.name.clone();
    let Some(engine_file) = c.resolv_conf_path.clone() else {
        warn!(
            container,
            "the engine names no resolv.conf for this container; left as it is"
        );
        return;
    };
    tokio::spawn(async move {
        let work = async {
            let permit = REWRITES.acquire().await.expect("never closed");
            // The permit goes with the thread: it is freed when the work ends, not
            // when the deadline gives up on it.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                resolv_conf::rewrite(&pinned, &engine_file)
            })
            .await
        };
        match tokio::time::timeout(RESOLV_CONF_DEADLINE, work).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => {
                warn!(container, error = %e, "cannot point the container's resolv.conf at 127.0.0.11")
            }
            Ok(Err(e)) => warn!(container, error = %e, "resolv.conf rewrite panicked"),
            Err(_) => warn!(
                container,
                "resolv.conf rewrite took longer than {RESOLV_CONF_DEADLINE:?}; given up"
            ),
        }
    });
}

impl<S: Store> Agent<S> {
    /// A namespace as the user named it: a path, `pid:N`, or a Docker container.
    pub(super) async fn resolve_target(&self, target: &str) -> Result<Target> {
        if target.starts_with('/') || target.starts_with("pid:") {
            let netns = NetnsRef::parse(target)?;
            let ino = identity(&netns).await?;
            return Ok(Target {
                netns,
                ino,
                container: None,
                pinned: None,
            });
        }
        let engine = self.docker_engine().map_err(|why| {
            anyhow!("{target:?} is not a namespace path (/run/netns/NAME) or pid:N, and {why}")
        })?;
        container_target(&engine, engine.inspect(target).await?).await
    }

    /// Refuses the host's own network namespace (the agent's, or init's): an
    /// endpoint there would put the host itself on a tenant network.
    fn refuse_host_namespace(&self, target: &str, ino: u64) -> Result<()> {
        if self.host_namespaces.contains(&ino) {
            bail!(
                "{target} is in the host's own network namespace; only containers and namespaces of their own can join a network (a --network host container cannot)"
            );
        }
        Ok(())
    }

    pub async fn attach(&self, req: AttachRequest) -> Result<EndpointInfo> {
        let target = self.resolve_target(&req.target).await?;
        if target.container.is_some() {
            self.attach_container(req, target).await
        } else {
            self.attach_target(req, target, true).await
        }
    }

    /// Attaches a running container: its name, its service label and its short id
    /// are names too (as on Docker's own networks), its health decides whether it is
    /// in service, and its resolver is pointed at the embedded DNS.
    pub(super) async fn attach_container(
        &self,
        mut req: AttachRequest,
        target: Target,
    ) -> Result<EndpointInfo> {
        let (Some(c), Some(pinned)) = (target.container.clone(), target.pinned.clone()) else {
            bail!("{} is not a pinned container", req.target);
        };
        req.name.get_or_insert_with(|| c.name.clone());
        if req.service.is_none() {
            req.service = labels::service_of(&c.labels);
        }
        let short = c.short_id().to_owned();
        if !req.aliases.contains(&short) {
            req.aliases.push(short);
        }
        let info = self.attach_target(req, target, !c.unhealthy).await?;
        point_resolver_at_embedded_dns(&c, pinned);
        Ok(info)
    }

    async fn attach_target(
        &self,
        req: AttachRequest,
        target: Target,
        in_service: bool,
    ) -> Result<EndpointInfo> {
        for (kind, n) in req
            .name
            .iter()
            .map(|n| ("name", n))
            .chain(req.service.iter().map(|s| ("service", s)))
            .chain(req.aliases.iter().map(|a| ("alias", a)))
        {
            check_dns_name(kind, n).map_err(|e| anyhow!(e))?;
        }
        let mut network = self
            .cluster
            .read()
            .unwrap()
            .networks
            .get(&req.network)
            .cloned();
        if network.is_none() {
            // Created on another host a moment ago? The watch may not have said yet.
            if let Ok(loaded) = self.store.load().await {
                let fresh = model::Cluster::from_loaded(&loaded);
                network = fresh.networks.get(&req.network).cloned();
            }
        }
        let network = network.ok_or_else(|| {
            anyhow!(
                "network {:?} not found; create it with: netagent network create {} --subnet CIDR",
                req.network,
                req.network
            )
        })?;
        let Target {
            netns,
            ino,
            container,
            pinned: _pinned,
        } = target;
        self.refuse_host_namespace(&req.target, ino)?;
        let id = endpoint_id(ino);
        let mut state = self.local.lock().await;
        if let Some(existing) = state
            .endpoints
            .values()
            .find(|e| e.record.id == id && e.record.network == network.name)
        {
            info!(
                target = req.target,
                network = network.name,
                "already attached"
            );
            return Ok(self.endpoint_info(&existing.record));
        }
        let block = self.own_block(&network).await?;
        let taken: BTreeSet<Ipv4Addr> = {
            let c = self.cluster.read().unwrap();
            c.endpoints_of(&network.name)
                .map(|e| e.address)
                .chain(state.endpoints.values().map(|e| e.record.address))
                .collect()
        };
        let address = ipam::free_address(block, &taken).ok_or_else(|| {
            anyhow!(
                "network {:?}: this host's block {block} is full; create a network with larger blocks (--block-size)",
                network.name
            )
        })?;
        let name = req.name.clone().or_else(|| match &netns {
            NetnsRef::Path(p) => p.file_name().map(|f| f.to_string_lossy().into_owned()),
            _ => None,
        });
        let record = EndpointRecord {
            network: network.name.clone(),
            address,
            node: self.node.name.clone(),
            id: id.clone(),
            netns: netns.to_string(),
            name,
            service: req.service.clone(),
            aliases: req.aliases.clone(),
            in_service,
            container: container.map(|c| c.id),
        };
        let spec = network_spec(&network, block);
        // First endpoint of this network here: its device and peers come first.
        let known = state
            .applied
            .as_ref()
            .is_some_and(|a| a.networks.iter().any(|n| n.network == spec));
        if !known {
            self.ensure_network_here(&mut state, &network.name).await?;
        }
        let endpoint = Endpoint {
            id: id.clone(),
            netns: netns.clone(),
            address,
            mac: None,
            identity: Some(ino),
        };
        self.host
            .attach(&spec, &endpoint)
            .await
            .with_context(|| format!("attaching {} to {:?}", req.target, network.name))?;
        let key = model::endpoint_key(&network.name, address);
        let bytes = model::encode(&record);
        let txn = Txn::default()
            .when(Compare::Absent(key.clone()))
            .put(key.clone(), bytes.clone());
        let stored = self.store.txn(txn).await;
        if !matches!(stored, Ok(true)) {
            if let Err(e) = self.host.detach(address).await {
                warn!(error = %e, %address, "undoing the attach failed; the next reconcile removes it");
            }
            return Err(match stored {
                Err(e) => anyhow!(
                    "{e}; nothing was attached (the store must be reachable to hand out an address)"
                ),
                _ => anyhow!("address {address} was taken in the store meanwhile; try again"),
            });
        }
        state.endpoints.insert(
            key.clone(),
            LocalEndpoint {
                record: record.clone(),
                netns,
                ino,
            },
        );
        if let Some(applied) = state.applied.as_mut() {
            if let Some(n) = applied.networks.iter_mut().find(|n| n.network == spec) {
                n.endpoints.push(endpoint);
            }
        }
        self.cluster.write().unwrap().apply(&[Change {
            key,
            value: Some(bytes),
        }]);
        self.refresh_dns();
        self.local_endpoints_changed(&mut state).await;
        info!(target = req.target, network = network.name, %address, "attached");
        Ok(self.endpoint_info(&record))
    }

    pub async fn detach(&self, target: &str, network: &str) -> Result<EndpointInfo> {
        let id = endpoint_id(self.resolve_target(target).await?.ino);
        let mut state = self.local.lock().await;
        let (key, ep) = state
            .endpoints
            .iter()
            .find(|(_, e)| e.record.id == id && e.record.network == network)
            .map(|(k, e)| (k.clone(), e.clone()))
            .ok_or_else(|| {
                anyhow!("{target} is not attached to network {network:?} on this host")
            })?;
        self.store
            .txn(Txn::default().delete(key.clone()))
            .await
            .map_err(|e| anyhow!("{e}; nothing was detached"))?;
        self.drop_local(&mut state, &key).await;
        info!(target, network, address = %ep.record.address, "detached");
        Ok(self.endpoint_info(&ep.record))
    }

    /// Removes an endpoint of this host from the kernel, the DNS and the local view.
    /// The store record is the caller's business.
    pub(super) async fn drop_local(&self, state: &mut LocalState, key: &str) {
        let Some(ep) = state.endpoints.remove(key) else {
            return;
        };
        if let Err(e) = self.host.detach(ep.record.address).await {
            warn!(error = %e, key, "detach from the kernel failed; the next reconcile retries");
        }
        if let Some(applied) = state.applied.as_mut() {
            for n in &mut applied.networks {
                n.endpoints.retain(|e| {
                    e.address != ep.record.address || n.network.name != ep.record.network
                });
            }
        }
        self.cluster.write().unwrap().apply(&[Change {
            key: key.to_owned(),
            value: None,
        }]);
        self.refresh_dns();
        self.local_endpoints_changed(state).await;
    }

    /// This host's block of a network, taken from the subnet if it has none yet. The
    /// store's create-if-absent decides between hosts racing for the same block.
    async fn own_block(&self, network: &model::NetworkRecord) -> Result<ipnet::Ipv4Net> {
        for _ in 0..BLOCK_RETRIES {
            let (mine, taken) = {
                let c = self.cluster.read().unwrap();
                let mine = c
                    .blocks_of(&network.name)
                    .find(|b| b.node == self.node.name)
                    .map(|b| b.block);
                let taken: BTreeSet<ipnet::Ipv4Net> =
                    c.blocks_of(&network.name).map(|b| b.block).collect();
                (mine, taken)
            };
            if let Some(b) = mine {
                return Ok(b);
            }
            let block = ipam::free_block(network, &taken).ok_or_else(|| {
                anyhow!(
                    "network {:?}: every /{} block of {} is held by a host; no room for this one",
                    network.name,
                    network.block_prefix,
                    network.subnet
                )
            })?;
            let record = BlockRecord {
                network: network.name.clone(),
                block,
                node: self.node.name.clone(),
                underlay: self.node.underlay,
            };
            let key = model::block_key(&network.name, block);
            let bytes = model::encode(&record);
            let txn = Txn::default()
                .when(Compare::Absent(key.clone()))
                .put(key.clone(), bytes.clone());
            if self
                .store
                .txn(txn)
                .await
                .map_err(|e| anyhow!("{e}; nothing was attached"))?
            {
                info!(network = network.name, %block, "took a block");
                self.cluster.write().unwrap().apply(&[Change {
                    key,
                    value: Some(bytes),
                }]);
                return Ok(block);
            }
            // Another host won this block: read the store again and pick another.
            let loaded = self.store.load().await?;
            *self.cluster.write().unwrap() = model::Cluster::from_loaded(&loaded);
        }
        bail!(
            "network {:?}: could not take a block after {BLOCK_RETRIES} tries (hosts racing); try again",
            network.name
        )
    }

    /// Sets up a network's device and peers on this host before its first endpoint.
    async fn ensure_network_here(&self, state: &mut LocalState, network: &str) -> Result<()> {
        self.ensure_mesh().await;
        let desired = self.applicable_host_state(state);
        if let Some((_, why)) = self
            .networks_left_out
            .lock()
            .unwrap()
            .iter()
            .find(|(n, _)| n == network)
        {
            bail!("network {network:?} cannot be set up on this host: {why}");
        }
        if !desired.networks.iter().any(|n| n.network.name == network) {
            if self.mesh_address().is_none()
                && self
                    .cluster
                    .read()
                    .unwrap()
                    .networks
                    .get(network)
                    .is_some_and(|n| n.encrypted)
            {
                bail!("network {network:?} is encrypted and this host's mesh is not up (see the agent's log)");
            }
            bail!("network {network:?} has no block on this host");
        }
        // Device, gateway, peers and the firewall's view of the new network at once.
        self.host.apply(&desired).await?;
        state.applied = Some(desired);
        Ok(())
    }

    pub(super) fn endpoint_info(&self, e: &EndpointRecord) -> EndpointInfo {
        let alive = self.cluster.read().unwrap().is_alive(&e.node);
        EndpointInfo {
            network: e.network.clone(),
            address: e.address,
            node: e.node.clone(),
            name: e.name.clone(),
            service: e.service.clone(),
            aliases: e.aliases.clone(),
            state: match (alive, e.in_service) {
                (false, _) => "down",
                (true, true) => "up",
                (true, false) => "unhealthy",
            }
            .into(),
            netns: (e.node == self.node.name).then(|| e.netns.clone()),
            container: e.container.clone(),
        }
    }
}
