//! Certificates for a test's etcd, made with the `openssl` command line: a CA, a
//! server certificate for etcd's address (and loopback), and a client certificate
//! for the agents and etcdctl. EC P-256 keys: made in milliseconds.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::run::sh_ok;

/// One CA and the certificates it signed, as PEM files in `dir`.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// Makes a CA named `name` in `dir` (created) and signs a server certificate
    /// valid for `server` and 127.0.0.1, and a client certificate.
    pub fn generate(dir: &Path, name: &str, server: Ipv4Addr) -> Pki {
        assert!(
            crate::run::sh("command -v openssl").status.success(),
            "the openssl command is missing: install it (scripts/deps.sh does)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let p = Pki {
            dir: dir.to_owned(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        let d = dir.display();
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh_ok(&format!(
            "openssl req -x509 {key} -keyout {d}/ca-key.pem -out {ca} -days 2 -subj /CN={name} \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>&1",
            ca = p.ca.display()
        ));
        // etcd 3.4 also dials itself with its server certificate: clientAuth too.
        p.sign(
            "server",
            "etcd",
            &format!(
                "subjectAltName=IP:{server},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
            &p.server_cert,
            &p.server_key,
        );
        p.sign(
            "client",
            "netagent",
            "extendedKeyUsage=clientAuth\n",
            &p.client_cert,
            &p.client_key,
        );
        p
    }

    fn sign(&self, what: &str, cn: &str, extensions: &str, cert: &Path, key: &Path) {
        let d = self.dir.display();
        let ext = self.dir.join(format!("{what}.ext"));
        std::fs::write(&ext, extensions).unwrap();
        sh_ok(&format!(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {key} \
             -out {d}/{what}.csr -subj /CN={cn} 2>&1 && \
             openssl x509 -req -in {d}/{what}.csr -CA {ca} -CAkey {d}/ca-key.pem -CAcreateserial \
             -days 2 -extfile {ext} -out {cert} 2>&1",
            key = key.display(),
            ca = self.ca.display(),
            ext = ext.display(),
            cert = cert.display(),
        ));
        // The agent refuses a private key others can read.
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// etcdctl's flags for a client holding this PKI's client certificate.
    pub fn etcdctl_flags(&self) -> String {
        format!(
            "--cacert {} --cert {} --key {}",
            self.ca.display(),
            self.client_cert.display(),
            self.client_key.display()
        )
    }

    /// The `[store]` keys (after `etcd = ...`) for an agent with this client certificate.
    pub fn store_keys(&self) -> String {
        format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.ca.display(),
            self.client_cert.display(),
            self.client_key.display()
        )
    }
}
