//! The `[store]` table: which store, and for etcd how the connection is secured.
//! `https://` with a CA (and a client certificate where etcd asks for one) is the
//! norm; `http://` is accepted as an explicit plaintext choice, warned about at
//! start and shown as insecure by `status`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

use crate::store::{ClientCertificate, EtcdCredentials, EtcdUser};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreFile {
    /// etcd endpoints, all `https://` or all `http://`; absent: the local store.
    etcd: Option<Vec<String>>,
    /// Seconds a dead host's records outlive it (its lease), 1 to 60.
    lease_ttl_secs: Option<u64>,
    /// Key prefix in etcd; several clusters can share one etcd.
    prefix: Option<String>,
    /// PEM CA that signed etcd's server certificate; required for `https://`.
    ca_file: Option<PathBuf>,
    /// PEM client certificate this host shows etcd (`--client-cert-auth`).
    cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`; readable by its owner only.
    key_file: Option<PathBuf>,
    /// etcd user (etcd's own authentication), with `password_file`.
    username: Option<String>,
    /// File holding the user's password on one line; readable by its owner only.
    password_file: Option<PathBuf>,
    /// Never read: named only to refuse it with the fix (a password in the config
    /// file would be as readable as the file, and travel with it).
    password: Option<toml::Value>,
    /// Seconds a node may be gone before its blocks are reclaimed; 0: never.
    reclaim_after_secs: Option<u64>,
}

/// A gone node's blocks are reclaimed after a day unless the config says otherwise:
/// long enough for any reboot or repair, short enough that a pool does not fill up.
pub const DEFAULT_RECLAIM_AFTER_SECS: u64 = 86_400;

/// `[store] reclaim_after_secs`: None means never.
pub(super) fn reclaim_after(
    f: &StoreFile,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<Duration>> {
    match f.reclaim_after_secs.unwrap_or(DEFAULT_RECLAIM_AFTER_SECS) {
        0 => Ok(None),
        s if s < 10 => bail!(
            "{}reclaim_after_secs = {s} is under 10 seconds; a host that only restarts would lose its blocks (default {DEFAULT_RECLAIM_AFTER_SECS}, 0 = never)",
            at("reclaim_after_secs")
        ),
        s => Ok(Some(Duration::from_secs(s))),
    }
}

#[derive(Clone, Debug)]
pub enum StoreConfig {
    Local,
    Etcd {
        endpoints: Vec<String>,
        lease_ttl: Duration,
        prefix: String,
        credentials: EtcdCredentials,
    },
}

/// `at(key)`: "line N: " where `key` is written, for messages about its value.
pub(super) fn parse(mut f: StoreFile, at: &dyn Fn(&str) -> String) -> Result<StoreConfig> {
    if f.password.is_some() {
        bail!(
            "{}password is not read from the config file; write it to a file only root can read (chmod 600) and set password_file = \"/etc/netagent/etcd-password\"",
            at("password")
        );
    }
    let Some(endpoints) = f.etcd.take() else {
        if f.lease_ttl_secs.is_some() {
            bail!(
                "{}lease_ttl_secs needs [store] etcd = [\"https://HOST:2379\"]; the local store has no leases",
                at("lease_ttl_secs")
            );
        }
        for (key, set) in [
            ("ca_file", f.ca_file.is_some()),
            ("cert_file", f.cert_file.is_some()),
            ("key_file", f.key_file.is_some()),
            ("username", f.username.is_some()),
            ("password_file", f.password_file.is_some()),
        ] {
            if set {
                bail!(
                    "{}{key} needs [store] etcd = [\"https://HOST:2379\"]; the local store has no connection to secure",
                    at(key)
                );
            }
        }
        return Ok(StoreConfig::Local);
    };
    if endpoints.is_empty() {
        bail!(
            "{}etcd = [] names no endpoint; give one (etcd = [\"https://192.0.2.2:2379\"]) or remove the key for the local store",
            at("etcd")
        );
    }
    for e in &endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            bail!(
                "{}etcd endpoint {e:?} needs a scheme, e.g. \"https://{e}\" (with ca_file) or \"http://{e}\" (plaintext)",
                at("etcd")
            );
        }
    }
    let credentials = credentials(&f, &endpoints, at)?;
    let ttl = f.lease_ttl_secs.unwrap_or(5);
    if !(1..=60).contains(&ttl) {
        bail!(
            "{}lease_ttl_secs = {ttl} is out of range 1..=60 (default 5)",
            at("lease_ttl_secs")
        );
    }
    let mut prefix = f.prefix.unwrap_or_else(|| "/netagent/".into());
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(StoreConfig::Etcd {
        endpoints,
        lease_ttl: Duration::from_secs(ttl),
        prefix,
        credentials,
    })
}

fn credentials(
    f: &StoreFile,
    endpoints: &[String],
    at: &dyn Fn(&str) -> String,
) -> Result<EtcdCredentials> {
    let https = endpoints.iter().filter(|e| e.starts_with("https://"));
    let http = endpoints.iter().find(|e| e.starts_with("http://"));
    let tls = match (https.clone().next(), http) {
        (Some(s), Some(p)) => bail!(
            "{}etcd endpoints mix {p} and {s}: one connection setting serves them all; write every endpoint with https:// (and set ca_file)",
            at("etcd")
        ),
        (Some(_), None) => true,
        (None, _) => false,
    };
    if tls && f.ca_file.is_none() {
        let e = https.clone().next().expect("an https endpoint");
        bail!(
            "{}etcd endpoint {e} needs [store] ca_file (and cert_file/key_file for client certificates)",
            at("etcd")
        );
    }
    if !tls {
        let e = http.expect("an http endpoint");
        for (key, set) in [
            ("ca_file", f.ca_file.is_some()),
            ("cert_file", f.cert_file.is_some()),
            ("key_file", f.key_file.is_some()),
        ] {
            if set {
                bail!(
                    "{}{key} is set but etcd endpoint {e} is plaintext; write it as {}",
                    at(key),
                    e.replacen("http://", "https://", 1)
                );
            }
        }
        if f.username.is_some() {
            bail!(
                "{}username over plaintext etcd endpoint {e} would send the password in clear; write it as {} and set ca_file",
                at("username"),
                e.replacen("http://", "https://", 1)
            );
        }
    }
    let client_certificate = match (&f.cert_file, &f.key_file) {
        (Some(cert), Some(key)) => Some(ClientCertificate {
            cert_file: existing_file("cert_file", cert, false, at)?,
            key_file: existing_file("key_file", key, true, at)?,
        }),
        (Some(_), None) => bail!(
            "{}cert_file needs key_file (the certificate's private key) in [store]",
            at("cert_file")
        ),
        (None, Some(_)) => bail!(
            "{}key_file needs cert_file (the certificate it belongs to) in [store]",
            at("key_file")
        ),
        (None, None) => None,
    };
    let user = match (&f.username, &f.password_file) {
        (Some(name), Some(file)) if !name.is_empty() => Some(EtcdUser {
            name: name.clone(),
            password_file: existing_file("password_file", file, true, at)?,
        }),
        (Some(_), Some(_)) => bail!("{}username is empty", at("username")),
        (Some(_), None) => bail!(
            "{}username needs password_file (a file holding the password, chmod 600) in [store]",
            at("username")
        ),
        (None, Some(_)) => bail!(
            "{}password_file needs username in [store]",
            at("password_file")
        ),
        (None, None) => None,
    };
    let ca_file = match &f.ca_file {
        Some(ca) => Some(existing_file("ca_file", ca, false, at)?),
        None => None,
    };
    Ok(EtcdCredentials {
        ca_file,
        client_certificate,
        user,
    })
}

/// `path` as given, once it is an absolute path to a regular file (and, for a
/// `secret`, one that only its owner can read).
fn existing_file(
    key: &str,
    path: &Path,
    secret: bool,
    at: &dyn Fn(&str) -> String,
) -> Result<PathBuf> {
    let shown = path.display();
    if !path.is_absolute() {
        bail!("{}{key} {shown} must be an absolute path", at(key));
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}{key} {shown} does not exist", at(key))
        }
        Err(e) => bail!("{}{key} {shown}: cannot read: {e}", at(key)),
    };
    if !meta.is_file() {
        bail!("{}{key} {shown} is not a file", at(key));
    }
    let mode = meta.permissions().mode() & 0o777;
    if secret && mode & 0o077 != 0 {
        bail!(
            "{}{key} {shown} can be read by group or others (mode {mode:04o}); chmod 600 {shown}",
            at(key)
        );
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use crate::config::{Config, StoreConfig};
    use crate::store::StoreTransport;

    /// A directory of credential files for one test, removed after it.
    struct Files(PathBuf);

    impl Files {
        fn new(test: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("netagent-config-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Files(dir)
        }

        fn file(&self, name: &str, mode: u32) -> String {
            let p = self.0.join(name);
            std::fs::write(&p, "x\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p.display().to_string()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store(lines: &str) -> anyhow::Result<StoreConfig> {
        Config::parse(&format!("node = \"h\"\n[store]\n{lines}")).map(|c| c.store)
    }

    fn refused(lines: &str) -> String {
        store(lines).unwrap_err().to_string()
    }

    #[test]
    fn reads_a_mutual_tls_store_with_a_user() {
        let f = Files::new("mtls");
        let (ca, cert, key) = (
            f.file("ca.pem", 0o644),
            f.file("c.pem", 0o644),
            f.file("k.pem", 0o600),
        );
        let pw = f.file("pw", 0o400);
        let s = store(&format!(
            "etcd = [\"https://192.0.2.2:2379\", \"https://192.0.2.3:2379\"]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nusername = \"netagent\"\npassword_file = \"{pw}\"\n"
        ))
        .unwrap();
        let StoreConfig::Etcd { credentials, .. } = s else {
            panic!("etcd expected")
        };
        assert_eq!(credentials.transport(), StoreTransport::MutualTls);
        assert_eq!(credentials.ca_file, Some(ca.into()));
        let c = credentials.client_certificate.unwrap();
        assert_eq!((c.cert_file, c.key_file), (cert.into(), key.into()));
        let u = credentials.user.unwrap();
        assert_eq!((u.name.as_str(), u.password_file), ("netagent", pw.into()));
    }

    #[test]
    fn server_only_tls_and_plaintext_are_told_apart() {
        let f = Files::new("transport");
        let ca = f.file("ca.pem", 0o644);
        let tls = store(&format!(
            "etcd = [\"https://192.0.2.2:2379\"]\nca_file = \"{ca}\"\n"
        ))
        .unwrap();
        let plain = store("etcd = [\"http://192.0.2.2:2379\"]\n").unwrap();
        for (s, want) in [
            (tls, StoreTransport::Tls),
            (plain, StoreTransport::Plaintext),
        ] {
            let StoreConfig::Etcd { credentials, .. } = s else {
                panic!("etcd expected")
            };
            assert_eq!(credentials.transport(), want);
        }
    }

    #[test]
    fn https_without_ca_file_is_refused() {
        assert_eq!(
            refused("etcd = [\"https://192.0.2.2:2379\"]\n"),
            "line 3: etcd endpoint https://192.0.2.2:2379 needs [store] ca_file (and cert_file/key_file for client certificates)"
        );
    }

    #[test]
    fn cert_file_without_key_file_is_refused_and_the_reverse() {
        let f = Files::new("pair");
        let (ca, cert, key) = (
            f.file("ca.pem", 0o644),
            f.file("c.pem", 0o644),
            f.file("k.pem", 0o600),
        );
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\n"
        ));
        assert_eq!(
            e,
            "line 5: cert_file needs key_file (the certificate's private key) in [store]"
        );
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{ca}\"\nkey_file = \"{key}\"\n"
        ));
        assert!(e.starts_with("line 5: key_file needs cert_file"), "{e}");
    }

    #[test]
    fn mixed_schemes_are_refused() {
        let e = refused("etcd = [\"https://a:2379\", \"http://b:2379\"]\n");
        assert!(
            e.starts_with("line 3: etcd endpoints mix http://b:2379 and https://a:2379")
                && e.contains("write every endpoint with https://"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_is_refused_naming_key_and_path() {
        let f = Files::new("missing");
        let ca = f.file("ca.pem", 0o644);
        let gone = f.0.join("nope.pem").display().to_string();
        assert_eq!(
            refused(&format!(
                "etcd = [\"https://a:2379\"]\nca_file = \"{gone}\"\n"
            )),
            format!("line 4: ca_file {gone} does not exist")
        );
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{ca}\"\ncert_file = \"{gone}\"\nkey_file = \"{gone}\"\n"
        ));
        assert_eq!(e, format!("line 5: cert_file {gone} does not exist"));
        let e = refused("etcd = [\"https://a:2379\"]\nca_file = \"ca.pem\"\n");
        assert_eq!(e, "line 4: ca_file ca.pem must be an absolute path");
        let dir = f.0.display().to_string();
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{dir}\"\n"
        ));
        assert_eq!(e, format!("line 4: ca_file {dir} is not a file"));
    }

    #[test]
    fn secrets_readable_by_others_are_refused() {
        let f = Files::new("modes");
        let (ca, cert) = (f.file("ca.pem", 0o644), f.file("c.pem", 0o644));
        let key = f.file("k.pem", 0o640);
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"
        ));
        assert_eq!(
            e,
            format!("line 6: key_file {key} can be read by group or others (mode 0640); chmod 600 {key}")
        );
        let pw = f.file("pw", 0o604);
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{ca}\"\nusername = \"u\"\npassword_file = \"{pw}\"\n"
        ));
        assert!(
            e.starts_with(&format!("line 6: password_file {pw} can be read")),
            "{e}"
        );
    }

    #[test]
    fn user_needs_a_password_file_and_tls() {
        let f = Files::new("user");
        let (ca, pw) = (f.file("ca.pem", 0o644), f.file("pw", 0o600));
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{ca}\"\nusername = \"u\"\n"
        ));
        assert!(e.starts_with("line 5: username needs password_file"), "{e}");
        let e = refused(&format!(
            "etcd = [\"https://a:2379\"]\nca_file = \"{ca}\"\npassword_file = \"{pw}\"\n"
        ));
        assert!(e.starts_with("line 5: password_file needs username"), "{e}");
        let e = refused(&format!(
            "etcd = [\"http://a:2379\"]\nusername = \"u\"\npassword_file = \"{pw}\"\n"
        ));
        assert!(
            e.starts_with("line 4: username over plaintext etcd endpoint http://a:2379")
                && e.contains("https://a:2379"),
            "{e}"
        );
        let e = refused("etcd = [\"https://a:2379\"]\npassword = \"hunter2\"\n");
        assert!(
            e.starts_with("line 4: password is not read from the config file")
                && e.contains("password_file"),
            "{e}"
        );
    }

    #[test]
    fn tls_keys_need_https_and_etcd() {
        let f = Files::new("needs");
        let ca = f.file("ca.pem", 0o644);
        let e = refused(&format!("etcd = [\"http://a:2379\"]\nca_file = \"{ca}\"\n"));
        assert_eq!(
            e,
            "line 4: ca_file is set but etcd endpoint http://a:2379 is plaintext; write it as https://a:2379"
        );
        let e = refused(&format!("ca_file = \"{ca}\"\n"));
        assert!(e.starts_with("line 3: ca_file needs [store] etcd"), "{e}");
    }
}
