//! The agent's side: finds the keeper (starting one if there is none), takes back
//! what it kept, and then keeps it up to date from a thread of its own.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use netagent_overlay::{received_listeners, spawn_in_new_session, HandoverChannel};
use tracing::{info, warn};

use super::protocol::Message;

/// A keeper that does not answer within this at start is not used (the agent starts
/// without).
const IO_LIMIT: Duration = Duration::from_secs(2);
/// Once running, a keeper that stalls a message this long is given up on.
const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Updates waiting for the link's thread, at most; beyond, they are dropped (and the
/// keeper's copy of that namespace goes stale, which only costs its next restart).
const QUEUE: usize = 4096;

/// A namespace's DNS sockets as the previous agent left them.
pub struct Inherited {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
}

/// One message for the keeper and the descriptors it carries.
type Update = (Message, Vec<OwnedFd>);

/// Updates for the keeper; sent in order from a thread, never blocking the caller.
pub struct KeeperLink {
    updates: Mutex<Option<mpsc::SyncSender<Update>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl KeeperLink {
    /// Connects to the keeper at `socket` (starting one that lets go `grace` after the
    /// last agent left) and takes back the sockets it kept: only those that really
    /// are bound to `addr` in the namespace they are filed under; the keeper is told
    /// to forget the others, which are returned too (their address may stay taken a
    /// moment). Blocking.
    pub fn open(
        socket: &Path,
        grace: Duration,
        addr: SocketAddr,
    ) -> io::Result<(KeeperLink, HashMap<u64, Inherited>, Vec<u64>)> {
        // A keeper that ends as we connect (its grace ran out): one more try, with a
        // keeper of our own.
        let (channel, inherited, refused) = match take(socket, grace, addr) {
            Ok(taken) => taken,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                take(socket, grace, addr)?
            }
            Err(e) => return Err(e),
        };
        channel.set_timeouts(STALL_LIMIT)?;
        let (updates, pending) = mpsc::sync_channel::<Update>(QUEUE);
        for ino in &refused {
            let _ = updates.try_send((Message::Forget(*ino), Vec::new()));
        }
        let thread = std::thread::Builder::new()
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
        let link = KeeperLink {
            updates: Mutex::new(Some(updates)),
            thread: Mutex::new(Some(thread)),
        };
        Ok((link, inherited, refused))
    }

    /// Keeps copies of namespace `ino`'s DNS sockets.
    pub fn keep(&self, ino: u64, udp: BorrowedFd<'_>, tcp: BorrowedFd<'_>) {
        match (udp.try_clone_to_owned(), tcp.try_clone_to_owned()) {
            (Ok(udp), Ok(tcp)) => self.send(Message::Put(ino), vec![udp, tcp]),
            _ => warn!(ino, "cannot copy the DNS sockets for the keeper"),
        }
    }

    /// Lets go of namespace `ino`'s sockets (it is no longer attached here, or this
    /// agent binds its own).
    pub fn forget(&self, ino: u64) {
        self.send(Message::Forget(ino), Vec::new());
    }

    fn send(&self, message: Message, fds: Vec<OwnedFd>) {
        if let Some(updates) = self.updates.lock().unwrap().as_ref() {
            if let Err(mpsc::TrySendError::Full(_)) = updates.try_send((message, fds)) {
                warn!("the DNS socket keeper is behind: an update was dropped");
            }
        }
    }

    /// Takes no more updates (the agent is stopping); the thread returned ends once
    /// it has sent what is queued (each message bounded by the keeper's I/O limit).
    pub fn close(&self) -> Option<std::thread::JoinHandle<()>> {
        drop(self.updates.lock().unwrap().take());
        self.thread.lock().unwrap().take()
    }
}

/// Connects (starting a keeper if none answers) and takes what it kept: the channel,
/// the usable sockets, and the namespaces whose sockets were refused.
type Taken = (HandoverChannel, HashMap<u64, Inherited>, Vec<u64>);

fn take(socket: &Path, grace: Duration, addr: SocketAddr) -> io::Result<Taken> {
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
    channel.set_timeouts(IO_LIMIT)?;
    channel.send(&Message::Take.encode(), &[])?;
    let mut inherited = HashMap::new();
    let mut refused = Vec::new();
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
                        warn!(ino, error = %e, "the keeper's sockets for this namespace are not usable; binding new ones");
                        refused.push(ino);
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
    Ok((channel, inherited, refused))
}

/// Tells a keeper running at `socket`, if any, to let go of everything and exit
/// (keeping is turned off, or the host is reset). Blocking, bounded.
pub fn stop_keeper(socket: &Path) -> io::Result<bool> {
    let Ok(channel) = HandoverChannel::connect(socket) else {
        return Ok(false);
    };
    if !channel.peer_is_same_user() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is served by another user; remove it", socket.display()),
        ));
    }
    channel.set_timeouts(IO_LIMIT)?;
    channel.send(&Message::Quit.encode(), &[])?;
    Ok(true)
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
