//! The keeper process: holds the sockets agents give it, gives them to any agent that
//! asks, and exits once it has been without an agent for its grace period.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netagent_overlay::{raise_descriptor_limit, wait_readable, HandoverChannel, HandoverListener};
use tracing::{info, warn};

use super::protocol::Message;

/// Agents connected at once, at most (an upgrade overlaps two; more is a fault).
const MAX_AGENTS: usize = 4;
/// Namespaces kept, at most: far above the namespaces one host attaches.
const MAX_ENTRIES: usize = 16_384;

/// The file beside the socket that names the keeper's process id.
pub fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

/// A stuck agent holds the keeper (single-threaded) at most this long per message.
const IO_LIMIT: Duration = Duration::from_secs(2);

/// Runs the keeper at `socket` until no agent has been connected for `grace`, or an
/// agent says QUIT.
pub fn run(socket: &Path, grace: Duration) -> Result<()> {
    raise_descriptor_limit();
    let listener = HandoverListener::bind(socket)
        .with_context(|| format!("cannot listen at {}", socket.display()))?;
    let me = std::process::id().to_string();
    write_pid_file(&pid_file(socket), &me)
        .with_context(|| format!("cannot write {}", pid_file(socket).display()))?;
    let mut keeper = Keeper::default();
    let mut agents: Vec<HandoverChannel> = Vec::new();
    let mut alone_since = Some(Instant::now());
    loop {
        let timeout = match alone_since {
            Some(t) if t.elapsed() >= grace => {
                info!(
                    kept = keeper.entries.len(),
                    "no agent for {grace:?}: letting go of the sockets"
                );
                break;
            }
            Some(t) => Some(grace - t.elapsed()),
            None => None,
        };
        let fds: Vec<BorrowedFd<'_>> = std::iter::once(listener.as_fd())
            .chain(agents.iter().map(AsFd::as_fd))
            .collect();
        let ready = wait_readable(&fds, timeout).context("waiting for agents")?;
        // Agents first, by index from the end so removals keep the indices valid.
        let mut quit = false;
        for i in (0..agents.len()).rev() {
            if !ready[i + 1] {
                continue;
            }
            match keeper.serve(&agents[i]) {
                Served::Ok => {}
                Served::Gone => {
                    agents.swap_remove(i);
                }
                Served::Quit => quit = true,
            }
        }
        if quit {
            info!(
                kept = keeper.entries.len(),
                "asked to quit: letting go of the sockets"
            );
            break;
        }
        if ready[0] {
            match listener.accept() {
                Ok(agent)
                    if agents.len() < MAX_AGENTS
                        && agent.peer_is_same_user()
                        && agent.set_timeouts(IO_LIMIT).is_ok() =>
                {
                    agents.push(agent)
                }
                Ok(_) => warn!("refused a connection: another user, or too many at once"),
                Err(e) => warn!(error = %e, "accept failed"),
            }
        }
        alone_since = match (agents.is_empty(), alone_since) {
            (true, None) => Some(Instant::now()),
            (true, since) => since,
            (false, _) => None,
        };
    }
    // Remove the files only if they are still ours (a newer keeper may have replaced
    // them). An agent connecting meanwhile sees the connection end and starts a new
    // keeper.
    if std::fs::read_to_string(pid_file(socket)).is_ok_and(|p| p == me) {
        let _ = std::fs::remove_file(pid_file(socket));
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}

/// Writes the pid file afresh, never through a link planted at its name.
fn write_pid_file(path: &Path, pid: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pid.as_bytes())
}

/// What became of an agent's message.
enum Served {
    Ok,
    /// The agent is gone or misbehaved: its connection is dropped.
    Gone,
    Quit,
}

#[derive(Default)]
struct Keeper {
    entries: HashMap<u64, Vec<OwnedFd>>,
}

impl Keeper {
    /// Handles one message from `agent`.
    fn serve(&mut self, agent: &HandoverChannel) -> Served {
        let (bytes, fds) = match agent.recv() {
            Ok(Some(m)) => m,
            Ok(None) => return Served::Gone,
            Err(e) => {
                warn!(error = %e, "unreadable message; dropping the connection");
                return Served::Gone;
            }
        };
        let Some(message) = Message::decode(&bytes).filter(|m| m.fds() == fds.len()) else {
            warn!("malformed message; dropping the connection");
            return Served::Gone;
        };
        match message {
            Message::Put(ino) => {
                if self.entries.len() < MAX_ENTRIES || self.entries.contains_key(&ino) {
                    self.entries.insert(ino, fds);
                } else {
                    warn!(ino, "too many namespaces kept; not keeping this one");
                }
                Served::Ok
            }
            Message::Forget(ino) => {
                self.entries.remove(&ino);
                Served::Ok
            }
            Message::Take => match self.give(agent) {
                Ok(()) => Served::Ok,
                Err(_) => Served::Gone,
            },
            Message::Quit => Served::Quit,
            Message::Hold(_) | Message::End => Served::Gone,
        }
    }

    fn give(&self, agent: &HandoverChannel) -> std::io::Result<()> {
        for (ino, fds) in &self.entries {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            agent.send(&Message::Hold(*ino).encode(), &borrowed)?;
        }
        agent.send(&Message::End.encode(), &[])
    }
}
