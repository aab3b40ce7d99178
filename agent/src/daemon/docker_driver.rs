//! What Docker's network and IPAM driver calls do (`-d netagent --ipam-driver
//! netagent`). The engine creates a network on one host; the agent's Docker loop
//! learns its name from the engine's event and makes it a netagent network, which
//! every other host then mirrors ([`super::docker_mirror`]). Containers join through
//! the driver: the IPAM hands out an address of this host's block, and `Join` attaches
//! the sandbox as any namespace is attached, before the container's first process
//! runs. No call here asks the engine anything: the engine waits on its driver
//! during these calls.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use ipnet::Ipv4Net;
use netagent_overlay::NetnsRef;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::attach::{after_setup, Retire};
use super::datapath::Datapath;
use super::local::LocalEndpoint;
use super::reconcile::network_spec;
use super::Agent;
use crate::ipam::{self, NewNetwork};
use crate::model::{self, EndpointRecord, NetworkRecord};
use crate::store::{Compare, Store, Txn};
use netagent_overlay::block_gateway;

/// The IPAM's address space (Docker's name for a set of pools).
pub const ADDRESS_SPACE: &str = "netagent";
/// How long an address request waits for a network the engine created a moment ago
/// to reach the cluster view.
const NETWORK_WAIT: Duration = Duration::from_secs(5);
/// How long after a join the container's namespace may take to appear.
const SANDBOX_WAIT: Duration = Duration::from_secs(60);

/// What a join gives the engine: the interface to move into the container, and
/// the routes to give it (the subnet through this host's gateway).
pub(super) struct Joined {
    pub interface: String,
    pub gateway: Ipv4Addr,
    pub subnet: Ipv4Net,
}

/// A Docker endpoint's id in the store: the engine's endpoint id (its namespace is
/// not there yet when the endpoint is made).
fn docker_endpoint_id(endpoint: &str) -> String {
    let short: String = endpoint.chars().take(12).collect();
    format!("docker:{short}")
}
/// Driver options a netagent network takes (`-o`, Compose `driver_opts`).
const OPTIONS: &str = "encrypted=true|false, block_size=PREFIX, mtu=BYTES, vni=N";

/// What the engine told the driver, kept in `docker-driver.json`: the engine asks
/// again about networks and endpoints by id after either side restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Book {
    /// By Docker's network id.
    networks: BTreeMap<String, BookNetwork>,
    /// By Docker's endpoint id, from CreateEndpoint to DeleteEndpoint.
    endpoints: BTreeMap<String, BookEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BookNetwork {
    pub subnet: Ipv4Net,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The netagent network it was found to be; None until then.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BookEndpoint {
    network: String,
    address: Ipv4Addr,
}

/// The driver's memory: the book (on disk) and the addresses handed out but not
/// yet joined (in memory only: the engine releases them if the agent restarts
/// before its join, as the container fails to start).
pub(super) struct DriverBook {
    file: PathBuf,
    book: StdMutex<Book>,
    save: tokio::sync::Mutex<()>,
    reserved: StdMutex<BTreeSet<Ipv4Addr>>,
    /// Keys of this host's endpoints whose record the store has not taken yet.
    unrecorded: StdMutex<BTreeSet<String>>,
}

impl DriverBook {
    pub(super) async fn load(state_dir: &Path) -> Self {
        let file = state_dir.join("docker-driver.json");
        let book = match tokio::fs::read(&file).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %file.display(), error = %e, "unreadable; the driver starts without its record of Docker's networks");
                Book::default()
            }),
            Err(_) => Book::default(),
        };
        DriverBook {
            file,
            book: StdMutex::new(book),
            save: tokio::sync::Mutex::new(()),
            reserved: StdMutex::new(BTreeSet::new()),
            unrecorded: StdMutex::new(BTreeSet::new()),
        }
    }

    async fn change<R>(&self, f: impl FnOnce(&mut Book) -> R) -> R {
        let _one = self.save.lock().await;
        let (out, bytes) = {
            let mut book = self.book.lock().unwrap();
            let out = f(&mut book);
            (out, serde_json::to_vec_pretty(&*book).expect("plain data"))
        };
        let tmp = self.file.with_extension("json.tmp");
        let written = async {
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &self.file).await
        };
        if let Err(e) = written.await {
            warn!(path = %self.file.display(), error = %e, "cannot save the driver's record of Docker's networks");
        }
        out
    }

    pub(super) fn network(&self, id: &str) -> Option<BookNetwork> {
        self.book.lock().unwrap().networks.get(id).cloned()
    }

    /// Records that Docker's network `id` is netagent network `name`.
    pub(super) async fn matched(&self, id: &str, name: &str) {
        if self
            .network(id)
            .is_some_and(|n| n.name.as_deref() == Some(name))
        {
            return;
        }
        self.change(|b| {
            if let Some(n) = b.networks.get_mut(id) {
                n.name = Some(name.to_owned());
            }
        })
        .await;
    }

    /// The store missed this endpoint's record: written again once it is back.
    pub(super) fn owe_record(&self, key: &str) {
        self.unrecorded.lock().unwrap().insert(key.to_owned());
    }

    pub(super) fn owes_records(&self) -> bool {
        !self.unrecorded.lock().unwrap().is_empty()
    }

    pub(super) fn reserved_addresses(&self) -> BTreeSet<Ipv4Addr> {
        self.reserved.lock().unwrap().clone()
    }
}

/// The subnet of a pool id (`netagent/<subnet>`).
fn pool_subnet(pool_id: &str) -> Result<Ipv4Net> {
    pool_id
        .strip_prefix("netagent/")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("pool {pool_id:?} is not one of netagent's"))
}

/// The driver options, checked: only those netagent knows, with values it takes.
fn network_options(options: &BTreeMap<String, String>) -> Result<NewNetwork> {
    let mut new = NewNetwork {
        name: "docker".into(),
        subnet: Ipv4Net::default(),
        vni: None,
        block_prefix: None,
        mtu: None,
        encrypted: false,
    };
    for (key, value) in options {
        let bad = || {
            anyhow!("driver option {key}={value:?} is not valid; netagent networks take: {OPTIONS}")
        };
        match key.as_str() {
            "encrypted" => new.encrypted = value.parse().map_err(|_| bad())?,
            "block_size" => new.block_prefix = Some(value.parse().map_err(|_| bad())?),
            "mtu" => new.mtu = Some(value.parse().map_err(|_| bad())?),
            "vni" => new.vni = Some(value.parse().map_err(|_| bad())?),
            _ => bail!("unknown driver option {key:?}; netagent networks take: {OPTIONS}"),
        }
    }
    Ok(new)
}

/// The driver options that make a Docker network the same as netagent network `n`.
pub(super) fn options_of(n: &NetworkRecord) -> std::collections::HashMap<String, String> {
    let mut options = std::collections::HashMap::new();
    if n.encrypted {
        options.insert("encrypted".into(), "true".into());
    }
    options
}

impl<S: Store, D: Datapath> Agent<S, D> {
    /// IpamDriver.RequestPool: the subnet asked for becomes the pool.
    pub(super) async fn docker_request_pool(
        &self,
        pool: &str,
        v6: bool,
    ) -> Result<(String, Ipv4Net)> {
        if v6 {
            bail!("netagent networks are IPv4 only; leave out --ipv6");
        }
        if pool.is_empty() {
            bail!("a netagent network needs a subnet: docker network create -d netagent --ipam-driver netagent --subnet CIDR NAME");
        }
        let subnet: Ipv4Net = pool
            .parse()
            .map_err(|_| anyhow!("subnet {pool:?} is not an IPv4 CIDR such as 10.20.0.0/16"))?;
        if subnet != subnet.trunc() {
            bail!("subnet {subnet} has host bits set; use {}", subnet.trunc());
        }
        let overlapping = self.view.read(|c| {
            c.networks
                .values()
                .find(|n| {
                    n.subnet != subnet
                        && (n.subnet.contains(&subnet.network())
                            || subnet.contains(&n.subnet.network()))
                })
                .map(|n| (n.name.clone(), n.subnet))
        });
        if let Some((name, other)) = overlapping {
            bail!("subnet {subnet} overlaps netagent network {name:?} ({other}); choose another subnet");
        }
        Ok((format!("netagent/{subnet}"), subnet))
    }

    /// IpamDriver.RequestAddress: an address of this host's block (`--ip` must be
    /// one), held until the endpoint joins or the engine releases it.
    pub(super) async fn docker_request_address(
        &self,
        pool_id: &str,
        wanted: &str,
        gateway: bool,
    ) -> Result<Ipv4Net> {
        let subnet = pool_subnet(pool_id)?;
        if gateway {
            bail!("netagent networks have a gateway on each host; leave out --gateway");
        }
        let wanted: Option<Ipv4Addr> = match wanted {
            "" => None,
            a => Some(
                a.parse()
                    .map_err(|_| anyhow!("address {a:?} is not an IPv4 address"))?,
            ),
        };
        let network = self.network_of_subnet(subnet).await?;
        let block = self.own_block(&network).await?;
        let _changes = self.changes.lock().await;
        let taken = self.taken_addresses(&network.name);
        let address = match wanted {
            Some(a) => {
                ipam::check_in_block(&network.name, block, a).map_err(|e| anyhow!(e))?;
                if taken.contains(&a) {
                    bail!("address {a} is in use on network {:?}", network.name);
                }
                a
            }
            None => ipam::free_address(block, &taken).ok_or_else(|| {
                anyhow!(
                    "network {:?}: this host's block {block} is full",
                    network.name
                )
            })?,
        };
        self.docker_book.reserved.lock().unwrap().insert(address);
        // A /32, as every attached namespace has: routed, never bridged.
        Ok(Ipv4Net::from(address))
    }

    /// IpamDriver.ReleaseAddress.
    pub(super) fn docker_release_address(&self, address: &str) {
        if let Ok(a) = address.split('/').next().unwrap_or_default().parse() {
            self.docker_book.reserved.lock().unwrap().remove(&a);
        }
    }

    /// The netagent network of `subnet`, waiting a little for one the engine has just
    /// created (its event may still be on the way).
    async fn network_of_subnet(&self, subnet: Ipv4Net) -> Result<NetworkRecord> {
        let deadline = tokio::time::Instant::now() + NETWORK_WAIT;
        loop {
            let found = self
                .view
                .read(|c| c.networks.values().find(|n| n.subnet == subnet).cloned());
            if let Some(n) = found {
                return Ok(n);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no netagent network has subnet {subnet} (is the store reachable? netagent status tells)");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// NetworkDriver.CreateNetwork: checked and recorded; the network becomes a
    /// netagent network (or is found to be one) once the engine's event names it.
    pub(super) async fn docker_create_network(
        &self,
        id: &str,
        address_space: Option<&str>,
        pool: Option<&str>,
        options: BTreeMap<String, String>,
        ipv6: bool,
    ) -> Result<()> {
        if ipv6 {
            bail!("netagent networks are IPv4 only; leave out --ipv6");
        }
        let (Some(ADDRESS_SPACE), Some(pool)) = (address_space, pool) else {
            bail!("a netagent network needs netagent's IPAM: docker network create -d netagent --ipam-driver netagent --subnet CIDR NAME (Compose: ipam: {{driver: netagent}})");
        };
        let subnet: Ipv4Net = pool
            .parse()
            .map_err(|_| anyhow!("pool {pool:?} is not an IPv4 CIDR"))?;
        let mut new = network_options(&options)?;
        new.subnet = subnet;
        // Everything a create would refuse, refused now: the same network again
        // (this host mirroring it) is fine.
        let existing: Vec<NetworkRecord> = self.view.read(|c| {
            c.networks
                .values()
                // The name is not known yet: only the subnet and options are checked.
                .filter(|n| n.subnet != subnet && n.name != new.name)
                .cloned()
                .collect()
        });
        ipam::plan_network(&new, existing.iter())?;
        self.docker_book
            .change(|b| {
                b.networks.entry(id.to_owned()).or_insert(BookNetwork {
                    subnet,
                    options,
                    name: None,
                });
            })
            .await;
        Ok(())
    }

    /// Makes Docker network `id`, created here as `name`, a netagent network.
    pub(super) async fn register_docker_network(&self, id: &str, name: &str) -> Result<()> {
        let book = self.docker_book.network(id).ok_or_else(|| {
            anyhow!("Docker network {name:?} was not created through netagent's driver")
        })?;
        let mut new = network_options(&book.options)?;
        new.name = name.to_owned();
        new.subnet = book.subnet;
        self.create_network(&new).await?;
        self.docker_book.matched(id, name).await;
        Ok(())
    }

    /// NetworkDriver.DeleteNetwork: `docker network rm` removes the netagent
    /// network everywhere. The engine removes its own object whatever the driver
    /// says; a network still in use on another host stays, and this host's Docker
    /// network is made again by the mirror.
    pub(super) async fn docker_delete_network(&self, id: &str) -> Result<()> {
        let entry = self.docker_book.change(|b| b.networks.remove(id)).await;
        let Some(BookNetwork {
            subnet,
            name: Some(name),
            ..
        }) = entry
        else {
            return Ok(());
        };
        let exists = self
            .view
            .read(|c| c.networks.get(&name).is_some_and(|n| n.subnet == subnet));
        if !exists {
            return Ok(());
        }
        self.remove_network(&name, false).await.map(|_| ()).map_err(|e| {
            warn!(network = name, error = %e, "docker network rm: the netagent network stays; its Docker network here is made again");
            e
        })
    }

    /// NetworkDriver.CreateEndpoint: the address IPAM gave is recorded for the join.
    pub(super) async fn docker_create_endpoint(
        &self,
        network_id: &str,
        endpoint_id: &str,
        address: &str,
        mac: &str,
    ) -> Result<()> {
        if !mac.is_empty() {
            bail!("netagent networks give each container its MAC address; leave out --mac-address");
        }
        if self.docker_book.network(network_id).is_none() {
            bail!("Docker network {network_id} is unknown to netagent; remove it and create it again with -d netagent --ipam-driver netagent");
        }
        let address: Ipv4Addr = address
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| anyhow!("endpoint {endpoint_id} has no IPv4 address; netagent's IPAM must give it one (--ipam-driver netagent)"))?;
        self.docker_book
            .change(|b| {
                b.endpoints.insert(
                    endpoint_id.to_owned(),
                    BookEndpoint {
                        network: network_id.to_owned(),
                        address,
                    },
                )
            })
            .await;
        Ok(())
    }

    /// NetworkDriver.DeleteEndpoint.
    pub(super) async fn docker_delete_endpoint(&self, endpoint_id: &str) -> Result<()> {
        self.docker_leave(endpoint_id).await?;
        self.docker_book
            .change(|b| b.endpoints.remove(endpoint_id))
            .await;
        Ok(())
    }

    /// NetworkDriver.Join. The container's namespace does not exist yet (Docker
    /// makes it when the container's process is created, after the join): the pair
    /// is made and routed on the host, the engine moves its other end in and gives
    /// it the address and routes returned here, and the DNS follows as soon as the
    /// namespace appears ([`Agent::finish_docker_join`]). Docker gives the container
    /// its default route (its gateway bridge, which also carries `-p` ports).
    pub(super) async fn docker_join(
        self: &Arc<Self>,
        network_id: &str,
        endpoint_id: &str,
        sandbox_key: &str,
    ) -> Result<Joined> {
        let (net, ep) = {
            let book = self.docker_book.book.lock().unwrap();
            (
                book.networks.get(network_id).cloned(),
                book.endpoints.get(endpoint_id).cloned(),
            )
        };
        let (Some(net), Some(ep)) = (net, ep) else {
            bail!("endpoint {endpoint_id} was not created through netagent; start the container again");
        };
        if !sandbox_key.starts_with('/') {
            bail!("sandbox {sandbox_key:?} is not a namespace path");
        }
        let network = self.network_of_subnet(net.subnet).await?;
        if net.name.as_ref().is_some_and(|name| name != &network.name) {
            bail!(
                "Docker network {:?} is no longer a netagent network (its subnet is {:?}'s now); remove it and create it again",
                net.name.unwrap_or_default(),
                network.name
            );
        }
        let block = self.own_block(&network).await?;
        let joined = self
            .join_prepared(&network, block, endpoint_id, ep.address, sandbox_key)
            .await;
        // Held until now: no other request may take the address meanwhile.
        self.docker_book
            .reserved
            .lock()
            .unwrap()
            .remove(&ep.address);
        let (key, peer, owed) = joined?;
        self.docker_book.matched(network_id, &network.name).await;
        info!(network = network.name, address = %ep.address, endpoint = endpoint_id, "Docker endpoint joined");
        if owed {
            self.docker_book.owe_record(&key);
        }
        let agent = self.clone();
        let netns = NetnsRef::Path(PathBuf::from(sandbox_key));
        self.spawn(async move { agent.finish_docker_join(key, netns).await });
        let gateway = block_gateway(&block);
        Ok(Joined {
            interface: peer,
            gateway,
            subnet: network.subnet,
        })
    }

    /// The kernel and the store for a join, under the agent's `changes` lock.
    async fn join_prepared(
        &self,
        network: &NetworkRecord,
        block: Ipv4Net,
        endpoint_id: &str,
        address: Ipv4Addr,
        sandbox_key: &str,
    ) -> Result<(String, String, bool)> {
        let _changes = self.changes.lock().await;
        let key = model::endpoint_key(&network.name, address);
        let joined = self.local.read(|endpoints| {
            endpoints
                .get(&key)
                .is_some_and(|e| e.docker_endpoint.as_deref() == Some(endpoint_id))
        });
        ipam::check_in_block(&network.name, block, address).map_err(|e| anyhow!(e))?;
        let in_use = self
            .view
            .read(|c| c.endpoints_of(&network.name).any(|e| e.address == address))
            || self.local.read(|endpoints| endpoints.contains_key(&key));
        if in_use && !joined {
            bail!("address {address} is in use on network {:?}", network.name);
        }
        let record = EndpointRecord {
            network: network.name.clone(),
            address,
            node: self.node.name.clone(),
            id: docker_endpoint_id(endpoint_id),
            netns: sandbox_key.to_owned(),
            name: None,
            service: None,
            aliases: Vec::new(),
            in_service: true,
            container: None,
            one_per_answer: false,
            ports: Vec::new(),
        };
        let spec = network_spec(network, block);
        let setup = self.network_ready(&spec).await?;
        let local = LocalEndpoint {
            record,
            netns: NetnsRef::Path(PathBuf::from(sandbox_key)),
            // Known once the namespace exists.
            ino: 0,
            upstreams: Vec::new(),
            docker_endpoint: Some(endpoint_id.to_owned()),
        };
        let endpoint = local.kernel_endpoint();
        let peer = match self
            .datapath
            .prepare_docker_endpoint(&spec, &endpoint)
            .await
        {
            Ok(peer) => peer,
            Err(e) => return Err(after_setup(e, setup)),
        };
        let mut owed = false;
        if !joined {
            let txn = Txn::default()
                .when(Compare::Absent(key.clone()))
                .put(key.clone(), model::encode(&local.record));
            match self.view.commit(txn).await {
                Ok(true) => {}
                // The address is of this host's own block, which no other host hands
                // out: the container starts, and its record follows the store's return.
                Err(e) => {
                    warn!(%address, network = network.name, error = %e, "the store is away: the container starts with its address, and its record is written when the store is back");
                    owed = true;
                }
                Ok(false) => {
                    if let Err(e) = self.datapath.detach(address).await {
                        warn!(error = %e, %address, "undoing the join failed; the next reconcile removes it");
                    }
                    bail!("address {address} was taken in the store meanwhile; start the container again");
                }
            }
            self.local.insert(key.clone(), local);
            self.reconciler.attached(&spec, endpoint);
            self.publish_dns();
            self.local.save().await;
        }
        Ok((key, peer, owed))
    }

    /// Writes the records of this host's endpoints that the store missed (a join or
    /// a naming while it was away), from what this host holds now; each until the
    /// store takes it, or the endpoint has gone.
    pub(super) async fn write_unrecorded(&self) {
        let keys: Vec<String> = self
            .docker_book
            .unrecorded
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect();
        for key in keys {
            let _changes = self.changes.lock().await;
            let Some(record) = self
                .local
                .read(|endpoints| endpoints.get(&key).map(|e| e.record.clone()))
            else {
                self.docker_book.unrecorded.lock().unwrap().remove(&key);
                continue;
            };
            let txn = Txn::default().put(key.clone(), model::encode(&record));
            if self.view.commit(txn).await.is_err() {
                return;
            }
            info!(key, "store back: the endpoint's record is written");
            self.docker_book.unrecorded.lock().unwrap().remove(&key);
            self.publish_dns();
        }
    }

    /// Once the container's namespace exists: its DNS listener, then the rules that
    /// keep Docker's resolver off port 53. Raced against the container's first
    /// process; a query that wins the race is answered by Docker's resolver (this
    /// host's replicas), every later one by the embedded DNS.
    pub(super) async fn finish_docker_join(self: Arc<Self>, key: String, netns: NetnsRef) {
        let ino = match self.datapath.wait_for_namespace(&netns, SANDBOX_WAIT).await {
            Ok(ino) => ino,
            Err(e) => {
                warn!(key, error = %e, "the container's namespace never appeared; its endpoint stays without DNS until it leaves");
                return;
            }
        };
        if self.host_namespaces.contains(&ino) {
            warn!(key, netns = %netns, "the sandbox is the host's own namespace; it gets no DNS listener");
            return;
        }
        {
            let _changes = self.changes.lock().await;
            if !self.local.set_identity(&key, &netns, ino) {
                return;
            }
            self.local_endpoints_changed().await;
        }
        if let Err(e) = self.datapath.divert_docker_dns(&netns, ino).await {
            warn!(key, error = %e, "cannot keep Docker's resolver off port 53: the container gets this host's replicas only from it");
        }
    }

    /// NetworkDriver.Leave: the endpoint goes, kernel first (the sandbox is going).
    pub(super) async fn docker_leave(&self, endpoint_id: &str) -> Result<()> {
        let _changes = self.changes.lock().await;
        let key = self.local.read(|endpoints| {
            endpoints
                .iter()
                .find(|(_, e)| e.docker_endpoint.as_deref() == Some(endpoint_id))
                .map(|(k, _)| k.clone())
        });
        if let Some(key) = key {
            let held = self
                .local
                .read(|endpoints| endpoints.get(&key).map(|e| e.record.address));
            self.retire(&key, "left its Docker network", Retire::KernelFirst)
                .await?;
            // The engine holds the address until its ReleaseAddress: nobody else
            // gets it before.
            if let Some(address) = held {
                self.docker_book.reserved.lock().unwrap().insert(address);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_options_are_netagent_s_own_or_refused() {
        let opts = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let n = network_options(&opts(&[("encrypted", "true"), ("block_size", "26")])).unwrap();
        assert!(n.encrypted);
        assert_eq!(n.block_prefix, Some(26));
        let e = network_options(&opts(&[("nosuchoption", "1")])).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown driver option \"nosuchoption\""),
            "{e}"
        );
        assert!(e.to_string().contains("encrypted=true|false"), "{e}");
        let e = network_options(&opts(&[("encrypted", "yes")])).unwrap_err();
        assert!(
            e.to_string().contains("encrypted=\"yes\" is not valid"),
            "{e}"
        );
    }

    #[test]
    fn pool_ids_name_a_subnet() {
        assert_eq!(
            pool_subnet("netagent/100.80.0.0/16").unwrap(),
            "100.80.0.0/16".parse::<Ipv4Net>().unwrap()
        );
        assert!(pool_subnet("LocalDefault/172.18.0.0/16").is_err());
    }
}
