//! The engine's netagent networks: listed, created and removed by the agent's own
//! loop, never from inside a driver call (the engine waits on its driver there, and
//! a driver that calls back into it deadlocks it).

use std::collections::HashMap;

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use ipnet::Ipv4Net;

use super::{Engine, Result};

/// The driver's name, as `docker network create -d` and `--ipam-driver` give it.
pub const DRIVER: &str = "netagent";

/// A Docker network of netagent's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerNetwork {
    pub id: String,
    pub name: String,
    /// Its IPv4 subnet, as its IPAM configuration gives it.
    pub subnet: Option<Ipv4Net>,
    /// Driver options (`-o`, Compose `driver_opts`).
    pub options: HashMap<String, String>,
}

impl Engine {
    /// Every network of netagent's driver on this engine.
    pub async fn netagent_networks(&self) -> Result<Vec<DockerNetwork>> {
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("driver".into(), vec![DRIVER.into()])])),
        };
        let list = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|e| self.error("the network list", e))?;
        Ok(list
            .into_iter()
            .filter(|n| n.driver.as_deref() == Some(DRIVER))
            .filter_map(|n| {
                let subnet = n
                    .ipam
                    .and_then(|i| i.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.subnet?.parse().ok())
                    .next();
                Some(DockerNetwork {
                    id: n.id?,
                    name: n.name?,
                    subnet,
                    options: n.options.unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Creates a network of netagent's driver and IPAM on this engine; returns its id.
    pub async fn create_netagent_network(
        &self,
        name: &str,
        subnet: Ipv4Net,
        options: HashMap<String, String>,
    ) -> Result<String> {
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some(DRIVER.into()),
            attachable: Some(true),
            ipam: Some(Ipam {
                driver: Some(DRIVER.into()),
                config: Some(vec![IpamConfig {
                    subnet: Some(subnet.to_string()),
                    ..Default::default()
                }]),
                options: None,
            }),
            options: Some(options),
            ..Default::default()
        };
        let created = self
            .docker
            .create_network(request)
            .await
            .map_err(|e| self.error(&format!("network {name:?}"), e))?;
        Ok(created.id)
    }

    /// Removes a network (the engine refuses while containers are on it).
    pub async fn remove_network(&self, id: &str) -> Result<()> {
        self.docker
            .remove_network(id)
            .await
            .map_err(|e| self.error(&format!("network {id}"), e))
    }
}
