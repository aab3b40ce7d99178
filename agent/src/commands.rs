//! The commands that are more than one API call: running the agent, resetting the
//! host, and turning API replies into tables.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use netagent_overlay::{Host, NetnsRef};
use tracing::{info, warn};

use crate::api::{MeshPeerInfo, Reply, Request, Response};
use crate::config::{Config, StoreConfig, DEFAULT_PATH};
use crate::daemon::{bind_api, serve_api, serve_requests, Agent, PluginDriver};
use crate::http::HttpEndpoint;
use crate::model;
use crate::store::{EtcdStore, LocalStore, Store, StoreTransport, Txn};
use crate::systemd::{summary, Notifier};
use crate::table::{or_dash, Table};

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path, path != Path::new(DEFAULT_PATH))
}

pub async fn run_agent(config: &Path) -> Result<()> {
    let cfg = load_config(config)?;
    // Two sockets per attached namespace, and copies of them for the keeper.
    netagent_overlay::raise_descriptor_limit();
    let listener = bind_api(&cfg.api_socket).await?;
    match cfg.store.clone() {
        StoreConfig::Local => {
            let store = LocalStore::open(&cfg.local_store_path()).await?;
            serve(cfg, store, listener).await
        }
        StoreConfig::Etcd {
            endpoints,
            prefix,
            credentials,
            ..
        } => {
            match credentials.transport() {
                StoreTransport::Plaintext => warn!(
                    endpoints = %endpoints.join(","),
                    "etcd over plaintext http: anyone who reaches it can read and change the cluster; use https:// with [store] ca_file, cert_file and key_file"
                ),
                StoreTransport::Tls if credentials.user.is_none() => warn!(
                    endpoints = %endpoints.join(","),
                    "etcd over TLS without a client certificate or user: this host shows etcd no credentials; set [store] cert_file and key_file"
                ),
                _ => {}
            }
            let store = EtcdStore::new(endpoints, prefix, &credentials).await?;
            serve(cfg, store, listener).await
        }
    }
}

/// The plugin socket's name in a systemd socket unit (`FileDescriptorName=`).
const PLUGIN_SOCKET_NAME: &str = "docker-plugin";

async fn serve<S: Store>(cfg: Config, store: S, listener: tokio::net::UnixListener) -> Result<()> {
    let socket = cfg.api_socket.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let health = store.health();
    let systemd = Notifier::from_env();
    let starting = systemd.report_starting(health.clone());
    // Answers health checks from the first moment, while the agent waits for its store.
    let http = match cfg.http_listen {
        Some(addr) => Some(HttpEndpoint::start(addr, &cfg.node, health.clone()).await?),
        None => None,
    };
    // Served before anything that may wait: dockerd blocks on a silent plugin.
    let driver = std::sync::Arc::new(PluginDriver::<S>::new(health.clone()));
    let inherited = cfg
        .docker_plugin_socket
        .as_ref()
        .and_then(|_| crate::systemd::listening_socket(PLUGIN_SOCKET_NAME));
    let plugin = match (&cfg.docker_plugin_socket, inherited) {
        (Some(_), Some(listener)) => {
            match crate::plugin::server::serve_inherited(listener, driver.clone()) {
                Ok(server) => Some(server),
                Err(e) => {
                    warn!(error = %e, "Docker's network driver is not served");
                    None
                }
            }
        }
        (Some(path), None) => match crate::plugin::server::serve(path, driver.clone()).await {
            Ok(server) => {
                info!(socket = %server.path().display(), "serving Docker's network and IPAM driver \"netagent\"");
                Some(server)
            }
            Err(e) => {
                warn!(error = %e, "Docker's network driver is not served; docker network create -d netagent will fail");
                None
            }
        },
        (None, _) => None,
    };
    let agent = tokio::select! {
        a = Agent::start(cfg, store) => a?,
        _ = answer_while_starting(&listener, health) => unreachable!("answers until dropped"),
        _ = starting => unreachable!("reports until dropped"),
        _ = tokio::signal::ctrl_c() => {
            systemd.stopping();
            return Ok(());
        }
        _ = term.recv() => {
            systemd.stopping();
            return Ok(());
        }
    };
    systemd.ready();
    let running = agent.clone();
    let reporting = tokio::spawn(
        systemd
            .clone()
            .report_running(move || summary(&running.status())),
    );
    if let Some(http) = &http {
        http.running(agent.clone());
    }
    driver.running(agent.clone());
    let api = tokio::spawn(serve_api(agent.clone(), listener));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    systemd.stopping();
    reporting.abort();
    // No request may open a listener again once they are closing.
    api.abort();
    drop(http);
    // Calls in flight end first; then dockerd finds no plugin until the next start.
    if let Some(plugin) = plugin {
        plugin.close().await;
    }
    agent.stop().await;
    // The kernel keeps forwarding and the lease lives on for its TTL: a restart
    // within it is invisible to the other hosts.
    let _ = std::fs::remove_file(&socket);
    info!("stopping; the datapath keeps forwarding");
    Ok(())
}

/// Until the agent has read the store, every API call is told what it waits for
/// (the store and why it cannot be reached) instead of waiting with it.
async fn answer_while_starting(
    listener: &tokio::net::UnixListener,
    health: tokio::sync::watch::Receiver<crate::store::StoreHealth>,
) {
    serve_requests(listener, move |_| {
        let h = health.borrow().clone();
        async move {
            Reply::Error(format!(
                "the agent is waiting for its cluster store ({} {}) before it serves: {}",
                h.kind,
                h.location,
                h.error.as_deref().unwrap_or("connecting")
            ))
        }
    })
    .await
}

pub async fn reset(config: &Path) -> Result<()> {
    let cfg = load_config(config)?;
    if tokio::net::UnixStream::connect(&cfg.api_socket)
        .await
        .is_ok()
    {
        bail!(
            "the agent is running (it answers on {}); stop it first: systemctl stop netagent",
            cfg.api_socket.display()
        );
    }
    let keeper = cfg.dns_keeper_socket.clone();
    match tokio::task::spawn_blocking(move || crate::keeper::stop_keeper(&keeper)).await? {
        Ok(true) => println!(
            "told the DNS socket keeper at {} to let go",
            cfg.dns_keeper_socket.display()
        ),
        Ok(false) => {}
        Err(e) => eprintln!("warning: the DNS socket keeper was not stopped: {e}"),
    }
    let host = Host::open(&NetnsRef::Current).await?;
    host.reset().await?;
    match &cfg.store {
        StoreConfig::Local => {
            let path = cfg.local_store_path();
            match std::fs::remove_file(&path) {
                Ok(()) => println!("removed {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bail!("cannot remove {}: {e}", path.display()),
            }
        }
        StoreConfig::Etcd {
            endpoints,
            prefix,
            credentials,
            ..
        } => {
            // This host's endpoints and blocks leave the cluster with it.
            let store = EtcdStore::new(endpoints.clone(), prefix.clone(), credentials).await?;
            let forget = async {
                let loaded = store.load().await?;
                let c = model::Cluster::from_loaded(&loaded);
                let mut txn = Txn::default().delete(model::node_key(&cfg.node));
                for e in c.endpoints.values().filter(|e| e.node == cfg.node) {
                    txn = txn.delete(model::endpoint_key(&e.network, e.address));
                }
                for b in c.blocks.values().filter(|b| b.node == cfg.node) {
                    txn = txn.delete(model::block_key(&b.network, b.block));
                }
                for m in c.mesh.values().filter(|m| m.node == cfg.node) {
                    txn = txn.delete(model::mesh_key(m.address));
                }
                store.txn(txn).await
            };
            match tokio::time::timeout(Duration::from_secs(5), forget).await {
                Ok(Ok(_)) => println!(
                    "removed node {:?}'s endpoints and blocks from etcd",
                    cfg.node
                ),
                Ok(Err(e)) => eprintln!("warning: {e}; this host's records stay in etcd"),
                Err(_) => {
                    eprintln!("warning: etcd did not answer; this host's records stay in etcd")
                }
            }
        }
    }
    println!("removed every netagent device, route and firewall table on this host");
    Ok(())
}

/// Byte counts as people read them.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}KiB", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

/// A person's view of an API reply (the request says which verb it answers).
pub fn render(request: &Request, response: Response) -> String {
    match response {
        Response::Status(s) => {
            let reach = if s.store.connected {
                "connected".to_owned()
            } else {
                format!("unreachable: {}", s.store.error.unwrap_or_default())
            };
            let security = match s.store.transport {
                Some(StoreTransport::Plaintext) => {
                    "; INSECURE: plaintext http, whoever reaches etcd reads and changes the cluster"
                }
                Some(StoreTransport::Tls) => "; TLS, no client certificate",
                Some(StoreTransport::MutualTls) => "; mutual TLS",
                Some(StoreTransport::Local) | None => "",
            };
            let store = format!("{} {} ({reach}{security})", s.store.kind, s.store.location);
            let docker = match &s.docker {
                None => "off".to_owned(),
                Some(d) if d.connected => format!(
                    "{} (connected, engine {})",
                    d.socket,
                    d.engine.as_deref().unwrap_or("?")
                ),
                Some(d) => format!(
                    "{} (unreachable: {}; retrying)",
                    d.socket,
                    d.error.as_deref().unwrap_or("not connected yet")
                ),
            };
            let mut out = format!(
                "node:       {}\nunderlay:   {}\nstate:      {}\nstore:      {store}\ndocker:     {docker}\nnetworks:   {}\nendpoints:  {} here, {} in the cluster\npeers:      {} up, {} down\nversion:    {} (up {}s)\n",
                s.node, s.underlay, s.state, s.networks, s.local_endpoints, s.endpoints,
                s.peers_up, s.peers_down, s.version, s.uptime_secs
            );
            out.push_str(&format!(
                "mesh:       {} (public key {})\n",
                s.mesh_address
                    .map_or("not started (no encrypted network here)".into(), |a| a
                        .to_string()),
                s.public_key
            ));
            for p in s.docker.iter().flat_map(|d| &d.problems) {
                out.push_str(&format!("container {}: {}\n", p.container, p.problem));
            }
            for why in &s.left_out {
                out.push_str(&format!("left out: {why}\n"));
            }
            out
        }
        Response::Networks(nets) => {
            let mut t = Table::new(&["NAME", "SUBNET", "VNI", "ENCRYPTED", "HOSTS", "ENDPOINTS"]);
            for n in nets {
                t.row(vec![
                    n.name,
                    n.subnet.to_string(),
                    n.vni.to_string(),
                    if n.encrypted { "yes" } else { "no" }.into(),
                    n.blocks.len().to_string(),
                    n.endpoints.to_string(),
                ]);
            }
            t.render()
        }
        Response::Network(n) => {
            let verb = match request {
                Request::NetworkCreate(_) => "created ",
                Request::NetworkRemove { .. } => "removed ",
                _ => "",
            };
            let mut s = format!(
                "{verb}network {}\n  subnet:    {}\n  vni:       {}\n  blocks:    /{} per host\n  mtu:       {}\n  encrypted: {}\n  endpoints: {}\n",
                n.name, n.subnet, n.vni, n.block_prefix, or_dash(n.mtu),
                if n.encrypted { "yes" } else { "no" }, n.endpoints
            );
            for b in n.blocks {
                s.push_str(&format!("  block {} on {}\n", b.block, b.node));
            }
            s
        }
        Response::Endpoint(e) => {
            let verb = if matches!(request, Request::Attach(_)) {
                "attached"
            } else {
                "detached"
            };
            format!(
                "{verb} {} {} on {} ({})\n",
                e.network,
                e.address,
                e.node,
                or_dash(e.name)
            )
        }
        Response::Peers(peers) => {
            let mut t = Table::new(&[
                "PEER",
                "UNDERLAY",
                "STATE",
                "RTT",
                "ENDPOINTS",
                "NETWORKS",
                "MESH",
                "WG ENDPOINT",
                "HANDSHAKE",
                "TX",
                "RX",
            ]);
            for p in peers {
                let mesh =
                    |f: &dyn Fn(&MeshPeerInfo) -> String| p.mesh.as_ref().map_or("-".to_owned(), f);
                t.row(vec![
                    p.name.clone(),
                    p.underlay.to_string(),
                    p.state.to_string(),
                    p.rtt_ms.map_or("-".into(), |r| format!("{r:.2}ms")),
                    p.endpoints.to_string(),
                    p.networks.join(","),
                    mesh(&|m| m.address.to_string()),
                    mesh(&|m| m.endpoint.clone()),
                    mesh(&|m| {
                        m.handshake_secs
                            .map_or("never".into(), |s| format!("{s}s ago"))
                    }),
                    mesh(&|m| bytes(m.tx_bytes)),
                    mesh(&|m| bytes(m.rx_bytes)),
                ]);
            }
            t.render()
        }
        Response::Key(k) => format!("new public key: {}\n", k.public_key),
        Response::Nodes(nodes) => nodes_table(nodes, unix_now()),
        Response::Node(n) => format!(
            "removed node {}: {} block(s) {}, {} endpoint(s), mesh address {}\n",
            n.name,
            n.blocks.len(),
            node_blocks(&n),
            n.endpoints.len(),
            or_dash(n.mesh_address)
        ),
        Response::Services(services) => {
            let mut t = Table::new(&["NETWORK", "SERVICE", "REPLICAS", "ADDRESSES", "HOSTS"]);
            for s in services {
                t.row(vec![
                    s.network,
                    s.service,
                    s.replicas.len().to_string(),
                    s.replicas
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    s.nodes.join(","),
                ]);
            }
            t.render()
        }
        Response::Endpoints(eps) => {
            let mut t = Table::new(&[
                "NETWORK", "ADDRESS", "NODE", "STATE", "NAME", "SERVICE", "ALIASES",
            ]);
            for e in eps {
                t.row(vec![
                    e.network,
                    e.address.to_string(),
                    e.node,
                    e.state.to_string(),
                    or_dash(e.name),
                    or_dash(e.service),
                    if e.aliases.is_empty() {
                        "-".into()
                    } else {
                        e.aliases.join(",")
                    },
                ]);
            }
            t.render()
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A duration as people read it: `42s`, `5m3s`, `2h10m`, `3d4h`.
fn span(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn node_blocks(n: &crate::api::NodeInfo) -> String {
    let blocks: Vec<String> = n
        .blocks
        .iter()
        .map(|b| format!("{}:{}", b.network, b.block))
        .collect();
    if blocks.is_empty() {
        "-".into()
    } else {
        blocks.join(",")
    }
}

/// `node ls`: each node's state, when it was last seen, and what it holds.
fn nodes_table(nodes: Vec<crate::api::NodeInfo>, now: u64) -> String {
    use crate::api::NodeState;
    let mut t = Table::new(&[
        "NODE",
        "STATE",
        "LAST SEEN",
        "UNDERLAY",
        "BLOCKS",
        "ENDPOINTS",
        "RECLAIM",
    ]);
    for n in nodes {
        let (seen, reclaim) = match n.state {
            NodeState::Up => (
                n.started.map_or("now".into(), |s| {
                    format!("now (up {})", span(now.saturating_sub(s)))
                }),
                "-".to_owned(),
            ),
            NodeState::Gone => (
                n.gone_since.map_or("just now".into(), |s| {
                    format!("{} ago", span(now.saturating_sub(s)))
                }),
                match (n.gone_since, n.reclaim_in_secs) {
                    (None, _) => "-".into(),
                    (Some(_), None) => "never".into(),
                    (Some(_), Some(0)) => "due".into(),
                    (Some(_), Some(s)) => format!("in {}", span(s)),
                },
            ),
        };
        t.row(vec![
            n.name.clone(),
            n.state.to_string(),
            seen,
            or_dash(n.underlay),
            node_blocks(&n),
            n.endpoints.len().to_string(),
            reclaim,
        ]);
    }
    t.render()
}
