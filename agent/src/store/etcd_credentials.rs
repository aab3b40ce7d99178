//! What the agent shows etcd to be let in (client certificate, user) and what it
//! trusts to know it reached the real etcd (the CA), read from their files once at
//! start; and the words for a connection that failed over them.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError};

use super::{Result, StoreError, StoreTransport};

/// The `[store]` keys that secure the etcd connection, as paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdCredentials {
    /// The CA (PEM) that signed etcd's server certificate; None: plaintext `http://`.
    pub ca_file: Option<PathBuf>,
    /// This host's client certificate, for etcd's `--client-cert-auth`.
    pub client_certificate: Option<ClientCertificate>,
    /// An etcd user (etcd's own authentication, on top of or instead of certificates).
    pub user: Option<EtcdUser>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUser {
    pub name: String,
    /// A file holding the password (one line), readable by its owner only.
    pub password_file: PathBuf,
}

impl EtcdCredentials {
    pub fn transport(&self) -> StoreTransport {
        match (&self.ca_file, &self.client_certificate) {
            (None, _) => StoreTransport::Plaintext,
            (Some(_), None) => StoreTransport::Tls,
            (Some(_), Some(_)) => StoreTransport::MutualTls,
        }
    }

    /// Reads every file named; a file that is missing or holds the wrong thing is
    /// an error naming its key and path (here, rather than at every reconnect).
    pub async fn load(&self) -> Result<Security> {
        let tls = match &self.ca_file {
            None => None,
            Some(ca) => {
                let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(
                    read_certificates("ca_file", ca).await?,
                ));
                if let Some(c) = &self.client_certificate {
                    let cert = read_certificates("cert_file", &c.cert_file).await?;
                    let key = read_private_key(&c.key_file).await?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                Some(tls)
            }
        };
        let user = match &self.user {
            None => None,
            Some(u) => Some((u.name.clone(), read_password(&u.password_file).await?)),
        };
        Ok(Security {
            credentials: self.clone(),
            tls,
            user,
        })
    }
}

/// The credentials' contents, ready for every connection.
pub struct Security {
    credentials: EtcdCredentials,
    tls: Option<TlsOptions>,
    /// (name, password)
    user: Option<(String, String)>,
}

impl Security {
    pub fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some((name, password)) = &self.user {
            options = options.with_user(name.clone(), password.clone());
        }
        options
    }

    /// Why a call to etcd failed, in words someone can act on: what the TLS layer
    /// said first where it said something, then the causes, each said once.
    pub fn explain(&self, e: &etcd_client::Error) -> Explained {
        let (head, mut next): (String, Option<&(dyn StdError + 'static)>) = match e {
            etcd_client::Error::GRpcStatus(s) => (status_words(s.code(), s.message()), s.source()),
            etcd_client::Error::TransportError(t) => {
                ("cannot set up the connection".into(), t.source())
            }
            other => (other.to_string(), None),
        };
        let mut said = vec![head];
        let mut tls = None;
        while let Some(err) = next {
            if tls.is_none() {
                tls = rustls_error(err).map(|r| self.tls_words(r));
            }
            let text = err.to_string();
            // tonic's wrapper says only its kind; its source says what happened.
            if text != "transport error" && !said.iter().any(|s| s.contains(&text)) {
                said.push(text);
            }
            next = err.source();
        }
        let chain = said.join(": ");
        // An alert that ends the connection after the handshake (TLS 1.3: the
        // server checks the client's certificate last) reaches us from hyper's
        // connection task as text only; rustls renders it, so rustls' own words
        // are what to look for.
        let tls = tls.or_else(|| {
            CLIENT_CERTIFICATE_ALERTS
                .iter()
                .map(|a| rustls::Error::AlertReceived(*a))
                .find(|r| chain.contains(&r.to_string()))
                .map(|r| self.tls_words(&r))
        });
        match tls {
            Some(words) => Explained {
                text: format!("{words}; cause: {chain}"),
                tls: true,
            },
            None => Explained {
                text: chain,
                tls: false,
            },
        }
    }

    fn tls_words(&self, e: &rustls::Error) -> String {
        let ca = self
            .credentials
            .ca_file
            .as_deref()
            .map_or("-".into(), |p| p.display().to_string());
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => format!(
                    "etcd's server certificate rejected: not signed by the CA in ca_file {ca}"
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "etcd's server certificate rejected: it does not name the endpoint's address; reissue it with that address as a subjectAltName".into()
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "etcd's server certificate rejected: expired".into()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "etcd's server certificate rejected: not valid yet (is this host's clock right?)".into()
                }
                other => format!("etcd's server certificate rejected: {other:?}"),
            },
            rustls::Error::AlertReceived(alert) => {
                let client_side = CLIENT_CERTIFICATE_ALERTS.contains(alert);
                match (&self.credentials.client_certificate, client_side) {
                    (Some(c), true) => format!(
                        "etcd rejected this host's client certificate (cert_file {}, {alert:?}): it must be signed by a CA etcd trusts (--trusted-ca-file) and be valid now",
                        c.cert_file.display()
                    ),
                    (None, true) => format!(
                        "etcd wants a client certificate ({alert:?}): set [store] cert_file and key_file"
                    ),
                    (_, false) => format!("etcd ended the TLS handshake: {alert:?}"),
                }
            }
            rustls::Error::InvalidMessage(_) => {
                "the endpoint does not speak TLS (is etcd serving http:// there?)".into()
            }
            other => format!("TLS failed: {other}"),
        }
    }
}

/// A failure described; `tls` when the TLS layer said why (a certificate problem
/// outlasts the broken connections it causes).
pub struct Explained {
    pub text: String,
    pub tls: bool,
}

/// Alerts a server sends about the certificate the client showed (or did not).
const CLIENT_CERTIFICATE_ALERTS: [AlertDescription; 8] = [
    AlertDescription::BadCertificate,
    AlertDescription::UnknownCA,
    AlertDescription::CertificateRequired,
    AlertDescription::CertificateUnknown,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateRevoked,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::AccessDenied,
];

/// gRPC's verdict in words: etcd's message ("etcdserver: authentication failed,
/// ..."), or the code's description where there is none.
fn status_words(code: impl std::fmt::Display, message: &str) -> String {
    if message.is_empty() {
        code.to_string()
    } else {
        message.to_owned()
    }
}

/// The rustls error behind `e`, directly or inside an I/O error (as tokio-rustls
/// hands it on).
fn rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    })
}

fn credentials_error(key: &'static str, path: &Path, reason: impl ToString) -> StoreError {
    StoreError::Credentials {
        key,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

async fn read(key: &'static str, path: &Path) -> Result<Vec<u8>> {
    tokio::fs::read(path)
        .await
        .map_err(|e| credentials_error(key, path, format!("cannot read: {e}")))
}

async fn read_certificates(key: &'static str, path: &Path) -> Result<Vec<u8>> {
    let pem = read(key, path).await?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| credentials_error(key, path, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(credentials_error(
            key,
            path,
            "holds no certificate (a PEM block \"-----BEGIN CERTIFICATE-----\")",
        ));
    }
    Ok(pem)
}

async fn read_private_key(path: &Path) -> Result<Vec<u8>> {
    let pem = read("key_file", path).await?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        credentials_error(
            "key_file",
            path,
            "holds no private key (a PEM block \"-----BEGIN PRIVATE KEY-----\" or \"-----BEGIN EC/RSA PRIVATE KEY-----\")",
        )
    })?;
    Ok(pem)
}

async fn read_password(path: &Path) -> Result<String> {
    let text = String::from_utf8(read("password_file", path).await?)
        .map_err(|_| credentials_error("password_file", path, "is not UTF-8 text"))?;
    // One line; the newline an editor adds is not part of the password.
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(credentials_error("password_file", path, "is empty"));
    }
    Ok(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PEM-shaped block rustls' parser accepts (the DER inside is not checked here).
    fn pem(label: &str) -> String {
        format!(
            "-----BEGIN {label}-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END {label}-----\n"
        )
    }

    #[tokio::test]
    async fn files_that_hold_the_wrong_thing_are_named() {
        let dir = std::env::temp_dir().join(format!("netagent-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca = write("ca.pem", &pem("CERTIFICATE"));
        let key = write("key.pem", &pem("PRIVATE KEY"));
        let der = write("ca.der", "0\x01\x22 (DER, not PEM)");
        let password = write("pw", "s3cret\n");
        let creds = |ca: &Path, cert: &Path, key: &Path| EtcdCredentials {
            ca_file: Some(ca.to_owned()),
            client_certificate: Some(ClientCertificate {
                cert_file: cert.to_owned(),
                key_file: key.to_owned(),
            }),
            user: Some(EtcdUser {
                name: "netagent".into(),
                password_file: password.clone(),
            }),
        };
        let loaded = creds(&ca, &ca, &key).load().await.unwrap();
        assert_eq!(
            loaded.user,
            Some(("netagent".to_owned(), "s3cret".to_owned()))
        );
        let e = creds(&der, &ca, &key)
            .load()
            .await
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            format!(
                "ca_file {}: holds no certificate (a PEM block \"-----BEGIN CERTIFICATE-----\")",
                der.display()
            )
        );
        // Certificate and key swapped: the key file holds no key.
        let e = creds(&ca, &key, &ca)
            .load()
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "cert_file {}: holds no certificate",
                key.display()
            )),
            "{e}"
        );
        let e = creds(&ca, &ca, &ca).load().await.err().unwrap().to_string();
        assert!(
            e.starts_with(&format!("key_file {}: holds no private key", ca.display())),
            "{e}"
        );
        let empty = write("empty", "\n");
        let mut c = creds(&ca, &ca, &key);
        c.user.as_mut().unwrap().password_file = empty.clone();
        let e = c.load().await.err().unwrap().to_string();
        assert_eq!(e, format!("password_file {}: is empty", empty.display()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
