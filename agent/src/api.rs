//! The local API: one JSON request per line on a unix socket (mode 0600), one JSON
//! reply per line. The CLI is its only client today; scripts may use it directly:
//! `echo '{"op":"status"}' | socat - UNIX:/run/netagent/netagent.sock`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ipam::NewNetwork;
use crate::store::StoreHealth;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    NetworkCreate(NewNetwork),
    NetworkList,
    NetworkInspect {
        name: String,
    },
    NetworkRemove {
        name: String,
        #[serde(default)]
        force: bool,
    },
    Attach(AttachRequest),
    Detach {
        target: String,
        network: String,
    },
    Peers,
    Services {
        #[serde(default)]
        network: Option<String>,
    },
    Endpoints,
    /// Replace this host's WireGuard key (peers pick the new one up from the store).
    RotateKey,
    /// Every node the store knows of: up, or gone and what it still holds.
    NodeList,
    /// Remove a gone node's blocks, endpoints and mesh record everywhere.
    NodeRemove {
        name: String,
    },
}

/// `netagent attach TARGET NETWORK [--name] [--service] [--alias]... [--port]...`; the target is
/// a namespace path, `pid:N`, or a running Docker container's name or id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachRequest {
    pub target: String,
    pub network: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The service's name answers one replica at a time, rotating.
    #[serde(default)]
    pub one_per_answer: bool,
    /// Named ports, answered as DNS SRV records (for a container without any: its
    /// `netagent.ports` label).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::model::Port>,
    /// The namespace's own DNS servers for names outside its networks (for a
    /// container without any: its `--dns`); empty: the host's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::SocketAddr>,
}

/// One reply line. The content of `Ok` is the response's content alone (the request
/// says which kind it is), so scripts read `{"ok": {...}}` with no envelope.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
}

/// What a request answers with; each request has one kind of response.
#[derive(Clone, Debug)]
pub enum Response {
    /// `Status`.
    Status(Status),
    /// `NetworkCreate`, `NetworkInspect`, `NetworkRemove`: the network (as it was,
    /// for a remove).
    Network(NetworkInfo),
    /// `NetworkList`.
    Networks(Vec<NetworkInfo>),
    /// `Attach`, `Detach`.
    Endpoint(EndpointInfo),
    /// `Endpoints`: every endpoint in the cluster.
    Endpoints(Vec<EndpointInfo>),
    /// `Peers`.
    Peers(Vec<PeerInfo>),
    /// `Services`.
    Services(Vec<ServiceInfo>),
    /// `RotateKey`.
    Key(KeyInfo),
    /// `NodeList`.
    Nodes(Vec<NodeInfo>),
    /// `NodeRemove`: the node as it was.
    Node(NodeInfo),
}

impl Response {
    /// Reads the content of a reply to `request` as its kind of response.
    pub fn read(request: &Request, content: serde_json::Value) -> serde_json::Result<Response> {
        use serde_json::from_value as read;
        Ok(match request {
            Request::Status => Response::Status(read(content)?),
            Request::NetworkCreate(_)
            | Request::NetworkInspect { .. }
            | Request::NetworkRemove { .. } => Response::Network(read(content)?),
            Request::NetworkList => Response::Networks(read(content)?),
            Request::Attach(_) | Request::Detach { .. } => Response::Endpoint(read(content)?),
            Request::Endpoints => Response::Endpoints(read(content)?),
            Request::Peers => Response::Peers(read(content)?),
            Request::Services { .. } => Response::Services(read(content)?),
            Request::RotateKey => Response::Key(read(content)?),
            Request::NodeList => Response::Nodes(read(content)?),
            Request::NodeRemove { .. } => Response::Node(read(content)?),
        })
    }

    /// The response's content alone: what the socket carries and `--json` prints.
    pub fn content(&self) -> serde_json::Value {
        let value = match self {
            Response::Status(v) => serde_json::to_value(v),
            Response::Network(v) => serde_json::to_value(v),
            Response::Networks(v) => serde_json::to_value(v),
            Response::Endpoint(v) => serde_json::to_value(v),
            Response::Endpoints(v) => serde_json::to_value(v),
            Response::Peers(v) => serde_json::to_value(v),
            Response::Services(v) => serde_json::to_value(v),
            Response::Key(v) => serde_json::to_value(v),
            Response::Nodes(v) => serde_json::to_value(v),
            Response::Node(v) => serde_json::to_value(v),
        };
        value.expect("api types serialize")
    }
}

/// The agent as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// The store and (when enabled) the Docker engine are reached.
    Ok,
    /// The store or the Docker engine is unreachable: the datapath and the DNS keep
    /// serving the last known state.
    Degraded,
}

/// Another host, as this one sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Its lease in the store lives.
    Up,
    /// Its lease expired: its endpoints are left out of DNS answers.
    Down,
}

/// A node known to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Its lease in the store lives.
    Up,
    /// No lease: what it holds stays until `node rm` or the reclaim.
    Gone,
}

/// An endpoint, as DNS answers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    Up,
    /// Its node is down: left out of DNS answers.
    Down,
    /// Its container's health check fails: left out of service answers.
    Unhealthy,
}

macro_rules! display_as_serde_name {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let name = serde_json::to_value(self).expect("state serializes");
                f.write_str(name.as_str().unwrap_or("?"))
            }
        }
    )*};
}
display_as_serde_name!(AgentState, PeerState, EndpointState, NodeState);

/// A node as `node ls` shows it; times are Unix seconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub state: NodeState,
    /// While up: when its agent started.
    pub started: Option<u64>,
    /// While gone: since when, as the first agent to notice wrote it (None: not
    /// noticed yet).
    pub gone_since: Option<u64>,
    /// While gone: seconds until its blocks are reclaimed (None: up, not noticed
    /// yet, or reclaim is off on the answering agent).
    pub reclaim_in_secs: Option<u64>,
    /// Its underlay address, from its node record or its blocks.
    pub underlay: Option<Ipv4Addr>,
    pub blocks: Vec<NodeBlock>,
    pub endpoints: Vec<NodeEndpoint>,
    pub mesh_address: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeBlock {
    pub network: String,
    pub block: Ipv4Net,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEndpoint {
    pub network: String,
    pub address: Ipv4Addr,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyInfo {
    /// This host's new WireGuard public key.
    pub public_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub underlay: Ipv4Addr,
    pub version: String,
    pub uptime_secs: u64,
    pub store: StoreHealth,
    pub state: AgentState,
    pub networks: usize,
    pub local_endpoints: usize,
    pub endpoints: usize,
    pub peers_up: usize,
    pub peers_down: usize,
    /// None: Docker integration is off (`[docker] enabled = false`).
    #[serde(default)]
    pub docker: Option<DockerStatus>,
    /// This host's mesh address, while the encrypted mesh runs.
    #[serde(default)]
    pub mesh_address: Option<Ipv4Addr>,
    /// This host's WireGuard public key (the private key is never shown).
    pub public_key: String,
    /// Store records and networks left out of this host's view and datapath, each
    /// with why (the rest is applied).
    #[serde(default)]
    pub left_out: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DockerStatus {
    pub socket: String,
    pub connected: bool,
    /// The engine's version while connected.
    pub engine: Option<String>,
    /// Why it is not connected (retried every second).
    pub error: Option<String>,
    /// Labelled containers left alone, and why.
    pub problems: Vec<ContainerProblem>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerProblem {
    pub container: String,
    pub problem: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub subnet: Ipv4Net,
    pub vni: u32,
    pub encrypted: bool,
    pub mtu: Option<u32>,
    pub block_prefix: u8,
    pub blocks: Vec<BlockInfo>,
    pub endpoints: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockInfo {
    pub block: Ipv4Net,
    pub node: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub network: String,
    pub address: Ipv4Addr,
    pub node: String,
    pub name: Option<String>,
    pub service: Option<String>,
    pub aliases: Vec<String>,
    pub state: EndpointState,
    /// The namespace, on its own node only.
    pub netns: Option<String>,
    /// The Docker container's id, when it is one.
    #[serde(default)]
    pub container: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub network: String,
    pub service: String,
    /// Addresses of the replicas answered (live nodes, in service).
    pub replicas: Vec<Ipv4Addr>,
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    pub underlay: Ipv4Addr,
    pub state: PeerState,
    /// Round trip over the overlay (to the peer's gateway), when a network is shared.
    pub rtt_ms: Option<f64>,
    pub endpoints: usize,
    pub networks: Vec<String>,
    /// Its side of the encrypted mesh, when both hosts are on it.
    #[serde(default)]
    pub mesh: Option<MeshPeerInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeshPeerInfo {
    pub address: Ipv4Addr,
    /// Where its WireGuard packets come from (roaming followed).
    pub endpoint: String,
    pub public_key: String,
    /// Seconds since the last completed handshake; None: none yet.
    pub handshake_secs: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scripts read the socket's JSON: its shape is part of the interface.
    #[test]
    fn replies_and_states_have_a_stable_wire_form() {
        let key = Response::Key(KeyInfo {
            public_key: "k".into(),
        });
        let reply = Reply::Ok(key.content());
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(line, r#"{"ok":{"public_key":"k"}}"#);
        let Reply::Ok(content) = serde_json::from_str(&line).unwrap() else {
            panic!("an ok reply");
        };
        assert!(matches!(
            Response::read(&Request::RotateKey, content),
            Ok(Response::Key(k)) if k.public_key == "k"
        ));
        assert_eq!(
            serde_json::to_string(&Reply::Error("no".into())).unwrap(),
            r#"{"error":"no"}"#
        );
        assert_eq!(
            serde_json::to_string(&EndpointState::Unhealthy).unwrap(),
            r#""unhealthy""#
        );
        assert_eq!(PeerState::Down.to_string(), "down");
        assert_eq!(AgentState::Degraded.to_string(), "degraded");
        assert_eq!(NodeState::Gone.to_string(), "gone");
        let request: Request = serde_json::from_str(r#"{"op":"node_remove","name":"h3"}"#).unwrap();
        assert!(matches!(&request, Request::NodeRemove { name } if name == "h3"));
        assert_eq!(
            serde_json::to_string(&Request::NodeList).unwrap(),
            r#"{"op":"node_list"}"#
        );
        let gone = serde_json::json!([{
            "name": "h3", "state": "gone", "started": null, "gone_since": 5,
            "reclaim_in_secs": 10, "underlay": "192.0.2.13",
            "blocks": [{"network": "app", "block": "100.64.2.0/24"}],
            "endpoints": [{"network": "app", "address": "100.64.2.2", "name": null}],
            "mesh_address": null
        }]);
        let Ok(Response::Nodes(nodes)) = Response::read(&Request::NodeList, gone.clone()) else {
            panic!("a node list");
        };
        assert_eq!(nodes[0].state, NodeState::Gone);
        assert_eq!(Response::Nodes(nodes).content(), gone);
        let request: Request =
            serde_json::from_str(r#"{"op":"detach","target":"/run/netns/a","network":"app"}"#)
                .unwrap();
        assert!(
            matches!(request, Request::Detach { target, network } if target == "/run/netns/a" && network == "app")
        );
    }

    #[test]
    fn an_unknown_request_is_an_error_not_a_default() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }
}
