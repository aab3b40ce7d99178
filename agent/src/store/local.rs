//! The embedded store for a single host: every key in memory, persisted as one JSON
//! file (written to a temporary file and renamed, so a crash leaves the old or the new
//! contents, never half). Registration never expires: there are no other hosts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch, Mutex};

use super::{
    Change, Compare, Loaded, Result, Store, StoreError, StoreEvent, StoreHealth, StoreTransport,
    Txn,
};

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Contents {
    revision: i64,
    /// key -> (JSON value as text, revision of its last write)
    keys: BTreeMap<String, (String, i64)>,
}

pub struct LocalStore {
    path: PathBuf,
    contents: Arc<Mutex<Contents>>,
    changes: broadcast::Sender<(i64, Vec<Change>)>,
    health: watch::Sender<StoreHealth>,
}

impl LocalStore {
    /// Opens (or starts) the store file; a file that cannot be read as the store is
    /// an error naming it, never silently replaced.
    pub async fn open(path: &Path) -> Result<Self> {
        let err = |reason: String| StoreError::Local {
            path: path.display().to_string(),
            reason,
        };
        let contents = match tokio::fs::read(path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                err(format!(
                    "not a netagent store ({e}); move it away to start empty"
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Contents::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let (changes, _) = broadcast::channel(1024);
        let (health, _) = watch::channel(StoreHealth {
            kind: "local".into(),
            location: path.display().to_string(),
            connected: true,
            error: None,
            transport: Some(StoreTransport::Local),
            reconnects: 0,
            ever_connected: true,
        });
        Ok(LocalStore {
            path: path.to_owned(),
            contents: Arc::new(Mutex::new(contents)),
            changes,
            health,
        })
    }

    async fn persist(&self, contents: &Contents) -> Result<()> {
        let err = |e: std::io::Error| StoreError::Local {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        };
        let bytes = serde_json::to_vec(contents).expect("store contents serialize");
        let tmp = self.path.with_extension("tmp");
        tokio::fs::write(&tmp, bytes).await.map_err(err)?;
        tokio::fs::rename(&tmp, &self.path).await.map_err(err)
    }
}

fn loaded(c: &Contents) -> Loaded {
    Loaded {
        revision: c.revision,
        pairs: c
            .keys
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone().into_bytes()))
            .collect(),
    }
}

impl Store for LocalStore {
    async fn load(&self) -> Result<Loaded> {
        Ok(loaded(&*self.contents.lock().await))
    }

    async fn txn(&self, txn: Txn) -> Result<Option<i64>> {
        let mut c = self.contents.lock().await;
        let holds = txn.when.iter().all(|w| match w {
            Compare::Absent(k) => !c.keys.contains_key(k),
            Compare::Value(k, v) => c.keys.get(k).is_some_and(|(text, _)| text.as_bytes() == v),
        });
        if !holds {
            return Ok(None);
        }
        let revision = c.revision + 1;
        let mut changes = Vec::new();
        for prefix in &txn.delete_prefix {
            let doomed: Vec<String> = c
                .keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            for k in doomed {
                c.keys.remove(&k);
                changes.push(Change {
                    key: k,
                    value: None,
                });
            }
        }
        for k in &txn.delete {
            if c.keys.remove(k).is_some() {
                changes.push(Change {
                    key: k.clone(),
                    value: None,
                });
            }
        }
        for (k, v) in &txn.put {
            let text = String::from_utf8_lossy(v).into_owned();
            c.keys.insert(k.clone(), (text, revision));
            changes.push(Change {
                key: k.clone(),
                value: Some(v.clone()),
            });
        }
        c.revision = revision;
        self.persist(&c).await?;
        let _ = self.changes.send((revision, changes));
        Ok(Some(revision))
    }

    fn watch(&self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel(64);
        // Subscribe before loading so nothing falls between the two.
        let mut changes = self.changes.subscribe();
        let contents = self.contents.clone();
        tokio::spawn(async move {
            let first = loaded(&*contents.lock().await);
            let mut seen = first.revision;
            if tx.send(StoreEvent::Reset(first)).await.is_err() {
                return;
            }
            loop {
                match changes.recv().await {
                    Ok((rev, batch)) if rev > seen => {
                        seen = rev;
                        let event = StoreEvent::Changes {
                            revision: rev,
                            changes: batch,
                        };
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let again = loaded(&*contents.lock().await);
                        seen = again.revision;
                        if tx.send(StoreEvent::Reset(again)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        rx
    }

    fn register(&self, key: String, value: Vec<u8>, _ttl: Duration) {
        let contents = self.contents.clone();
        let changes = self.changes.clone();
        tokio::spawn(async move {
            let mut c = contents.lock().await;
            let revision = c.revision + 1;
            c.revision = revision;
            let text = String::from_utf8_lossy(&value).into_owned();
            c.keys.insert(key.clone(), (text, revision));
            let _ = changes.send((
                revision,
                vec![Change {
                    key,
                    value: Some(value),
                }],
            ));
        });
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.health.subscribe()
    }
}
