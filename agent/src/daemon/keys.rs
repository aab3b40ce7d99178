//! This host's WireGuard key: in the state directory (mode 0600) and nowhere else:
//! not in a log, the API or the store (which has the public key only).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use netagent_overlay::KeyPair;
use tracing::{info, warn};

const KEY_FILE: &str = "wireguard.key";

pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEY_FILE)
}

/// This host's key pair: read from the state directory, or made and saved on the
/// first start.
pub async fn load_or_create_key(state_dir: &Path) -> Result<KeyPair> {
    let path = key_path(state_dir);
    match tokio::fs::read_to_string(&path).await {
        Ok(text) => {
            tighten_key_mode(&path).await?;
            let bytes = decode_key(text.trim()).ok_or_else(|| {
                    anyhow!(
                        "{} is not a WireGuard private key (base64 of 32 bytes); remove it to have a new one made",
                        path.display()
                    )
                })?;
            Ok(KeyPair::from_private(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keys = KeyPair::generate().context("cannot make a WireGuard key")?;
            write_key(&path, &keys).await?;
            info!(path = %path.display(), "made this host's WireGuard key");
            Ok(keys)
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

/// A key file that others may read (copied in, or restored from a backup) is made
/// root's alone again, with a warning: the key may have leaked and can be rotated.
async fn tighten_key_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = tokio::fs::metadata(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "WireGuard key file was readable by others; made 0600 (rotate it with: netagent rotate-key)"
        );
        tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .await
            .with_context(|| format!("cannot make {} mode 0600", path.display()))?;
    }
    Ok(())
}

/// Writes the private key readable by root alone, replacing the file whole.
pub async fn write_key(path: &Path, keys: &KeyPair) -> Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("new");
    let _ = tokio::fs::remove_file(&tmp).await;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    tokio::io::AsyncWriteExt::write_all(&mut f, B64.encode(keys.private_bytes()).as_bytes())
        .await?;
    f.sync_all().await?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

pub fn encode_key(key: &[u8; 32]) -> String {
    B64.encode(key)
}

pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    B64.decode(text).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_file_others_can_read_is_made_root_only_and_still_loads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("netagent-key-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = load_or_create_key(&dir).await.unwrap();
        let path = key_path(&dir);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let again = load_or_create_key(&dir).await.unwrap();
        assert_eq!(again.public(), first.public());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
