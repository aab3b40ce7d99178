//! The plugin socket's calls handed to the agent. The socket is served from the
//! process's first moments (a dockerd starting with containers on netagent networks
//! must not wait on a silent plugin); until the agent has read the store, each call
//! is answered at once with what the agent waits for.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use super::datapath::{Datapath, KernelDatapath};
use super::Agent;
use crate::plugin::protocol::{
    CreateEndpointRequest, CreateEndpointResponse, CreateNetworkRequest, DeleteEndpointRequest,
    DeleteNetworkRequest, EndpointInfoRequest, EndpointInfoResponse, InterfaceName, JoinRequest,
    JoinResponse, LeaveRequest, ReleaseAddressRequest, ReleasePoolRequest, RequestAddressRequest,
    RequestAddressResponse, RequestPoolRequest, RequestPoolResponse, StaticRoute, ROUTE_CONNECTED,
    ROUTE_NEXT_HOP,
};
use crate::plugin::{Driver, Reply};
use crate::store::{Store, StoreHealth};

/// The gateway Docker is told a pool has, so that it takes none of its own from the
/// pool: every host has its own gateway, and containers route through their host.
const NO_GATEWAY: &str = "0.0.0.0/0";

/// The agent once it runs; before that, why calls cannot be served yet.
pub struct PluginDriver<S: Store, D: Datapath = KernelDatapath> {
    agent: OnceLock<Arc<Agent<S, D>>>,
    health: tokio::sync::watch::Receiver<StoreHealth>,
}

impl<S: Store, D: Datapath> PluginDriver<S, D> {
    pub fn new(health: tokio::sync::watch::Receiver<StoreHealth>) -> Self {
        PluginDriver {
            agent: OnceLock::new(),
            health,
        }
    }

    /// The agent is up: calls go to it from now on.
    pub fn running(&self, agent: Arc<Agent<S, D>>) {
        let _ = self.agent.set(agent);
    }

    fn agent(&self) -> Result<&Arc<Agent<S, D>>, String> {
        self.agent.get().ok_or_else(|| {
            let h = self.health.borrow();
            match &h.error {
                Some(e) => format!("netagent is starting: waiting for the cluster store ({e}); try again when `netagent status` says ok"),
                None => "netagent is starting; try again in a moment".to_owned(),
            }
        })
    }
}

/// An agent error as Docker shows it: the whole chain, one line.
fn say(e: anyhow::Error) -> String {
    format!("{e:#}")
}

impl<S: Store, D: Datapath> Driver for PluginDriver<S, D> {
    fn request_pool(&self, r: RequestPoolRequest) -> Reply<'_, RequestPoolResponse> {
        Box::pin(async move {
            let (pool_id, subnet) = self
                .agent()?
                .docker_request_pool(&r.pool, r.v6)
                .await
                .map_err(say)?;
            Ok(RequestPoolResponse {
                pool_id,
                pool: subnet.to_string(),
                data: [(
                    "com.docker.network.gateway".to_owned(),
                    NO_GATEWAY.to_owned(),
                )]
                .into(),
            })
        })
    }

    fn release_pool(&self, _r: ReleasePoolRequest) -> Reply<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn request_address(&self, r: RequestAddressRequest) -> Reply<'_, RequestAddressResponse> {
        Box::pin(async move {
            let gateway = r.options.get("RequestAddressType").map(String::as_str)
                == Some("com.docker.network.gateway");
            let address = self
                .agent()?
                .docker_request_address(&r.pool_id, &r.address, gateway)
                .await
                .map_err(say)?;
            Ok(RequestAddressResponse {
                address: address.to_string(),
                data: Default::default(),
            })
        })
    }

    fn release_address(&self, r: ReleaseAddressRequest) -> Reply<'_, ()> {
        Box::pin(async move {
            self.agent()?.docker_release_address(&r.address);
            Ok(())
        })
    }

    fn create_network(&self, r: CreateNetworkRequest) -> Reply<'_, ()> {
        Box::pin(async move {
            let agent = self.agent()?;
            let v4 = r.ipv4_data.first();
            let options: BTreeMap<String, String> = r.generic_options().into_iter().collect();
            let ipv6 = r.enable_ipv6().unwrap_or(false) || !r.ipv6_data.is_empty();
            if r.internal() {
                return Err("netagent networks cannot be --internal (internal: true) yet: their copies on the other hosts would have egress; leave it out".into());
            }
            agent
                .docker_create_network(
                    &r.network_id,
                    v4.map(|d| d.address_space.as_str()),
                    v4.map(|d| d.pool.as_str()),
                    options,
                    ipv6,
                )
                .await
                .map_err(say)
        })
    }

    fn delete_network(&self, r: DeleteNetworkRequest) -> Reply<'_, ()> {
        Box::pin(async move {
            self.agent()?
                .docker_delete_network(&r.network_id)
                .await
                .map_err(say)
        })
    }

    fn create_endpoint(&self, r: CreateEndpointRequest) -> Reply<'_, CreateEndpointResponse> {
        Box::pin(async move {
            let address = r
                .interface
                .as_ref()
                .map(|i| i.address.as_str())
                .unwrap_or("");
            let mac = r
                .interface
                .as_ref()
                .map(|i| i.mac_address.as_str())
                .unwrap_or("");
            self.agent()?
                .docker_create_endpoint(&r.network_id, &r.endpoint_id, address, mac)
                .await
                .map_err(say)?;
            // Nothing echoed back: the engine rolls back an endpoint whose driver
            // returns fields the engine supplied.
            Ok(CreateEndpointResponse { interface: None })
        })
    }

    fn delete_endpoint(&self, r: DeleteEndpointRequest) -> Reply<'_, ()> {
        Box::pin(async move {
            self.agent()?
                .docker_delete_endpoint(&r.endpoint_id)
                .await
                .map_err(say)
        })
    }

    fn endpoint_info(&self, _r: EndpointInfoRequest) -> Reply<'_, EndpointInfoResponse> {
        Box::pin(async { Ok(EndpointInfoResponse::default()) })
    }

    fn join(&self, r: JoinRequest) -> Reply<'_, JoinResponse> {
        Box::pin(async move {
            let joined = self
                .agent()?
                .docker_join(&r.network_id, &r.endpoint_id, &r.sandbox_key)
                .await
                .map_err(say)?;
            // The interface gets the address as a /32 (the IPAM's answer) and
            // reaches the subnet through this host's gateway, as every attached
            // namespace does. No default gateway: the engine then adds its gateway
            // bridge, which gives the container egress and its published ports.
            Ok(JoinResponse {
                interface_name: Some(InterfaceName {
                    src_name: joined.interface,
                    dst_prefix: "eth".into(),
                }),
                static_routes: vec![
                    StaticRoute {
                        destination: format!("{}/32", joined.gateway),
                        route_type: ROUTE_CONNECTED,
                        next_hop: String::new(),
                    },
                    StaticRoute {
                        destination: joined.subnet.to_string(),
                        route_type: ROUTE_NEXT_HOP,
                        next_hop: joined.gateway.to_string(),
                    },
                ],
                ..Default::default()
            })
        })
    }

    fn leave(&self, r: LeaveRequest) -> Reply<'_, ()> {
        Box::pin(async move {
            self.agent()?
                .docker_leave(&r.endpoint_id)
                .await
                .map_err(say)
        })
    }
}
