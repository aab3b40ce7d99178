//! The Docker engine as the agent needs it: the running containers, one container's
//! facts (process, labels, health), and a stream of starts, deaths and health
//! changes. Everything else about Docker (what labels mean, what to attach) lives in
//! [`labels`] and the daemon.

pub mod labels;
pub mod networks;
pub mod resolv_conf;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::errors::Error as BollardError;
use bollard::models::{EventMessageTypeEnum, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures::{Stream, StreamExt};

/// Seconds a request may take before the engine counts as unreachable.
const REQUEST_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker engine at {socket} unreachable ({message}); is dockerd running? (set [docker] socket, or enabled = false)")]
    Unreachable { socket: String, message: String },
    #[error("no container {0:?} on this host (docker ps lists the running ones)")]
    NotFound(String),
    #[error("container {0:?} is not running; start it first: docker start {0}")]
    NotRunning(String),
    #[error("Docker engine refused {what}: {message}")]
    Refused { what: String, message: String },
}

pub type Result<T> = std::result::Result<T, DockerError>;

/// A running container, as inspected.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    /// Without Docker's leading '/'.
    pub name: String,
    pub pid: u32,
    /// The labels set on the container itself (`docker run -l`, Compose `labels:`).
    /// Those it only inherited from its image are not here: an image is untrusted
    /// input, and a pulled image must not choose its networks or names.
    pub labels: HashMap<String, String>,
    /// Keys of netagent labels that only the image carries, ignored (for status).
    pub image_only_labels: Vec<String>,
    /// The host-side file Docker bind-mounts at the container's /etc/resolv.conf.
    pub resolv_conf_path: Option<std::path::PathBuf>,
    /// Its replicas belong in its service's answers: no health check, or a check
    /// that says healthy (`starting` and `unhealthy` keep it out).
    pub in_service: bool,
    /// Its own DNS servers (`docker run --dns`, Compose `dns:`), as the engine's
    /// configuration says; empty: the host's.
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// The Docker networks it is on, with its endpoint and aliases on each.
    pub networks: Vec<ContainerNetwork>,
}

/// A container's place on one Docker network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerNetwork {
    pub network_id: String,
    pub endpoint_id: String,
    /// `--network-alias`, Compose's service name and `aliases:`, the short id.
    pub aliases: Vec<String>,
}

/// Splits a container's labels (Docker merges its image's into them) into those set
/// on the container and the keys of netagent's own labels that came from the image
/// only. A label whose value equals the image's cannot be told apart from the
/// image's, so it counts as the image's.
pub fn own_labels(
    merged: HashMap<String, String>,
    image: &HashMap<String, String>,
) -> (HashMap<String, String>, Vec<String>) {
    let mut own = HashMap::new();
    let mut image_only = Vec::new();
    for (k, v) in merged {
        if image.get(&k) == Some(&v) {
            if labels::is_ours(&k) {
                image_only.push(k);
            }
        } else {
            own.insert(k, v);
        }
    }
    image_only.sort();
    (own, image_only)
}

impl Container {
    /// Docker's short id (the container's hostname), 12 hex digits.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

/// A running container, as listed (no process id; inspect for that).
#[derive(Clone, Debug)]
pub struct Listed {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    /// From its status line: in (no check, `(healthy)`), out (`(unhealthy)`), or
    /// None while `(health: starting)`, which says nothing new about a replica
    /// already attached (an engine that restarts marks every restored container
    /// `starting` until its next check).
    pub in_service: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Started(String),
    Died(String),
    Health {
        id: String,
        healthy: bool,
    },
    /// A network of netagent's driver was created or removed on this engine.
    NetworkChanged {
        id: String,
        name: String,
    },
}

#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    socket: PathBuf,
}

impl Engine {
    /// Connects and agrees on an API version; returns the engine's version too.
    pub async fn connect(socket: &Path) -> Result<(Engine, String)> {
        let unreachable = |e: BollardError| DockerError::Unreachable {
            socket: socket.display().to_string(),
            message: e.to_string(),
        };
        let docker = Docker::connect_with_unix(
            &socket.to_string_lossy(),
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(unreachable)?
        .negotiate_version()
        .await
        .map_err(unreachable)?;
        let version = docker
            .version()
            .await
            .map_err(unreachable)?
            .version
            .unwrap_or_default();
        Ok((
            Engine {
                docker,
                socket: socket.to_owned(),
            },
            version,
        ))
    }

    fn error(&self, what: &str, e: BollardError) -> DockerError {
        match e {
            BollardError::DockerResponseServerError {
                status_code: 404, ..
            } => DockerError::NotFound(what.to_owned()),
            BollardError::DockerResponseServerError { message, .. } => DockerError::Refused {
                what: what.to_owned(),
                message,
            },
            other => DockerError::Unreachable {
                socket: self.socket.display().to_string(),
                message: other.to_string(),
            },
        }
    }

    /// Every running container.
    pub async fn running(&self) -> Result<Vec<Listed>> {
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions::default()))
            .await
            .map_err(|e| self.error("the container list", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                Some(Listed {
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    labels: c.labels.unwrap_or_default(),
                    in_service: c
                        .status
                        .as_deref()
                        .map_or(Some(true), status_line_in_service),
                })
            })
            .collect())
    }

    /// A running container by name or id.
    pub async fn inspect(&self, name_or_id: &str) -> Result<Container> {
        let (mut c, pid) = self.inspect_running(name_or_id).await?;
        let state = c.state.take().unwrap_or_default();
        let in_service = health_in_service(state.health.and_then(|h| h.status));
        let dns_servers = dns_servers(
            c.host_config
                .as_ref()
                .and_then(|h| h.dns.as_deref())
                .unwrap_or_default(),
        );
        let resolv_conf_path = c
            .resolv_conf_path
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from);
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .map(|n| {
                n.values()
                    .map(|e| ContainerNetwork {
                        network_id: e.network_id.clone().unwrap_or_default(),
                        endpoint_id: e.endpoint_id.clone().unwrap_or_default(),
                        aliases: e.aliases.clone().unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let merged = c.config.and_then(|c| c.labels).unwrap_or_default();
        let image_labels = match c.image.as_deref().filter(|i| !i.is_empty()) {
            Some(image) => self
                .docker
                .inspect_image(image)
                .await
                .map_err(|e| self.error(image, e))?
                .config
                .and_then(|c| c.labels)
                .unwrap_or_default(),
            None => HashMap::new(),
        };
        let (labels, image_only_labels) = own_labels(merged, &image_labels);
        Ok(Container {
            id: c.id.unwrap_or_default(),
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            pid,
            labels,
            image_only_labels,
            resolv_conf_path,
            in_service,
            dns_servers,
            networks,
        })
    }

    /// The pid of a running container's first process (one request, no image read).
    pub async fn pid(&self, name_or_id: &str) -> Result<u32> {
        Ok(self.inspect_running(name_or_id).await?.1)
    }

    /// The engine's inspect of a running container, and its first process's pid.
    async fn inspect_running(
        &self,
        name_or_id: &str,
    ) -> Result<(bollard::models::ContainerInspectResponse, u32)> {
        let c = self
            .docker
            .inspect_container(name_or_id, None)
            .await
            .map_err(|e| self.error(name_or_id, e))?;
        let state = c.state.as_ref();
        let pid = state.and_then(|s| {
            let pid = s.pid.unwrap_or(0);
            (s.running == Some(true) && pid > 0).then_some(pid as u32)
        });
        match pid {
            Some(pid) => Ok((c, pid)),
            None => Err(DockerError::NotRunning(name_or_id.to_owned())),
        }
    }

    /// Container starts, deaths and health changes since `since` (unix seconds; the
    /// engine replays what it logged after it). The stream ends (or yields an error)
    /// when the engine goes away.
    pub fn events(&self, since: u64) -> impl Stream<Item = Result<Event>> + Send + 'static {
        let filters = HashMap::from([
            (
                "type".to_owned(),
                vec!["container".to_owned(), "network".to_owned()],
            ),
            (
                "event".to_owned(),
                vec![
                    "start".into(),
                    "die".into(),
                    "health_status".into(),
                    "create".into(),
                    "destroy".into(),
                ],
            ),
        ]);
        let options = EventsOptions {
            filters: Some(filters),
            since: Some(since.to_string()),
            ..Default::default()
        };
        let engine = self.clone();
        self.docker.events(Some(options)).filter_map(move |item| {
            let out = match item {
                Ok(msg) => {
                    let network = msg.typ == Some(EventMessageTypeEnum::NETWORK);
                    let actor = msg.actor.unwrap_or_default();
                    let id = actor.id.unwrap_or_default();
                    let action = msg.action.as_deref().unwrap_or_default();
                    if network {
                        let attributes = actor.attributes.unwrap_or_default();
                        network_event(action, id, &attributes).map(Ok)
                    } else {
                        event(action, id).map(Ok)
                    }
                }
                Err(e) => Some(Err(engine.error("the event stream", e))),
            };
            std::future::ready(out)
        })
    }
}

/// Whether a health state lets a replica into its service's answers: with no
/// check, or once healthy; not while `starting` (the check has not passed yet) nor
/// `unhealthy`.
fn health_in_service(status: Option<HealthStatusEnum>) -> bool {
    !matches!(
        status,
        Some(HealthStatusEnum::STARTING | HealthStatusEnum::UNHEALTHY)
    )
}

/// The same from a listed container's status line; None while `starting`.
fn status_line_in_service(status: &str) -> Option<bool> {
    if status.ends_with("(health: starting)") {
        None
    } else {
        Some(!status.ends_with("(unhealthy)"))
    }
}

/// A container's DNS servers from its configuration (port 53). Left out: entries
/// that are not addresses or cannot be a server's, and loopback and link-local
/// addresses, which name something in the container's own namespace while the
/// agent forwards from the host's.
fn dns_servers(configured: &[String]) -> Vec<std::net::SocketAddr> {
    let local = |ip: &std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    configured
        .iter()
        .filter_map(|s| s.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast() && !local(ip))
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect()
}

/// A network event: the creation or removal of one of netagent's driver.
fn network_event(action: &str, id: String, attributes: &HashMap<String, String>) -> Option<Event> {
    let name = attributes.get("name")?;
    let ours = attributes.get("type").map(String::as_str) == Some(networks::DRIVER);
    (matches!(action, "create" | "destroy") && ours && !id.is_empty()).then(|| {
        Event::NetworkChanged {
            id,
            name: name.clone(),
        }
    })
}

/// An event action as the engine writes it (`start`, `health_status: healthy`).
fn event(action: &str, id: String) -> Option<Event> {
    if id.is_empty() {
        return None;
    }
    match action {
        "start" => Some(Event::Started(id)),
        "die" => Some(Event::Died(id)),
        _ => match action.strip_prefix("health_status:").map(str::trim) {
            Some("healthy") => Some(Event::Health { id, healthy: true }),
            Some("unhealthy" | "starting") => Some(Event::Health { id, healthy: false }),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_passed_health_check_or_none_puts_a_replica_in_service() {
        assert!(health_in_service(None));
        assert!(health_in_service(Some(HealthStatusEnum::EMPTY)));
        assert!(health_in_service(Some(HealthStatusEnum::NONE)));
        assert!(health_in_service(Some(HealthStatusEnum::HEALTHY)));
        assert!(!health_in_service(Some(HealthStatusEnum::STARTING)));
        assert!(!health_in_service(Some(HealthStatusEnum::UNHEALTHY)));
        assert_eq!(status_line_in_service("Up 2 minutes"), Some(true));
        assert_eq!(status_line_in_service("Up 2 minutes (healthy)"), Some(true));
        assert_eq!(
            status_line_in_service("Up 3 seconds (health: starting)"),
            None
        );
        assert_eq!(
            status_line_in_service("Up 3 minutes (unhealthy)"),
            Some(false)
        );
    }

    #[test]
    fn a_container_s_dns_servers_are_addresses_only() {
        let configured: Vec<String> = [
            "198.51.100.53",
            " 2001:db8::53 ",
            "0.0.0.0",
            "224.0.0.1",
            "dns.example",
            "",
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            dns_servers(&configured),
            vec![
                "198.51.100.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn labels_only_the_image_carries_do_not_count() {
        let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let image = map(&[
            ("netagent.network", "app"),
            ("netagent.service", "db"),
            ("maintainer", "x"),
        ]);
        // Docker's merge: the container's own labels over the image's.
        let merged = map(&[
            ("netagent.network", "app"),
            ("netagent.service", "cache"),
            ("maintainer", "x"),
            ("com.docker.compose.service", "cache"),
        ]);
        let (own, image_only) = own_labels(merged, &image);
        assert_eq!(
            own,
            map(&[
                ("netagent.service", "cache"),
                ("com.docker.compose.service", "cache")
            ])
        );
        assert_eq!(image_only, vec!["netagent.network".to_owned()]);
        let (own, image_only) = own_labels(map(&[("netagent.network", "app")]), &HashMap::new());
        assert_eq!(own, map(&[("netagent.network", "app")]));
        assert!(image_only.is_empty());
    }

    #[test]
    fn reads_the_engine_s_actions() {
        let id = || "abc".to_owned();
        assert_eq!(event("start", id()), Some(Event::Started(id())));
        assert_eq!(event("die", id()), Some(Event::Died(id())));
        assert_eq!(
            event("health_status: unhealthy", id()),
            Some(Event::Health {
                id: id(),
                healthy: false
            })
        );
        assert_eq!(
            event("health_status: healthy", id()),
            Some(Event::Health {
                id: id(),
                healthy: true
            })
        );
        // A check restarted (the engine may say so): out until it passes again.
        assert_eq!(
            event("health_status: starting", id()),
            Some(Event::Health {
                id: id(),
                healthy: false
            })
        );
        assert_eq!(event("exec_start: sh", id()), None);
        assert_eq!(event("start", String::new()), None);
    }
}
