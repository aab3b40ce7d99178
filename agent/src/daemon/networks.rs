//! Creating and removing networks. Every create and remove bumps `meta/networks`
//! in the same transaction, and only succeeds if nobody bumped it since this host
//! read the networks: two hosts creating overlapping subnets at once cannot both win.

use anyhow::{anyhow, bail, Result};
use tracing::info;

use super::datapath::Datapath;
use super::Agent;
use crate::api::{BlockInfo, NetworkInfo};
use crate::ipam::{self, NewNetwork};
use crate::model::{self, Cluster, NetworkRecord, BLOCKS, ENDPOINTS, NETWORKS_GUARD};
use crate::store::{Compare, Store, Txn};

const RETRIES: usize = 5;

impl<S: Store, D: Datapath> Agent<S, D> {
    pub async fn create_network(&self, new: &NewNetwork) -> Result<NetworkInfo> {
        for _ in 0..RETRIES {
            let cluster = self.fresh_cluster().await?;
            let record = ipam::plan_network(new, cluster.networks.values())?;
            let (guard, next) = guard_step(&cluster);
            let txn = Txn::default()
                .when(guard)
                .when(Compare::Absent(model::network_key(&record.name)))
                .put(NETWORKS_GUARD, next)
                .put(model::network_key(&record.name), model::encode(&record));
            if self.view.commit(txn).await? {
                info!(network = record.name, subnet = %record.subnet, vni = record.vni, "network created");
                return Ok(network_info(&cluster, &record));
            }
        }
        bail!(
            "network {:?}: the store kept changing under the create; try again",
            new.name
        )
    }

    pub async fn remove_network(&self, name: &str, force: bool) -> Result<NetworkInfo> {
        for _ in 0..RETRIES {
            let cluster = self.fresh_cluster().await?;
            let record = cluster
                .networks
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(name))?;
            let attached: Vec<&model::EndpointRecord> = cluster.endpoints_of(name).collect();
            if !attached.is_empty() && !force {
                let mut nodes: Vec<&str> = attached.iter().map(|e| e.node.as_str()).collect();
                nodes.sort();
                nodes.dedup();
                bail!(
                    "network {name:?} has {} endpoint(s) attached (on {}); detach them first, or remove anyway with: netagent network rm {name} --force",
                    attached.len(),
                    nodes.join(", ")
                );
            }
            let (guard, next) = guard_step(&cluster);
            let txn = Txn::default()
                .when(guard)
                .put(NETWORKS_GUARD, next)
                .delete(model::network_key(name))
                .delete_prefix(format!("{BLOCKS}{name}/"))
                .delete_prefix(format!("{ENDPOINTS}{name}/"));
            if self.view.commit(txn).await? {
                info!(network = name, force, "network removed");
                return Ok(network_info(&cluster, &record));
            }
        }
        bail!("network {name:?}: the store kept changing under the remove; try again")
    }

    pub fn list_networks(&self) -> Vec<NetworkInfo> {
        self.view
            .read(|c| c.networks.values().map(|n| network_info(c, n)).collect())
    }

    pub fn inspect_network(&self, name: &str) -> Result<NetworkInfo> {
        self.view.read(|c| {
            let n = c.networks.get(name).ok_or_else(|| not_found(name))?;
            Ok(network_info(c, n))
        })
    }

    /// The store as it is now (decisions about networks never use a cached view).
    async fn fresh_cluster(&self) -> Result<Cluster> {
        self.view
            .fresh()
            .await
            .map_err(|e| anyhow!("{e}; networks cannot be changed while the store is away"))
    }
}

fn not_found(name: &str) -> anyhow::Error {
    anyhow!(
        "network {name:?} not found; create it with: netagent network create {name} --subnet CIDR"
    )
}

/// The guard condition matching what was read, and the guard's next value.
fn guard_step(c: &Cluster) -> (Compare, Vec<u8>) {
    match &c.networks_guard {
        None => (Compare::Absent(NETWORKS_GUARD.into()), b"1".to_vec()),
        Some(v) => {
            let n: u64 = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (
                Compare::Value(NETWORKS_GUARD.into(), v.clone()),
                (n + 1).to_string().into_bytes(),
            )
        }
    }
}

fn network_info(c: &Cluster, n: &NetworkRecord) -> NetworkInfo {
    NetworkInfo {
        name: n.name.clone(),
        subnet: n.subnet,
        vni: n.vni,
        encrypted: n.encrypted,
        mtu: n.mtu,
        block_prefix: n.block_prefix,
        blocks: c
            .blocks_of(&n.name)
            .map(|b| BlockInfo {
                block: b.block,
                node: b.node.clone(),
            })
            .collect(),
        endpoints: c.endpoints_of(&n.name).count(),
    }
}
