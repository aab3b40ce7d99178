//! systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per
//! message to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). The
//! agent says `READY=1` once it has reconciled with the store, keeps a one-line
//! `STATUS=`, pings the watchdog (`WATCHDOG=1`) from the async runtime, and says
//! `STOPPING=1` on the way out. Without `$NOTIFY_SOCKET` every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{debug, warn};

use crate::api::Status;
use crate::store::StoreHealth;

/// How often the running agent's status line is looked at.
const STATUS_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Notifier {
    target: Option<Arc<(UnixDatagram, SocketAddr)>>,
    /// Half the watchdog's timeout, when systemd set one for this process.
    watchdog_every: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let target = var("NOTIFY_SOCKET").and_then(|path| match open(&path) {
            Ok(target) => Some(Arc::new(target)),
            Err(e) => {
                warn!(NOTIFY_SOCKET = path, error = %e, "cannot notify systemd");
                None
            }
        });
        let ours = var("WATCHDOG_PID").is_none_or(|pid| pid == std::process::id().to_string());
        let watchdog_every = var("WATCHDOG_USEC")
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(|usec| Duration::from_micros(usec) / 2)
            .filter(|_| target.is_some());
        Notifier {
            target,
            watchdog_every,
        }
    }

    /// Sends one message; a full or missing receiver loses it (never blocks).
    fn send(&self, message: &str) {
        if let Some((socket, address)) = self.target.as_deref() {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), address) {
                debug!(error = %e, message, "systemd notification not sent");
            }
        }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Follows the store's health until dropped (never returns): what the agent
    /// waits for.
    pub async fn report_starting(&self, mut health: watch::Receiver<StoreHealth>) {
        if self.target.is_none() {
            return std::future::pending().await;
        }
        let mut watchdog = self.watchdog_ticks();
        let (mut last, mut open) = (String::new(), true);
        loop {
            let line = starting_status(&health.borrow_and_update());
            if line != last {
                self.send(&format!("STATUS={line}"));
                last = line;
            }
            tokio::select! {
                changed = health.changed(), if open => open = changed.is_ok(),
                _ = watchdog.tick(), if self.watchdog_every.is_some() => self.send("WATCHDOG=1"),
                else => return std::future::pending().await,
            }
        }
    }

    /// Keeps `STATUS=` to `summary` and pings the watchdog, until dropped. The ping
    /// follows a fresh summary, which reads the agent's state: a runtime that no
    /// longer runs tasks, or an agent whose state stays locked, stops the pings and
    /// systemd restarts it.
    pub async fn report_running(self, summary: impl Fn() -> String) {
        if self.target.is_none() {
            return;
        }
        let mut status = tokio::time::interval(STATUS_EVERY);
        status.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut watchdog = self.watchdog_ticks();
        let mut last = String::new();
        loop {
            let ping = tokio::select! {
                _ = status.tick() => false,
                _ = watchdog.tick(), if self.watchdog_every.is_some() => true,
            };
            let line = summary();
            if line != last {
                self.send(&format!("STATUS={line}"));
                last = line;
            }
            if ping {
                self.send("WATCHDOG=1");
            }
        }
    }

    fn watchdog_ticks(&self) -> tokio::time::Interval {
        let mut ticks = tokio::time::interval(self.watchdog_every.unwrap_or(STATUS_EVERY));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks
    }
}

/// A socket to send from, and `path`'s address (`@name`: abstract).
fn open(path: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let address = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor @name",
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    // A receiver that stops reading must not hold up the runtime.
    socket.set_nonblocking(true)?;
    Ok((socket, address))
}

fn starting_status(h: &StoreHealth) -> String {
    format!(
        "starting: waiting for {} at {} ({})",
        h.kind,
        h.location,
        h.error.as_deref().unwrap_or("connecting")
    )
}

/// The running agent in one line, as `systemctl status` shows it.
pub fn summary(s: &Status) -> String {
    let mut line = format!(
        "{}: {} peers ({} up), {} endpoints ({} here), {} networks",
        s.state,
        s.peers_up + s.peers_down,
        s.peers_up,
        s.endpoints,
        s.local_endpoints,
        s.networks
    );
    if !s.store.connected {
        line.push_str(&format!(
            "; {} unreachable: {}",
            s.store.kind,
            s.store.error.as_deref().unwrap_or("connecting")
        ));
    }
    line
}

/// The listening socket systemd passed under `name` (a socket unit's
/// `FileDescriptorName=`), if this process was started with one: the socket-activation
/// protocol's `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, descriptors from 3 on.
/// Each descriptor is taken at most once per process.
pub fn listening_socket(name: &str) -> Option<std::os::unix::net::UnixListener> {
    use std::os::fd::FromRawFd;
    static TAKEN: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    const FIRST: i32 = 3;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let count: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let index = names.split(':').position(|n| n == name)? as i32;
    if index >= count {
        return None;
    }
    let fd = FIRST + index;
    let mut taken = TAKEN.lock().unwrap();
    if taken.contains(&fd) {
        return None;
    }
    taken.push(fd);
    // SAFETY: systemd handed this descriptor to this process, and it is taken once.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // A unix socket with a path, or not ours to serve.
    let bound = listener.local_addr().ok()?.as_pathname().is_some();
    if !bound {
        warn!(
            fd,
            name, "systemd passed a descriptor that is not a unix socket with a path; ignored"
        );
        return None;
    }
    // A copy closed on exec (systemd's descriptor is not): the programs the agent
    // runs must not hold the plugin socket open. systemd's descriptors are blocking;
    // tokio needs them not to be.
    let listener = listener.try_clone().ok()?;
    listener.set_nonblocking(true).ok()?;
    Some(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("netagent-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let by_path = UnixDatagram::bind(&path).unwrap();
        let name = format!("netagent-notify-test-{}", std::process::id());
        let by_name =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        for (target, receiver) in [
            (path.display().to_string(), &by_path),
            (format!("@{name}"), &by_name),
        ] {
            let n = Notifier {
                target: Some(Arc::new(open(&target).unwrap())),
                watchdog_every: None,
            };
            n.ready();
            let mut buf = [0; 64];
            let len = receiver.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"READY=1");
        }
        assert!(open("relative").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
