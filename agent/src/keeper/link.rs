//! The agent's side: finds the keeper (starting one if there is none), takes back
//! what it kept, and then keeps it up to date from a thread of its own.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netagent_overlay::{received_listeners, spawn_in_new_session, HandoverChannel};
use tracing::{info, warn};

use super::protocol::Message;

/// A namespace's DNS sockets as the previous agent left them.
pub struct Inherited {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
}

/// Updates for the keeper; sent in order from a thread, never blocking the caller.
pub struct KeeperLink {
    updates: mpsc::Sender<(Message, Vec<OwnedFd>)>,
}

impl KeeperLink {
    /// Connects to the keeper at `socket` (starting one that lets go `grace` after the
    /// last agent left) and takes back the sockets it kept: only those that really
    /// are bound to `addr` in the namespace they are filed under. Blocking.
    pub fn open(
        socket: &Path,
        grace: Duration,
        addr: SocketAddr,
    ) -> io::Result<(KeeperLink, HashMap<u64, Inherited>)> {
        let channel = match HandoverChannel::connect(socket) {
            Ok(c) => c,
            Err(_) => {
                start_keeper(socket, grace)?;
                connect_within(socket, Duration::from_secs(2))?
            }
        };
        if !channel.peer_is_same_user() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is served by another user; remove it", socket.display()),
            ));
        }
        channel.send(&Message::Take.encode(), &[])?;
        let mut inherited = HashMap::new();
        loop {
            let Some((bytes, fds)) = channel.recv()? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the keeper closed the connection",
                ));
            };
            match Message::decode(&bytes) {
                Some(Message::End) => break,
                Some(Message::Hold(ino)) if fds.len() == 2 => {
                    let mut fds = fds.into_iter();
                    let (udp, tcp) = (fds.next().unwrap(), fds.next().unwrap());
                    match received_listeners(udp, tcp, addr, ino) {
                        Ok((udp, tcp)) => {
                            inherited.insert(ino, Inherited { udp, tcp });
                        }
                        Err(e) => {
                            warn!(ino, error = %e, "the keeper's sockets for this namespace are not usable; binding new ones")
                        }
                    }
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the keeper sent something unexpected",
                    ))
                }
            }
        }
        let (updates, pending) = mpsc::channel::<(Message, Vec<OwnedFd>)>();
        std::thread::Builder::new()
            .name("dns-keeper".into())
            .spawn(move || {
                for (message, fds) in pending {
                    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                    if let Err(e) = channel.send(&message.encode(), &borrowed) {
                        warn!(error = %e, "the DNS socket keeper is gone: DNS sockets will not outlive this agent");
                        return;
                    }
                }
            })?;
        Ok((KeeperLink { updates }, inherited))
    }

    /// Keeps copies of namespace `ino`'s DNS sockets.
    pub fn keep(&self, ino: u64, udp: BorrowedFd<'_>, tcp: BorrowedFd<'_>) {
        match (udp.try_clone_to_owned(), tcp.try_clone_to_owned()) {
            (Ok(udp), Ok(tcp)) => {
                let _ = self.updates.send((Message::Put(ino), vec![udp, tcp]));
            }
            _ => warn!(ino, "cannot copy the DNS sockets for the keeper"),
        }
    }

    /// Lets go of namespace `ino`'s sockets (it is no longer attached).
    pub fn forget(&self, ino: u64) {
        let _ = self.updates.send((Message::Forget(ino), Vec::new()));
    }
}

/// Starts `netagent dns-keeper` in a session of its own, so that it outlives this
/// process and the signals sent to its group.
fn start_keeper(socket: &Path, grace: Duration) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("dns-keeper")
        .arg("--socket")
        .arg(socket)
        .arg("--grace")
        .arg(grace.as_secs().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = spawn_in_new_session(&mut command)?;
    info!(socket = %socket.display(), pid = child.id(), "started the DNS socket keeper");
    // Reaped here if it ends while this agent lives; otherwise init reaps it.
    std::thread::Builder::new()
        .name("dns-keeper-wait".into())
        .spawn(move || {
            let _ = child.wait();
        })?;
    Ok(())
}

fn connect_within(socket: &Path, limit: Duration) -> io::Result<HandoverChannel> {
    let start = Instant::now();
    loop {
        match HandoverChannel::connect(socket) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= limit => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "the DNS socket keeper did not come up at {}: {e}",
                        socket.display()
                    ),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
