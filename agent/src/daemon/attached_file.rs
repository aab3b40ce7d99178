//! This host's own list of what it attached (`attached.json` in the state
//! directory, mode 0600). A store record that names this host is adopted at start
//! only if this list has it with the same namespace and identity: whoever writes the
//! store must not make the agent open a path of their choosing, or take over a
//! namespace it never attached.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "attached.json";

/// One attached namespace, by the store key of its endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub netns: String,
    pub ino: u64,
    /// The namespace's own DNS servers, if it has any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Docker's endpoint id, when the engine attached it through the network driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_endpoint: Option<String>,
}

pub type AttachedList = BTreeMap<String, Attached>;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The list, or `None` when there is none yet (an agent that never saved one).
pub async fn load(path: &Path) -> std::io::Result<Option<AttachedList>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the list whole (written beside it, then renamed over it).
pub async fn save(path: &Path, list: &AttachedList) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(list).expect("list serializes");
    let staged = path.with_extension("json.new");
    let target = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staged)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&staged, &target)
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_and_loads_the_list() {
        let dir = std::env::temp_dir().join(format!("netagent-attached-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = path(&dir);
        assert_eq!(load(&p).await.unwrap(), None);
        let list = AttachedList::from([(
            "endpoints/app/100.64.1.2".to_owned(),
            Attached {
                netns: "pid:42".into(),
                ino: 4026532000,
                upstreams: vec!["198.51.100.53:53".parse().unwrap()],
                docker_endpoint: None,
            },
        )]);
        save(&p, &list).await.unwrap();
        assert_eq!(load(&p).await.unwrap(), Some(list));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
