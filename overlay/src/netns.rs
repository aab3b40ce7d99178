//! Network namespaces: naming one, opening it, and running work inside it.
//!
//! `setns(2)` changes only the calling OS thread, and tokio moves tasks between threads,
//! so nothing here ever enters a namespace on a runtime worker: work that must happen
//! inside a namespace runs on a short-lived dedicated thread, and netlink sockets are
//! created on such a thread (a socket stays bound to the namespace it was born in) and
//! then driven from the runtime like any other socket.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Receive buffer of a namespace's DNS socket: room for about 500 queries while no
/// agent reads (a restart), without letting many namespaces take much of the host's
/// UDP memory.
const DNS_RECEIVE_BUFFER: usize = 512 << 10;

/// Where a network namespace is: the caller's own, a bind-mounted path such as
/// `/run/netns/x`, or the namespace of a running process.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NetnsRef {
    Current,
    Path(PathBuf),
    Pid(u32),
}

impl NetnsRef {
    /// Parses the forms users type: `pid:123`, a path, or `self`.
    pub fn parse(s: &str) -> Result<Self> {
        if s == "self" || s == "current" {
            return Ok(Self::Current);
        }
        if let Some(pid) = s.strip_prefix("pid:") {
            let pid = pid
                .parse()
                .map_err(|_| Error::Invalid(format!("{s:?}: expected pid:<number>")))?;
            return Ok(Self::Pid(pid));
        }
        if s.starts_with('/') {
            return Ok(Self::Path(PathBuf::from(s)));
        }
        Err(Error::Invalid(format!(
            "{s:?} is not a namespace: give a path (/run/netns/NAME), pid:N or self"
        )))
    }
}

impl NetnsRef {
    /// The namespace's identity: the inode of its nsfs file, equal however the
    /// namespace is named (path or pid) and different for a new namespace at an old
    /// name. A `stat`; blocking, so call it off the runtime's workers.
    pub fn identity(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = self.file_path();
        let meta = std::fs::metadata(&path).map_err(|source| self.open_error(path, source))?;
        Ok(meta.ino())
    }
}

impl NetnsRef {
    /// Waits until the path names a network namespace (an nsfs file, not the empty
    /// file a bind mount is made over) and returns its identity. For a namespace
    /// another program is about to create, such as the sandbox of a container Docker
    /// is starting; blocking, so call it off the runtime's workers.
    pub fn wait_for_namespace(&self, limit: std::time::Duration) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        const NSFS_MAGIC: i64 = 0x6e73_6673;
        let path = self.file_path();
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(file) = File::open(&path) {
                let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
                // SAFETY: fstatfs writes into the buffer it is given; the fd is open.
                let ok = unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) } == 0;
                // SAFETY: initialised by the successful call.
                if ok && unsafe { fs.assume_init() }.f_type == NSFS_MAGIC {
                    let ino = file
                        .metadata()
                        .map_err(|source| self.open_error(path.clone(), source))?
                        .ino();
                    return Ok(ino);
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::OpenNetns {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no network namespace appeared within {limit:?}"),
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The nsfs file naming this namespace.
    fn file_path(&self) -> PathBuf {
        match self {
            NetnsRef::Current => PathBuf::from("/proc/self/ns/net"),
            NetnsRef::Path(p) => p.clone(),
            NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }

    /// A missing process is named as such; anything else names the file.
    fn open_error(&self, path: PathBuf, source: std::io::Error) -> Error {
        match self {
            NetnsRef::Pid(pid) if source.kind() == std::io::ErrorKind::NotFound => {
                Error::NoSuchProcess { pid: *pid }
            }
            _ => Error::OpenNetns { path, source },
        }
    }
}

impl TryFrom<String> for NetnsRef {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<NetnsRef> for String {
    fn from(r: NetnsRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Current => f.write_str("self"),
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Pid(pid) => write!(f, "pid:{pid}"),
        }
    }
}

/// An opened namespace. Holding the file keeps the namespace alive and pins it
/// even if the process it was found through exits.
#[derive(Clone)]
pub struct Netns {
    reference: NetnsRef,
    file: Option<Arc<File>>,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Netns({})", self.reference)
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reference.fmt(f)
    }
}

impl Netns {
    pub fn open(reference: &NetnsRef) -> Result<Self> {
        let path = match reference {
            NetnsRef::Current => {
                return Ok(Self {
                    reference: NetnsRef::Current,
                    file: None,
                })
            }
            _ => reference.file_path(),
        };
        let file = File::open(&path).map_err(|source| reference.open_error(path, source))?;
        Ok(Self {
            reference: reference.clone(),
            file: Some(Arc::new(file)),
        })
    }

    /// Opens the namespace and checks, on the opened file, that it is the one whose
    /// identity was recorded: a `pid:N` whose process exited may name another now.
    pub fn open_expecting(reference: &NetnsRef, identity: u64) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let ns = Self::open(reference)?;
        let found = match &ns.file {
            Some(f) => f.metadata().map(|m| m.ino()),
            None => std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()),
        }
        .map_err(|source| Error::OpenNetns {
            path: reference.file_path(),
            source,
        })?;
        if found != identity {
            return Err(Error::NetnsChanged {
                ns: reference.to_string(),
                expected: identity,
                found,
            });
        }
        Ok(ns)
    }

    pub fn reference(&self) -> &NetnsRef {
        &self.reference
    }

    /// The namespace's file descriptor, for netlink's "create in namespace" attribute;
    /// `None` for the caller's own namespace.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    /// Runs `work` on a dedicated OS thread that has entered this namespace, and
    /// awaits its result without blocking the runtime.
    pub async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let file = self.file.clone();
        let name = self.reference.to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                let result = enter(file.as_deref(), &name).and_then(|()| work());
                let _ = tx.send(result);
            })
            .map_err(|e| Error::Worker(e.to_string()))?;
        rx.await
            .map_err(|_| Error::Worker(format!("worker for {} panicked", self.reference)))?
    }

    /// Starts a long-lived thread named `thread` inside this namespace, for sockets
    /// read there for as long as their owner wants; `work` gets the outcome of entering.
    pub(crate) fn spawn_inside<F>(&self, thread: &str, work: F) -> Result<()>
    where
        F: FnOnce(Result<()>) + Send + 'static,
    {
        let file = self.file.clone();
        let name = self.reference.to_string();
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || work(enter(file.as_deref(), &name)))
            .map(|_| ())
            .map_err(|e| Error::Worker(e.to_string()))
    }

    /// A netlink handle whose socket lives in this namespace; its connection task is
    /// spawned on the current runtime.
    pub async fn netlink(&self) -> Result<rtnetlink::Handle> {
        let runtime = tokio::runtime::Handle::current();
        let name = self.reference.to_string();
        let make = move || {
            let _guard = runtime.enter();
            rtnetlink::new_connection().map_err(|e| Error::Netlink {
                op: "open netlink socket",
                object: "route".into(),
                ns: name,
                message: e.to_string(),
            })
        };
        let (connection, handle, _) = if self.file.is_none() {
            make()?
        } else {
            self.run(make).await?
        };
        tokio::spawn(connection);
        Ok(handle)
    }

    /// A UDP socket and a TCP listener bound to `addr` inside this namespace,
    /// non-blocking, ready to hand to tokio. The sockets keep the namespace alive
    /// until closed.
    pub async fn bind_listeners(
        &self,
        addr: std::net::SocketAddr,
    ) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
        let ns = self.reference.to_string();
        self.run(move || {
            let err = |source| Error::Listen {
                addr,
                ns: ns.clone(),
                source,
            };
            let udp = std::net::UdpSocket::bind(addr).map_err(err)?;
            udp.set_nonblocking(true).map_err(err)?;
            // Room for the queries that arrive while no agent reads (a restart);
            // best effort, the default buffer holds a few hundred.
            let _ = nix::sys::socket::setsockopt(
                &udp,
                nix::sys::socket::sockopt::RcvBufForce,
                &DNS_RECEIVE_BUFFER,
            );
            let tcp = std::net::TcpListener::bind(addr).map_err(err)?;
            tcp.set_nonblocking(true).map_err(err)?;
            Ok((udp, tcp))
        })
        .await
    }

    /// Writes a sysctl of this namespace (`/proc/sys/net` follows the writer's namespace).
    pub async fn write_sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.write_sysctls(&[(key.to_string(), value)]).await
    }

    /// Writes several sysctls of this namespace, in order, on one worker thread.
    pub async fn write_sysctls(&self, settings: &[(String, &str)]) -> Result<()> {
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        let ns = self.reference.to_string();
        self.run(move || {
            for (key, value) in settings {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                let current = std::fs::read_to_string(&path).unwrap_or_default();
                if current.trim() == value {
                    continue;
                }
                std::fs::write(&path, &value).map_err(|source| Error::Sysctl {
                    key,
                    ns: ns.clone(),
                    source,
                })?;
            }
            Ok(())
        })
        .await
    }
}

fn enter(file: Option<&File>, name: &str) -> Result<()> {
    match file {
        None => Ok(()),
        Some(file) => nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|source| Error::EnterNetns {
                ns: name.to_string(),
                source,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_forms() {
        assert_eq!(NetnsRef::parse("pid:42").unwrap(), NetnsRef::Pid(42));
        assert_eq!(
            NetnsRef::parse("/run/netns/a").unwrap(),
            NetnsRef::Path("/run/netns/a".into())
        );
        assert_eq!(NetnsRef::parse("self").unwrap(), NetnsRef::Current);
        assert!(NetnsRef::parse("pid:x").is_err());
        assert!(NetnsRef::parse("container1").is_err());
    }

    #[test]
    fn missing_pid_is_named() {
        let err = Netns::open(&NetnsRef::Pid(u32::MAX - 1)).unwrap_err();
        assert!(
            err.to_string().contains("process 4294967294 not found"),
            "{err}"
        );
    }
}
