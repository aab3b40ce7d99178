//! Every netagent network as a Docker network on this host, so `docker run --network
//! NAME` and Compose's `external: true` work on every host whichever host created
//! it; and Docker networks of netagent's driver that no longer are (or never became)
//! netagent networks removed. Runs in the agent's Docker loop, never inside a driver
//! call, and gives the engine's containers their names once they start.

use std::collections::BTreeSet;

use tracing::{info, warn};

use super::datapath::Datapath;
use super::docker_driver::options_of;
use super::Agent;
use crate::docker::{labels, Container, DockerError, Engine};
use crate::model::{self, EndpointRecord, NetworkRecord};
use crate::names::check_dns_name;
use crate::record_check::MAX_ALIASES;
use crate::store::{Store, Txn};

/// What the mirror last made the engine match: the cluster's networks by name and
/// subnet. A pass runs again only when this changes (or the engine says something).
pub(super) type Mirrored = BTreeSet<(String, ipnet::Ipv4Net)>;

impl<S: Store, D: Datapath> Agent<S, D> {
    /// The cluster's networks as the mirror sees them.
    pub(super) fn networks_to_mirror(&self) -> Mirrored {
        self.view.read(|c| {
            c.networks
                .values()
                .map(|n| (n.name.clone(), n.subnet))
                .collect()
        })
    }

    /// One pass: this engine's netagent networks made to match the cluster's.
    pub(super) async fn mirror_networks(&self, engine: &Engine) -> Result<Mirrored, DockerError> {
        let wanted = self.networks_to_mirror();
        let cluster: Vec<NetworkRecord> =
            self.view.read(|c| c.networks.values().cloned().collect());
        let docker = engine.netagent_networks().await?;
        for d in &docker {
            match cluster.iter().find(|n| n.name == d.name) {
                Some(n) if Some(n.subnet) == d.subnet => {
                    self.docker_book.matched(&d.id, &n.name).await;
                }
                Some(n) => {
                    warn!(network = d.name, docker_subnet = ?d.subnet, subnet = %n.subnet, "a Docker network of netagent's driver has the name of a netagent network with another subnet; removing it");
                    self.remove_docker_network(engine, &d.id, &d.name).await?;
                }
                None if self
                    .docker_book
                    .network(&d.id)
                    .is_some_and(|b| b.name.is_none()) =>
                {
                    match self.register_docker_network(&d.id, &d.name).await {
                        Ok(()) => info!(
                            network = d.name,
                            "Docker network created here is now a netagent network"
                        ),
                        Err(e) => {
                            warn!(network = d.name, error = %format!("{e:#}"), "cannot make the Docker network a netagent network; removing it");
                            self.remove_docker_network(engine, &d.id, &d.name).await?;
                        }
                    }
                }
                None => {
                    info!(
                        network = d.name,
                        "netagent network gone; removing its Docker network"
                    );
                    self.remove_docker_network(engine, &d.id, &d.name).await?;
                }
            }
        }
        // Read again: a registration above added a network.
        let cluster: Vec<NetworkRecord> =
            self.view.read(|c| c.networks.values().cloned().collect());
        for n in &cluster {
            if docker.iter().any(|d| d.name == n.name) {
                continue;
            }
            match engine
                .create_netagent_network(&n.name, n.subnet, options_of(n))
                .await
            {
                Ok(id) => {
                    // Known as this network from now: never registered as a new one.
                    self.docker_book.matched(&id, &n.name).await;
                    info!(
                        network = n.name,
                        "netagent network mirrored as a Docker network"
                    )
                }
                Err(e @ DockerError::Unreachable { .. }) => return Err(e),
                Err(e) => {
                    warn!(network = n.name, error = %e, "cannot mirror the netagent network as a Docker network")
                }
            }
        }
        Ok(wanted)
    }

    async fn remove_docker_network(
        &self,
        engine: &Engine,
        id: &str,
        name: &str,
    ) -> Result<(), DockerError> {
        match engine.remove_network(id).await {
            Ok(()) | Err(DockerError::NotFound(_)) => Ok(()),
            Err(e @ DockerError::Unreachable { .. }) => Err(e),
            Err(e) => {
                warn!(network = name, error = %e, "cannot remove the Docker network (containers still on it?)");
                Ok(())
            }
        }
    }

    /// A started container's endpoints that joined through the driver get its
    /// names: the container's name, its Compose service, its aliases on each network
    /// (`--network-alias`, Compose `aliases:`) and its short id.
    pub(super) async fn name_driver_endpoints(&self, c: &Container) {
        // The container's endpoints that joined through the driver, by key: none for
        // most starts (labelled containers, other drivers), which then cost no lock.
        let driver_endpoint = |e: &super::local::LocalEndpoint| {
            e.docker_endpoint
                .as_deref()
                .and_then(|id| c.networks.iter().find(|n| n.endpoint_id == id))
        };
        let mine = |endpoints: &std::collections::BTreeMap<String, super::local::LocalEndpoint>| {
            endpoints
                .iter()
                .filter(|(_, e)| driver_endpoint(e).is_some())
                .map(|(k, _)| k.clone())
                .collect::<Vec<String>>()
        };
        if self.local.read(mine).is_empty() {
            return;
        }
        let service = labels::service_of(&c.labels);
        let _changes = self.changes.lock().await;
        let changed: Vec<(String, EndpointRecord)> = self.local.read(|endpoints| {
            endpoints
                .iter()
                .filter_map(|(key, e)| {
                    let on = driver_endpoint(e)?;
                    let mut aliases: Vec<String> = Vec::new();
                    for a in on.aliases.iter().map(String::as_str).chain([c.short_id()]) {
                        let repeated = a == c.name
                            || Some(a) == service.as_deref()
                            || aliases.iter().any(|x| x == a);
                        if repeated {
                            continue;
                        }
                        if aliases.len() == MAX_ALIASES {
                            warn!(
                                container = c.name,
                                "more than {MAX_ALIASES} aliases: the rest are left out of the DNS"
                            );
                            break;
                        }
                        match check_dns_name("alias", a) {
                            Ok(()) => aliases.push(a.to_owned()),
                            Err(why) => warn!(container = c.name, why, "alias left out of the DNS"),
                        }
                    }
                    let mut record = e.record.clone();
                    record.name = check_dns_name("name", &c.name).ok().map(|_| c.name.clone());
                    record.service = service
                        .clone()
                        .filter(|s| check_dns_name("service", s).is_ok());
                    record.aliases = aliases;
                    record.container = Some(c.id.clone());
                    record.in_service = c.in_service;
                    (record != e.record).then(|| (key.clone(), record))
                })
                .collect()
        });
        // Its own DNS servers (`--dns`, Compose `dns:`) stay its upstreams.
        let mut upstreams_changed = false;
        for key in self.local.read(mine) {
            upstreams_changed |= self.local.set_upstreams(&key, &c.dns_servers);
        }
        if upstreams_changed {
            self.local_endpoints_changed().await;
        }
        if changed.is_empty() {
            return;
        }
        for (key, record) in changed {
            let txn = Txn::default().put(key.clone(), model::encode(&record));
            match self.view.commit(txn).await {
                Ok(_) => {
                    info!(container = c.name, network = record.network, address = %record.address, "container named in the DNS");
                    self.local.update_record(&key, record);
                }
                Err(e) => {
                    warn!(key, error = %e, "cannot record the container's names yet; written when the store is back");
                    self.local.update_record(&key, record);
                    self.docker_book.owe_record(&key);
                }
            }
        }
        self.publish_dns();
    }
}
