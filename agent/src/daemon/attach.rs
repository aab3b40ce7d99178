//! Attach, detach and removal: the kernel and the store change together under the
//! agent's `changes` lock, in an order that leaves nothing half-done (attach: kernel
//! first, then the store, and if the store refuses the kernel change is undone;
//! detach: the store first, so a refused detach changes nothing). A detach asked for,
//! a container's death and a namespace gone all end in [`Agent::retire`].

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use netagent_overlay::{NetnsRef, PinnedProcess};
use tracing::{info, warn};

use super::cluster_view::{Claim, ClaimError};
use super::datapath::Datapath;
use super::liveness::endpoint_id;
use super::local::LocalEndpoint;
use super::reconcile::network_spec;
use super::Agent;
use crate::api::{AttachRequest, EndpointInfo, EndpointState};
use crate::docker::{labels, resolv_conf, Container, Engine};
use crate::ipam;
use crate::model::{self, BlockRecord, EndpointRecord};
use crate::names::check_dns_name;
use crate::record_check::check_ports;
use crate::store::{Compare, Store, Txn};

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

impl<S: Store, D: Datapath> Agent<S, D> {
    /// A namespace as the user named it: a path, `pid:N`, or a Docker container.
    pub(super) async fn resolve_target(&self, target: &str) -> Result<Target> {
        if target.starts_with('/') || target.starts_with("pid:") {
            let netns = NetnsRef::parse(target)?;
            let ino = self.datapath.identity(&netns).await?;
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
        if req.ports.is_empty() {
            req.ports = labels::ports_of(&c.labels).map_err(|e| anyhow!(e))?;
        }
        if req.dns.is_empty() {
            req.dns = c.dns_servers.clone();
        }
        let short = c.short_id().to_owned();
        if !req.aliases.contains(&short) {
            req.aliases.push(short);
        }
        let info = self.attach_target(req, target, c.in_service).await?;
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
        check_ports(&req.ports).map_err(|e| anyhow!(e))?;
        let mut network = self.view.read(|c| c.networks.get(&req.network).cloned());
        if network.is_none() {
            // Created on another host a moment ago? The watch may not have said yet.
            // The view takes the store's picture, not just this answer: the network
            // must be in it for the setup below to include it.
            if self.view.reload().await.is_ok() {
                network = self.view.read(|c| c.networks.get(&req.network).cloned());
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
        let _changes = self.changes.lock().await;
        let existing = self.local.read(|endpoints| {
            endpoints
                .values()
                .find(|e| e.record.id == id && e.record.network == network.name)
                .map(|e| e.record.clone())
        });
        if let Some(existing) = existing {
            info!(
                target = req.target,
                network = network.name,
                "already attached"
            );
            return Ok(self.endpoint_info(&existing));
        }
        let block = self.own_block(&network).await?;
        let taken = self.taken_addresses(&network.name);
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
            one_per_answer: req.one_per_answer,
            ports: req.ports.clone(),
        };
        let spec = network_spec(&network, block);
        let setup = self.network_ready(&spec).await?;
        let local = LocalEndpoint {
            record,
            netns,
            ino,
            upstreams: req.dns.clone(),
            docker_endpoint: None,
        };
        let endpoint = local.kernel_endpoint();
        if let Err(e) = self.datapath.attach(&spec, &endpoint).await {
            return Err(after_setup(e, setup)
                .context(format!("attaching {} to {:?}", req.target, network.name)));
        }
        let key = model::endpoint_key(&network.name, address);
        let txn = Txn::default()
            .when(Compare::Absent(key.clone()))
            .put(key.clone(), model::encode(&local.record));
        let stored = self.view.commit(txn).await;
        if !matches!(stored, Ok(true)) {
            if let Err(e) = self.datapath.detach(address).await {
                warn!(error = %e, %address, "undoing the attach failed; the next reconcile removes it");
            }
            return Err(match stored {
                Err(e) => anyhow!(
                    "{e}; nothing was attached (the store must be reachable to hand out an address)"
                ),
                _ => anyhow!("address {address} was taken in the store meanwhile; try again"),
            });
        }
        let info = self.endpoint_info(&local.record);
        self.local.insert(key, local);
        self.reconciler.attached(&spec, endpoint);
        self.publish_dns();
        self.local_endpoints_changed().await;
        info!(target = req.target, network = network.name, %address, "attached");
        Ok(info)
    }

    pub async fn detach(&self, target: &str, network: &str) -> Result<EndpointInfo> {
        let id = endpoint_id(self.resolve_target(target).await?.ino);
        let _changes = self.changes.lock().await;
        let (key, record) = self
            .local
            .read(|endpoints| {
                endpoints
                    .iter()
                    .find(|(_, e)| e.record.id == id && e.record.network == network)
                    .map(|(k, e)| (k.clone(), e.record.clone()))
            })
            .ok_or_else(|| {
                anyhow!("{target} is not attached to network {network:?} on this host")
            })?;
        self.retire(&key, "detached", Retire::StoreFirst).await?;
        info!(target, network, address = %record.address, "detached");
        Ok(self.endpoint_info(&record))
    }

    /// Removes endpoints of this host everywhere (kernel, DNS, local view, store)
    /// because their container died or their namespace is gone. Each is named by
    /// key and namespace identity, checked again under the lock: the address may
    /// have gone to a new endpoint since the namespace was found gone.
    pub(super) async fn remove_endpoints(&self, gone: Vec<(String, u64)>, why: &str) {
        if gone.is_empty() {
            return;
        }
        let _changes = self.changes.lock().await;
        for (key, ino) in gone {
            let same = self
                .local
                .read(|endpoints| endpoints.get(&key).is_some_and(|e| e.ino == ino));
            if same {
                info!(key, why, "removing an endpoint");
                let _ = self.retire(&key, why, Retire::KernelFirst).await;
            }
        }
    }

    /// Takes one endpoint of this host away: from the store, the kernel, the DNS and
    /// the local view. The caller holds `changes`.
    pub(super) async fn retire(&self, key: &str, why: &str, order: Retire) -> Result<()> {
        if order == Retire::StoreFirst {
            self.view
                .commit(Txn::default().delete(key))
                .await
                .map_err(|e| anyhow!("{e}; nothing was detached"))?;
        }
        if let Some(ep) = self.local.remove(key) {
            if let Err(e) = self.datapath.detach(ep.record.address).await {
                warn!(error = %e, key, why, "detach from the kernel failed; the next reconcile retries");
            }
            self.reconciler
                .detached(&ep.record.network, ep.record.address);
        }
        if order == Retire::KernelFirst {
            self.view.delete_or_owe(key).await;
        }
        self.publish_dns();
        self.local_endpoints_changed().await;
        Ok(())
    }

    /// This host's block of a network, taken from the subnet if it has none yet. The
    /// store's create-if-absent decides between hosts racing for the same block.
    pub(super) async fn own_block(&self, network: &model::NetworkRecord) -> Result<ipnet::Ipv4Net> {
        let node = &self.node;
        let claimed = self
            .view
            .claim(BLOCK_RETRIES, |c| {
                if let Some(b) = c.blocks_of(&network.name).find(|b| b.node == node.name) {
                    return Ok(Claim::Held(b.block));
                }
                let taken: BTreeSet<ipnet::Ipv4Net> =
                    c.blocks_of(&network.name).map(|b| b.block).collect();
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
                    node: node.name.clone(),
                    underlay: node.underlay,
                };
                Ok(Claim::Write {
                    key: model::block_key(&network.name, block),
                    bytes: model::encode(&record),
                    only_if_absent: true,
                    value: block,
                })
            })
            .await;
        match claimed {
            Ok(block) => Ok(block),
            Err(ClaimError::Refused(e)) => Err(e),
            Err(ClaimError::Store(e)) => Err(anyhow!("{e}; nothing was attached")),
            Err(e @ ClaimError::Contended(_)) => {
                bail!(
                    "network {:?}: could not take a block: {e}; try again",
                    network.name
                )
            }
        }
    }

    /// First endpoint of this network here (or the last apply was not complete): its
    /// device and peers come first. An apply that failed is returned as
    /// [`Agent::ensure_network_here`] returns it.
    pub(super) async fn network_ready(
        &self,
        spec: &netagent_overlay::NetworkSpec,
    ) -> Result<Option<netagent_overlay::Error>> {
        if self.reconciler.has_network(spec) {
            return Ok(None);
        }
        self.ensure_network_here(&spec.name).await
    }

    /// Sets up a network's device and peers on this host before its first endpoint.
    /// An apply that fails (possibly for another network's object) is returned for
    /// the attach to name if its own step fails too; a network that cannot be here
    /// at all is an error.
    pub(super) async fn ensure_network_here(
        &self,
        network: &str,
    ) -> Result<Option<netagent_overlay::Error>> {
        self.ensure_mesh().await;
        let desired = self.desired_state();
        if let Some(why) = self.reconciler.why_left_out(network) {
            bail!("network {network:?} cannot be set up on this host: {why}");
        }
        if !desired.networks.iter().any(|n| n.network.name == network) {
            let encrypted = self
                .view
                .read(|c| c.networks.get(network).is_some_and(|n| n.encrypted));
            if encrypted && self.mesh.address().is_none() {
                bail!("network {network:?} is encrypted and this host's mesh is not up (see the agent's log)");
            }
            bail!("network {network:?} has no block on this host");
        }
        // Device, gateway, peers and the firewall's view of the new network at once.
        match self.reconciler.apply(&self.datapath, desired, true).await {
            Ok(()) => Ok(None),
            Err(e) => Ok(Some(e)),
        }
    }

    /// The addresses of `network` no new endpoint may have: those in the store, this
    /// host's, those deleted here but not yet in the store (its record would refuse
    /// the address), and those the Docker driver handed out and not yet released.
    pub(super) fn taken_addresses(&self, network: &str) -> BTreeSet<Ipv4Addr> {
        let mut taken: BTreeSet<Ipv4Addr> = self
            .view
            .read(|c| c.endpoints_of(network).map(|e| e.address).collect());
        self.local.read(|endpoints| {
            taken.extend(endpoints.values().map(|e| e.record.address));
        });
        taken.extend(self.view.owed_addresses(network));
        taken.extend(self.docker_book.reserved_addresses());
        taken
    }

    pub(super) fn endpoint_info(&self, e: &EndpointRecord) -> EndpointInfo {
        let alive = self.view.read(|c| c.is_alive(&e.node));
        EndpointInfo {
            network: e.network.clone(),
            address: e.address,
            node: e.node.clone(),
            name: e.name.clone(),
            service: e.service.clone(),
            aliases: e.aliases.clone(),
            state: match (alive, e.in_service) {
                (false, _) => EndpointState::Down,
                (true, true) => EndpointState::Up,
                (true, false) => EndpointState::Unhealthy,
            },
            netns: (e.node == self.node.name).then(|| e.netns.clone()),
            container: e.container.clone(),
        }
    }
}

/// Which goes first when an endpoint is retired.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Retire {
    /// A detach asked for: the store must agree first, or nothing changes.
    StoreFirst,
    /// The namespace is gone: the kernel and DNS let go at once, and the store
    /// deletion is retried while the store is away.
    KernelFirst,
}

/// An endpoint's kernel step failed: the network's own setup failing before it is the
/// likely why, so it is said first.
pub(super) fn after_setup(
    e: netagent_overlay::Error,
    setup: Option<netagent_overlay::Error>,
) -> anyhow::Error {
    let e = anyhow::Error::new(e);
    match setup {
        Some(setup) => e.context(format!("setting up the network failed first: {setup}")),
        None => e,
    }
}
