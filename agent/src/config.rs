//! The agent's configuration file (`/etc/netagent/netagent.toml`). Unknown keys and
//! bad values are refused with the file, the line and what to write instead.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

mod store;

pub use store::StoreConfig;
use store::StoreFile;

pub const DEFAULT_PATH: &str = "/etc/netagent/netagent.toml";
pub const DEFAULT_SOCKET: &str = "/run/netagent/netagent.sock";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// How long the DNS sockets are kept after the agent exits: a restart or an upgrade
/// takes far less; a stopped agent's namespaces are let go after it.
pub const DEFAULT_KEEP_SOCKETS_SECS: u64 = 60;
/// Where `wg show nawg0` looks for the mesh (the cross-platform WireGuard UAPI).
pub const DEFAULT_UAPI_SOCKET: &str = "/var/run/wireguard/nawg0.sock";
/// Where dockerd looks for a legacy plugin named `netagent` (`-d netagent`).
pub const DEFAULT_PLUGIN_SOCKET: &str = "/run/docker/plugins/netagent.sock";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    node: Option<String>,
    underlay_address: Option<Ipv4Addr>,
    underlay_interface: Option<String>,
    state_dir: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    #[serde(default)]
    store: StoreFile,
    #[serde(default)]
    dns: DnsFile,
    #[serde(default)]
    docker: DockerFile,
    #[serde(default)]
    mesh: MeshFile,
    #[serde(default)]
    http: HttpFile,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MeshFile {
    listen_port: Option<u16>,
    tunnel_offload: Option<bool>,
    uapi_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DockerFile {
    enabled: Option<bool>,
    socket: Option<PathBuf>,
    plugin_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DnsFile {
    ttl_secs: Option<u32>,
    upstream: Option<Vec<String>>,
    keep_sockets_secs: Option<u64>,
    keeper_socket: Option<PathBuf>,
}

/// The configuration in force, every default filled in.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    /// None: found from the route toward the outside world at start.
    pub underlay_address: Option<Ipv4Addr>,
    pub underlay_interface: Option<String>,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub store: StoreConfig,
    pub dns_ttl: u32,
    /// Empty: the host's /etc/resolv.conf.
    pub dns_upstream: Vec<SocketAddr>,
    /// Where the DNS sockets are kept across restarts (the keeper's socket)...
    pub dns_keeper_socket: PathBuf,
    /// ...and for how long after the last agent left; zero: they close with the
    /// agent (and a keeper found at the socket is told to let go).
    pub dns_keep_sockets: std::time::Duration,
    /// The Docker engine whose containers join networks by label; None: off.
    pub docker_socket: Option<PathBuf>,
    /// Where the Docker network and IPAM driver is served; None: off (and always
    /// off without Docker integration).
    pub docker_plugin_socket: Option<PathBuf>,
    /// UDP port of the encrypted mesh (WireGuard) on the underlay address.
    pub mesh_port: u16,
    /// Whole TCP bursts inside VXLAN through the mesh device where the kernel offers
    /// it (Linux 6.17+); false: packet by packet, as on older kernels.
    pub mesh_tunnel_offload: bool,
    /// Where the mesh answers WireGuard's UAPI `get` (read-only); None: off.
    pub mesh_uapi_socket: Option<PathBuf>,
    /// The HTTP endpoint (metrics, health, the live page); None: off.
    pub http_listen: Option<SocketAddr>,
    /// How long a node may be gone before any agent reclaims its blocks; None: never.
    pub reclaim_after: Option<std::time::Duration>,
}

impl Config {
    /// Reads `path`; a missing file is fine only for the default path (all defaults).
    pub fn load(path: &Path, explicit: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(e) => bail!("cannot read config {}: {e}", path.display()),
        };
        Config::parse(&text).map_err(|e| anyhow!("config {}: {e:#}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let f: File = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        let at = |key: &str| match line_of(text, key) {
            Some(n) => format!("line {n}: "),
            None => String::new(),
        };
        let node = match f.node {
            Some(n) if n.is_empty() || n.contains('/') || n.len() > 63 => {
                bail!(
                    "{}node {n:?} must be 1 to 63 characters without '/'",
                    at("node")
                )
            }
            Some(n) => n,
            None => hostname()?,
        };
        let reclaim_after = store::reclaim_after(&f.store, &at)?;
        let store = store::parse(f.store, &at)?;
        let dns_ttl = f.dns.ttl_secs.unwrap_or(netagent_dns::DEFAULT_TTL);
        if dns_ttl > 86_400 {
            bail!("{}ttl_secs = {dns_ttl} is more than a day", at("ttl_secs"));
        }
        let mut dns_upstream = Vec::new();
        for u in f.dns.upstream.unwrap_or_default() {
            let addr = dns_server(&u).ok_or_else(|| {
                anyhow!(
                    "{}upstream {u:?} is not an address (\"192.0.2.53\" or \"192.0.2.53:53\")",
                    at("upstream")
                )
            })?;
            dns_upstream.push(addr);
        }
        let api_socket = f.api_socket.unwrap_or_else(|| DEFAULT_SOCKET.into());
        let keep_secs = f.dns.keep_sockets_secs.unwrap_or(DEFAULT_KEEP_SOCKETS_SECS);
        if keep_secs > 86_400 {
            bail!(
                "{}keep_sockets_secs = {keep_secs} is more than a day",
                at("keep_sockets_secs")
            );
        }
        let dns_keeper_socket = f
            .dns
            .keeper_socket
            .unwrap_or_else(|| keeper_socket_beside(&api_socket));
        let docker_socket = match (f.docker.enabled, f.docker.socket) {
            (Some(false), Some(_)) => bail!(
                "{}socket is set but enabled = false; remove one of them",
                at("socket")
            ),
            (Some(false), None) => None,
            (_, Some(p)) if !p.is_absolute() => bail!(
                "{}socket {:?} must be an absolute path (default {DEFAULT_DOCKER_SOCKET})",
                at("socket"),
                p.display().to_string()
            ),
            (_, socket) => Some(socket.unwrap_or_else(|| DEFAULT_DOCKER_SOCKET.into())),
        };
        let docker_plugin_socket = match f.docker.plugin_socket {
            _ if docker_socket.is_none() => None,
            None => Some(DEFAULT_PLUGIN_SOCKET.into()),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) if !p.is_absolute() => bail!(
                "{}plugin_socket {:?} must be an absolute path (default {DEFAULT_PLUGIN_SOCKET}; \"\" turns it off)",
                at("plugin_socket"),
                p.display().to_string()
            ),
            Some(p) => Some(p),
        };
        Ok(Config {
            node,
            underlay_address: f.underlay_address,
            underlay_interface: f.underlay_interface,
            state_dir: f.state_dir.unwrap_or_else(|| "/var/lib/netagent".into()),
            api_socket,
            store,
            dns_ttl,
            dns_upstream,
            dns_keeper_socket,
            dns_keep_sockets: std::time::Duration::from_secs(keep_secs),
            docker_socket,
            docker_plugin_socket,
            mesh_port: match f.mesh.listen_port {
                Some(0) => bail!(
                    "{}listen_port = 0: give a port (default 51820)",
                    at("listen_port")
                ),
                Some(p) => p,
                None => 51820,
            },
            mesh_tunnel_offload: f.mesh.tunnel_offload.unwrap_or(true),
            mesh_uapi_socket: match f.mesh.uapi_socket {
                None => Some(DEFAULT_UAPI_SOCKET.into()),
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) if !p.is_absolute() => bail!(
                    "{}uapi_socket {:?} must be an absolute path (default {DEFAULT_UAPI_SOCKET}; \"\" turns it off)",
                    at("uapi_socket"),
                    p.display().to_string()
                ),
                Some(p) => Some(p),
            },
            http_listen: match f.http.listen {
                None => None,
                Some(l) => Some(l.parse::<SocketAddr>().map_err(|_| {
                    anyhow!(
                        "{}listen {l:?} is not an address and port (\"127.0.0.1:9464\")",
                        at("listen")
                    )
                })?),
            },
            reclaim_after,
        })
    }

    pub fn local_store_path(&self) -> PathBuf {
        self.state_dir.join("store.json")
    }
}

/// A DNS server as the config and the CLI take it: an address, port 53 unless given.
pub fn dns_server(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .ok()
}

/// The keeper's socket next to the API socket: `/run/netagent/netagent-dns-keeper.sock`.
fn keeper_socket_beside(api_socket: &Path) -> PathBuf {
    let stem = api_socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "netagent".into());
    api_socket.with_file_name(format!("{stem}-dns-keeper.sock"))
}

/// 1-based line where `key = ...` is written, for messages about its value.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

fn hostname() -> Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the hostname for the default node name; set node = \"...\"")?;
    Ok(h.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reads_the_documented_keys() {
        let c = Config::parse(
            r#"
node = "host1"
underlay_address = "192.0.2.11"
state_dir = "/tmp/x"
api_socket = "/tmp/x.sock"
[store]
etcd = ["http://192.0.2.2:2379"]
lease_ttl_secs = 3
[dns]
ttl_secs = 7
upstream = ["192.0.2.53", "192.0.2.54:5353"]
keep_sockets_secs = 30
keeper_socket = "/tmp/keeper.sock"
[docker]
socket = "/run/docker-h1.sock"
[mesh]
listen_port = 51821
tunnel_offload = false
"#,
        )
        .unwrap();
        assert_eq!(
            (c.dns_keeper_socket.as_path(), c.dns_keep_sockets),
            (Path::new("/tmp/keeper.sock"), Duration::from_secs(30))
        );
        assert_eq!(c.docker_socket, Some("/run/docker-h1.sock".into()));
        assert_eq!((c.mesh_port, c.mesh_tunnel_offload), (51821, false));
        let off = Config::parse("node = \"h\"\n[docker]\nenabled = false\n").unwrap();
        assert_eq!((off.docker_socket, off.docker_plugin_socket), (None, None));
        let default = Config::parse("node = \"h\"\n").unwrap();
        assert_eq!(default.docker_socket, Some(DEFAULT_DOCKER_SOCKET.into()));
        assert_eq!(
            default.docker_plugin_socket,
            Some(DEFAULT_PLUGIN_SOCKET.into())
        );
        let no_plugin = Config::parse("node = \"h\"\n[docker]\nplugin_socket = \"\"\n").unwrap();
        assert_eq!(no_plugin.docker_plugin_socket, None);
        assert!(
            Config::parse("node = \"h\"\n[docker]\nplugin_socket = \"x.sock\"\n")
                .unwrap_err()
                .to_string()
                .contains("absolute")
        );
        assert_eq!(
            (
                default.dns_keeper_socket.as_path(),
                default.dns_keep_sockets
            ),
            (
                Path::new("/run/netagent/netagent-dns-keeper.sock"),
                Duration::from_secs(DEFAULT_KEEP_SOCKETS_SECS)
            )
        );
        let kept_not = Config::parse("node = \"h\"\n[dns]\nkeep_sockets_secs = 0\n").unwrap();
        assert_eq!(kept_not.dns_keep_sockets, Duration::ZERO);
        assert_eq!(
            (default.mesh_port, default.mesh_tunnel_offload),
            (51820, true)
        );
        assert_eq!(c.node, "host1");
        assert_eq!(c.dns_ttl, 7);
        assert_eq!(c.dns_upstream[1], "192.0.2.54:5353".parse().unwrap());
        match c.store {
            StoreConfig::Etcd {
                lease_ttl,
                ref prefix,
                ..
            } => {
                assert_eq!(lease_ttl, Duration::from_secs(3));
                assert_eq!(prefix, "/netagent/");
            }
            StoreConfig::Local => panic!("etcd expected"),
        }
    }

    #[test]
    fn names_the_line_of_a_bad_value() {
        let e = Config::parse(
            "node = \"h\"\n[store]\netcd = [\"http://a:2379\"]\nlease_ttl_secs = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "line 4: lease_ttl_secs = 0 is out of range 1..=60 (default 5)"
        );
        let e = Config::parse("node = \"h\"\nunderlay_address = \"192.0.2.300\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = Config::parse("node = \"h\"\nnodes = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("unknown field `nodes`"),
            "{e}"
        );
        let e = Config::parse("node = \"h\"\n[dns]\nupstream = [\"resolver\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 3: upstream \"resolver\""), "{e}");
    }
}
