//! Docker containers join networks by label. The engine's events drive it: a start
//! attaches a labelled container, a death removes its endpoints at once, a health
//! change takes it out of or back into service. Every (re)connection begins with a
//! pass over the running containers, so the ones started while the agent or the
//! engine was away are attached; the ones that went away meanwhile are the liveness
//! sweep's (their namespace is gone).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use netagent_overlay::DockerForward;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::datapath::Datapath;
use super::Agent;
use crate::api::{AttachRequest, ContainerProblem, DockerStatus};
use crate::docker::{labels, DockerError, Engine, Event};
use crate::model;
use crate::store::{Store, Txn};

/// How often an unreachable engine is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The agent's side of the Docker engine.
pub(super) struct DockerLink {
    socket: PathBuf,
    engine: StdMutex<Option<Engine>>,
    status: StdMutex<LinkStatus>,
    /// Look at the labelled containers again (a network they name may exist now).
    resync: Notify,
    /// The cluster's networks changed: mirror them as Docker networks again.
    mirror: Notify,
}

#[derive(Default)]
struct LinkStatus {
    version: Option<String>,
    error: Option<String>,
    /// Labelled containers left alone, by id: (name, what is wrong).
    problems: BTreeMap<String, (String, String)>,
}

impl DockerLink {
    pub(super) fn new(socket: PathBuf) -> Self {
        DockerLink {
            socket,
            engine: StdMutex::new(None),
            status: StdMutex::new(LinkStatus::default()),
            resync: Notify::new(),
            mirror: Notify::new(),
        }
    }

    pub(super) fn status(&self) -> DockerStatus {
        let s = self.status.lock().unwrap();
        DockerStatus {
            socket: self.socket.display().to_string(),
            connected: s.version.is_some(),
            engine: s.version.clone(),
            error: s.error.clone(),
            problems: s
                .problems
                .values()
                .map(|(container, problem)| ContainerProblem {
                    container: container.clone(),
                    problem: problem.clone(),
                })
                .collect(),
        }
    }

    /// Asks for another pass over the labelled containers, when one was left alone.
    pub(super) fn networks_changed(&self) {
        if !self.status.lock().unwrap().problems.is_empty() {
            self.resync.notify_one();
        }
        self.mirror.notify_one();
    }

    fn connected(&self, engine: Engine, version: String) {
        info!(socket = %self.socket.display(), version, "connected to the Docker engine");
        *self.engine.lock().unwrap() = Some(engine);
        let mut s = self.status.lock().unwrap();
        s.version = Some(version);
        s.error = None;
    }

    fn lost(&self, error: &DockerError) {
        *self.engine.lock().unwrap() = None;
        let mut s = self.status.lock().unwrap();
        let message = error.to_string();
        // Said once per new reason, not every second.
        if s.error.as_deref() != Some(message.as_str()) {
            warn!(
                error = message,
                "Docker engine unreachable; retrying every second"
            );
        }
        s.version = None;
        s.error = Some(message);
    }

    fn problem(&self, id: &str, name: &str, problem: String) {
        let mut s = self.status.lock().unwrap();
        let entry = (name.to_owned(), problem);
        if s.problems.get(id) != Some(&entry) {
            warn!(container = name, problem = entry.1, "container left alone");
            s.problems.insert(id.to_owned(), entry);
        }
    }

    fn clear_problem(&self, id: &str) {
        self.status.lock().unwrap().problems.remove(id);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<S: Store, D: Datapath> Agent<S, D> {
    /// The engine, or why there is none (for messages that go on with "and ...").
    pub(super) fn docker_engine(&self) -> Result<Engine, String> {
        let Some(link) = &self.docker else {
            return Err("Docker integration is off ([docker] enabled = false)".into());
        };
        let engine = link.engine.lock().unwrap().clone();
        engine.ok_or_else(|| {
            let why = link.status.lock().unwrap().error.clone();
            format!(
                "the Docker engine is not reachable ({})",
                why.unwrap_or_else(|| "not connected yet".into())
            )
        })
    }

    pub(super) async fn docker_loop(self: Arc<Self>) {
        let Some(link) = &self.docker else {
            return;
        };
        loop {
            let error = match Engine::connect(&link.socket).await {
                Ok((engine, version)) => {
                    link.connected(engine.clone(), version);
                    self.follow_engine(link, &engine).await
                }
                Err(e) => e,
            };
            link.lost(&error);
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Serves one connection to the engine until it breaks; returns why.
    async fn follow_engine(&self, link: &DockerLink, engine: &Engine) -> DockerError {
        // Events from a second before the pass over the running containers are
        // replayed, so a container that starts during the pass is not missed.
        let mut events = Box::pin(engine.events(unix_now().saturating_sub(1)));
        self.open_docker_forward().await;
        if let Err(e) = self.attach_labelled(link, engine).await {
            return e;
        }
        let driver = self.cfg.docker_plugin_socket.is_some();
        let mut mirrored = None;
        if driver {
            match self.mirror_networks(engine).await {
                Ok(m) => mirrored = Some(m),
                Err(e) => return e,
            }
        }
        loop {
            tokio::select! {
                _ = link.mirror.notified(), if driver => {
                    if mirrored.as_ref() != Some(&self.networks_to_mirror()) {
                        match self.mirror_networks(engine).await {
                            Ok(m) => mirrored = Some(m),
                            Err(e) => return e,
                        }
                    }
                }
                event = events.next() => match event {
                    None => {
                        return DockerError::Unreachable {
                            socket: link.socket.display().to_string(),
                            message: "the event stream ended".into(),
                        }
                    }
                    Some(Err(e)) => return e,
                    Some(Ok(event)) => {
                        if let Err(e) = self.on_event(link, engine, event).await {
                            return e;
                        }
                    }
                },
                _ = link.resync.notified() => {
                    if let Err(e) = self.attach_labelled(link, engine).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Lets overlay traffic through dockerd's FORWARD chain (policy DROP).
    pub(super) async fn open_docker_forward(&self) {
        match self.datapath.open_docker_forward().await {
            Ok(DockerForward::Opened) => {
                info!("overlay traffic let through Docker's FORWARD chain (DOCKER-USER)")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot open Docker's FORWARD chain to overlay traffic"),
        }
    }

    async fn on_event(
        &self,
        link: &DockerLink,
        engine: &Engine,
        event: Event,
    ) -> Result<(), DockerError> {
        match event {
            Event::Started(id) => self.container_started(link, engine, &id).await?,
            Event::Died(id) => self.container_died(link, &id).await,
            Event::Health { id, healthy } => self.set_in_service(&id, healthy).await,
            Event::NetworkChanged { id, name } => {
                if self.cfg.docker_plugin_socket.is_some() {
                    info!(
                        network = name,
                        id, "Docker network of netagent's driver created or removed"
                    );
                    self.mirror_networks(engine).await?;
                }
            }
        }
        Ok(())
    }

    /// Attaches every running labelled container not yet on all its networks, and
    /// brings the health of the attached ones up to date.
    async fn attach_labelled(&self, link: &DockerLink, engine: &Engine) -> Result<(), DockerError> {
        let running = engine.running().await?;
        {
            let mut s = link.status.lock().unwrap();
            s.problems
                .retain(|id, _| running.iter().any(|c| &c.id == id));
        }
        for c in running {
            let wanted = match labels::wanted(&c.labels) {
                Ok(Some(w)) => w,
                Ok(None) => continue,
                Err(problem) => {
                    link.problem(&c.id, &c.name, problem);
                    continue;
                }
            };
            let attached = self.local.read(|endpoints| {
                wanted.networks.iter().all(|n| {
                    endpoints.values().any(|e| {
                        e.record.container.as_deref() == Some(c.id.as_str())
                            && &e.record.network == n
                    })
                })
            });
            if attached {
                if let Some(in_service) = c.in_service {
                    self.set_in_service(&c.id, in_service).await;
                }
            } else {
                self.container_started(link, engine, &c.id).await?;
            }
        }
        Ok(())
    }

    /// A container started: if its labels ask for networks, attach it to each.
    async fn container_started(
        &self,
        link: &DockerLink,
        engine: &Engine,
        id: &str,
    ) -> Result<(), DockerError> {
        let c = match engine.inspect(id).await {
            Ok(c) => c,
            // Gone again already: its death event follows.
            Err(DockerError::NotRunning(_) | DockerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.name_driver_endpoints(&c).await;
        let wanted = match labels::wanted(&c.labels) {
            Ok(Some(w)) => w,
            Ok(None) if !c.image_only_labels.is_empty() => {
                link.problem(
                    &c.id,
                    &c.name,
                    format!(
                        "label {} comes from the container's image, and labels an image carries are not trusted; set it on the container (docker run -l, Compose labels:)",
                        c.image_only_labels.join(", ")
                    ),
                );
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Err(problem) => {
                link.problem(&c.id, &c.name, problem);
                return Ok(());
            }
        };
        let missing: Vec<String> = self.view.read(|cluster| {
            wanted
                .networks
                .iter()
                .filter(|n| !cluster.networks.contains_key(*n))
                .cloned()
                .collect()
        });
        if let Some(n) = missing.first() {
            link.problem(
                &c.id,
                &c.name,
                format!(
                    "label {}={:?} names network {n:?}, which does not exist; create it with: netagent network create {n} --subnet CIDR",
                    labels::NETWORK,
                    wanted.networks.join(",")
                ),
            );
            return Ok(());
        }
        // Pinned once for all its networks.
        let target = match super::attach::container_target(engine, c.clone()).await {
            Ok(target) => target,
            Err(e) => {
                link.problem(&c.id, &c.name, format!("attaching: {e:#}"));
                return Ok(());
            }
        };
        for network in &wanted.networks {
            let req = AttachRequest {
                target: c.id.clone(),
                network: network.clone(),
                name: None,
                service: wanted.service.clone(),
                aliases: wanted.aliases.clone(),
                one_per_answer: wanted.one_per_answer,
                ports: wanted.ports.clone(),
                dns: Vec::new(),
            };
            match self.attach_container(req, target.clone()).await {
                Ok(info) => {
                    info!(container = c.name, network, address = %info.address, "container attached")
                }
                Err(e) => {
                    link.problem(&c.id, &c.name, format!("attaching to {network:?}: {e:#}"));
                    return Ok(());
                }
            }
        }
        link.clear_problem(&c.id);
        Ok(())
    }

    /// A container died: its endpoints go, everywhere, now. Only those whose
    /// namespace is gone: a restarted container's new namespace may already be on.
    async fn container_died(&self, link: &DockerLink, id: &str) {
        link.clear_problem(id);
        let watched: Vec<((String, u64), netagent_overlay::NetnsRef, u64)> =
            self.local.read(|endpoints| {
                endpoints
                    .iter()
                    .filter(|(_, e)| e.record.container.as_deref() == Some(id))
                    .map(|(k, e)| ((k.clone(), e.ino), e.netns.clone(), e.ino))
                    .collect()
            });
        let gone = self.datapath.gone(watched).await;
        self.remove_endpoints(gone, "container died").await;
    }

    /// Takes a container's endpoints out of service answers (unhealthy) or back.
    async fn set_in_service(&self, id: &str, healthy: bool) {
        let _changes = self.changes.lock().await;
        let changed: Vec<(String, model::EndpointRecord)> = self.local.read(|endpoints| {
            endpoints
                .iter()
                .filter(|(_, e)| {
                    e.record.container.as_deref() == Some(id) && e.record.in_service != healthy
                })
                .map(|(k, e)| {
                    let mut record = e.record.clone();
                    record.in_service = healthy;
                    (k.clone(), record)
                })
                .collect()
        });
        if changed.is_empty() {
            return;
        }
        for (key, record) in changed {
            let txn = Txn::default().put(key.clone(), model::encode(&record));
            match self.view.commit(txn).await {
                Ok(_) => {
                    info!(key, healthy, "container health changed");
                    self.local.update_record(&key, record);
                }
                // The next pass over the containers (on reconnection) tries again.
                Err(e) => warn!(key, error = %e, "cannot record the container's health"),
            }
        }
        self.publish_dns();
    }
}
