//! This host's endpoints: what only this host knows (the namespace behind each store
//! record and its identity), and their list on disk (`attached.json`), which adoption
//! at the next start trusts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use netagent_overlay::{Endpoint, NetnsRef};

use super::attached_file::{self, Attached, AttachedList};
use crate::model::EndpointRecord;

/// An endpoint attached on this host.
#[derive(Clone, Debug)]
pub struct LocalEndpoint {
    pub record: EndpointRecord,
    pub netns: NetnsRef,
    /// Identity of the namespace at attach time (see `NetnsRef::identity`).
    pub ino: u64,
    /// The namespace's own DNS servers for names outside its networks; empty: the
    /// host's. Kept here and in `attached.json`, never in the store: no other host
    /// needs them.
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Docker's id for the endpoint, when the engine attached it through the network
    /// driver (then Docker, not netagent, gives the namespace its default route).
    pub docker_endpoint: Option<String>,
}

impl LocalEndpoint {
    pub fn kernel_endpoint(&self) -> Endpoint {
        Endpoint {
            id: self.record.id.clone(),
            netns: self.netns.clone(),
            address: self.record.address,
            mac: None,
            identity: Some(self.ino),
            default_route: self.docker_endpoint.is_none(),
        }
    }
}

/// By store key. Never held across an await: callers copy what they need.
pub struct LocalEndpoints {
    endpoints: Mutex<BTreeMap<String, LocalEndpoint>>,
    /// What `attached.json` last said (saved again when the endpoints differ).
    saved: tokio::sync::Mutex<Option<AttachedList>>,
    file: PathBuf,
}

impl LocalEndpoints {
    pub fn new(state_dir: &std::path::Path) -> Self {
        LocalEndpoints {
            endpoints: Mutex::new(BTreeMap::new()),
            saved: tokio::sync::Mutex::new(None),
            file: attached_file::path(state_dir),
        }
    }

    pub fn read<R>(&self, f: impl FnOnce(&BTreeMap<String, LocalEndpoint>) -> R) -> R {
        f(&self.endpoints.lock().unwrap())
    }

    pub fn snapshot(&self) -> BTreeMap<String, LocalEndpoint> {
        self.endpoints.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.endpoints.lock().unwrap().len()
    }

    pub fn insert(&self, key: String, endpoint: LocalEndpoint) {
        self.endpoints.lock().unwrap().insert(key, endpoint);
    }

    pub fn remove(&self, key: &str) -> Option<LocalEndpoint> {
        self.endpoints.lock().unwrap().remove(key)
    }

    pub fn replace(&self, endpoints: BTreeMap<String, LocalEndpoint>) {
        *self.endpoints.lock().unwrap() = endpoints;
    }

    /// Keeps the endpoints `keep` says yes to; returns the keys of the others.
    pub fn retain(&self, mut keep: impl FnMut(&str, &LocalEndpoint) -> bool) -> Vec<String> {
        let mut dropped = Vec::new();
        self.endpoints.lock().unwrap().retain(|k, e| {
            let kept = keep(k, e);
            if !kept {
                dropped.push(k.clone());
            }
            kept
        });
        dropped
    }

    /// Changes the record of the endpoint at `key`, if it is still here.
    pub fn update_record(&self, key: &str, record: EndpointRecord) {
        if let Some(e) = self.endpoints.lock().unwrap().get_mut(key) {
            e.record = record;
        }
    }

    /// Changes the DNS servers of the endpoint at `key`; true if they changed.
    pub fn set_upstreams(&self, key: &str, upstreams: &[std::net::SocketAddr]) -> bool {
        match self.endpoints.lock().unwrap().get_mut(key) {
            Some(e) if e.upstreams != upstreams => {
                e.upstreams = upstreams.to_vec();
                true
            }
            _ => false,
        }
    }

    /// Records the identity of an endpoint's namespace, found after its attach (a
    /// Docker sandbox appears after the join); false if the endpoint is gone or
    /// names another namespace now.
    pub fn set_identity(&self, key: &str, netns: &NetnsRef, ino: u64) -> bool {
        match self.endpoints.lock().unwrap().get_mut(key) {
            Some(e) if &e.netns == netns && e.ino == 0 => {
                e.ino = ino;
                true
            }
            _ => false,
        }
    }

    /// The file adoption trusts at the next start.
    pub fn file(&self) -> &std::path::Path {
        &self.file
    }

    /// Saves the list of endpoints unless it is what was saved last.
    pub async fn save(&self) {
        // Held while the list is read and written, so the file never goes back to
        // an older list.
        let mut saved = self.saved.lock().await;
        let list: AttachedList = self.read(|endpoints| {
            endpoints
                .iter()
                .map(|(key, e)| {
                    let attached = Attached {
                        netns: e.record.netns.clone(),
                        ino: e.ino,
                        upstreams: e.upstreams.clone(),
                        docker_endpoint: e.docker_endpoint.clone(),
                    };
                    (key.clone(), attached)
                })
                .collect()
        });
        if saved.as_ref() == Some(&list) {
            return;
        }
        match attached_file::save(&self.file, &list).await {
            Ok(()) => *saved = Some(list),
            Err(e) => {
                tracing::warn!(path = %self.file.display(), error = %e, "cannot save the list of attached namespaces")
            }
        }
    }
}
