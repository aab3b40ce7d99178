//! Tells when a watched namespace reference may have stopped leading to its
//! namespace, so that a caller can check at once instead of polling.
//!
//! A `NetnsRef::Path` is watched through its directory: `ip netns del` (and
//! container engines) unmount and then unlink the file, which inotify reports as a
//! deletion in the parent directory. A `NetnsRef::Pid` is watched through a pidfd,
//! readable once the process has exited. One thread sleeps in `poll` on one inotify
//! descriptor, the pidfds and a pipe from the handle; nothing runs while nothing
//! happens. What this cannot see (an unmount without an unlink, `/proc` paths) is
//! left to the caller's slower full check.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::netns::NetnsRef;

/// What a watched directory reports that may mean a reference has gone (an
/// unmount of the directory's filesystem is reported without asking).
const DIR_EVENTS: u32 = libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// Watches a set of namespace references; dropping it stops the thread.
pub struct NetnsWatch {
    shared: Arc<Shared>,
    /// Write end of the pipe the thread polls: a byte asks it to take up the new
    /// set; closing it (on drop) stops the thread.
    poke: OwnedFd,
}

struct Shared {
    /// The references to watch, as last set.
    wanted: Mutex<HashSet<NetnsRef>>,
    /// Holds a permit from the first sign of a change until `changed` takes it.
    changed: Notify,
}

impl NetnsWatch {
    /// Starts watching nothing; see [`NetnsWatch::watch`].
    pub fn start() -> Result<Self> {
        let io = |what: &str| Error::Worker(format!("{what}: {}", std::io::Error::last_os_error()));
        // SAFETY: creates descriptors we then own.
        let inotify = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if inotify < 0 {
            return Err(io("inotify_init1"));
        }
        // SAFETY: `inotify` is fresh and ours alone.
        let inotify = unsafe { OwnedFd::from_raw_fd(inotify) };
        let mut fds = [0; 2];
        // SAFETY: `pipe2` fills the two descriptors we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io("pipe2"));
        }
        // SAFETY: both descriptors are fresh and ours alone.
        let (pokes, poke) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let shared = Arc::new(Shared {
            wanted: Mutex::new(HashSet::new()),
            changed: Notify::new(),
        });
        let mut watcher = Watcher {
            shared: shared.clone(),
            inotify,
            pokes,
            dirs: HashMap::new(),
            by_wd: HashMap::new(),
            pids: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("netns-watch".into())
            .spawn(move || watcher.run())
            .map_err(|e| Error::Worker(e.to_string()))?;
        Ok(NetnsWatch { shared, poke })
    }

    /// Watches exactly `refs` from now on (`NetnsRef::Current` is ignored). A
    /// reference that cannot be watched (its directory or process is gone already)
    /// counts as a change.
    pub fn watch(&self, refs: impl IntoIterator<Item = NetnsRef>) {
        let refs: HashSet<NetnsRef> = refs.into_iter().collect();
        {
            let mut wanted = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            if *wanted == refs {
                return;
            }
            *wanted = refs;
        }
        // SAFETY: writes one byte from a local; a full pipe already asks the same.
        unsafe { libc::write(self.poke.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    /// Returns once a watched reference may have gone since the last return (at
    /// once if one may have meanwhile).
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }
}

/// The thread's side: the descriptors and what each stands for.
struct Watcher {
    shared: Arc<Shared>,
    inotify: OwnedFd,
    pokes: OwnedFd,
    /// Watched directory → (watch descriptor, names in it that are references).
    dirs: HashMap<PathBuf, (i32, HashSet<OsString>)>,
    by_wd: HashMap<i32, PathBuf>,
    /// Watched pid → its pidfd; `None` once it fired or could not be opened, so
    /// that an exited process wakes the caller once.
    pids: HashMap<u32, Option<OwnedFd>>,
}

impl Watcher {
    fn run(&mut self) {
        debug!("watching attached namespaces");
        loop {
            let mut fds = vec![
                pollin(self.pokes.as_raw_fd()),
                pollin(self.inotify.as_raw_fd()),
            ];
            let pids: Vec<u32> = self
                .pids
                .iter()
                .filter_map(|(pid, fd)| {
                    fds.push(pollin(fd.as_ref()?.as_raw_fd()));
                    Some(*pid)
                })
                .collect();
            // SAFETY: polls descriptors we own, `fds.len()` of them.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, "cannot wait for namespaces to go; relying on the periodic check");
                return;
            }
            if fds[0].revents & libc::POLLHUP != 0 {
                break;
            }
            if fds[0].revents != 0 {
                drain(&self.pokes);
                self.follow_wanted();
            }
            if fds[1].revents != 0 && self.read_inotify() {
                self.shared.changed.notify_one();
            }
            let mut exited = false;
            for (pid, fd) in pids.iter().zip(&fds[2..]) {
                if fd.revents != 0 {
                    self.pids.insert(*pid, None);
                    exited = true;
                }
            }
            if exited {
                self.shared.changed.notify_one();
            }
        }
        debug!("stopped watching attached namespaces");
    }

    /// Brings the directory watches and pidfds in line with the wanted set.
    fn follow_wanted(&mut self) {
        let wanted = self
            .shared
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut names: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
        let mut pids = HashSet::new();
        for r in &wanted {
            match r {
                NetnsRef::Path(path) => {
                    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
                        // One directory, one key (one inotify watch): /var/run/netns
                        // and /run/netns are the same watch.
                        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
                        names.entry(dir).or_default().insert(name.to_owned());
                    }
                }
                NetnsRef::Pid(pid) => {
                    pids.insert(*pid);
                }
                NetnsRef::Current => {}
            }
        }
        let mut unwatchable = false;
        // Directories no longer wanted, then new ones and new names in kept ones.
        let unwanted: Vec<PathBuf> = self
            .dirs
            .keys()
            .filter(|d| !names.contains_key(*d))
            .cloned()
            .collect();
        for dir in unwanted {
            if let Some((wd, _)) = self.dirs.remove(&dir) {
                self.by_wd.remove(&wd);
                // SAFETY: removes a watch of our own inotify descriptor.
                unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
            }
        }
        for (dir, names) in names {
            if let Some((_, watched)) = self.dirs.get_mut(&dir) {
                *watched = names;
                continue;
            }
            match add_watch(&self.inotify, &dir) {
                Some(wd) => {
                    self.by_wd.insert(wd, dir.clone());
                    self.dirs.insert(dir, (wd, names));
                }
                None => unwatchable = true,
            }
        }
        self.pids.retain(|pid, _| pids.contains(pid));
        for pid in pids {
            if self.pids.contains_key(&pid) {
                continue;
            }
            let fd = pidfd_open(pid);
            unwatchable |= fd.is_none();
            self.pids.insert(pid, fd);
        }
        if unwatchable {
            self.shared.changed.notify_one();
        }
    }

    /// Reads the queued inotify events; whether one may mean a reference has gone.
    fn read_inotify(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut gone = false;
        loop {
            // SAFETY: reads into our own buffer, at most its length, without blocking.
            let n =
                unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return gone;
            }
            let mut events = &buf[..n as usize];
            while let Some((wd, mask, name, rest)) = next_event(events) {
                events = rest;
                gone |= self.event_means_gone(wd, mask, name);
            }
        }
    }

    fn event_means_gone(&mut self, wd: i32, mask: u32, name: &[u8]) -> bool {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            return true;
        }
        let Some(dir) = self.by_wd.get(&wd) else {
            // A watch we removed ourselves.
            return false;
        };
        if mask & libc::IN_IGNORED != 0 {
            // The directory itself went (or was unmounted): so did what was in it.
            let dir = dir.clone();
            self.by_wd.remove(&wd);
            self.dirs.remove(&dir);
            return true;
        }
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_UNMOUNT) != 0 {
            return true;
        }
        self.dirs
            .get(dir)
            .is_some_and(|(_, names)| names.contains(&OsString::from_vec(name.to_vec())))
    }
}

fn pollin(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Empties the non-blocking pipe.
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 64];
    // SAFETY: reads into our own buffer, at most its length, without blocking.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

fn add_watch(inotify: &OwnedFd, dir: &Path) -> Option<i32> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path and our own inotify descriptor.
    let wd = unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), path.as_ptr(), DIR_EVENTS) };
    if wd < 0 {
        debug!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "cannot watch directory");
        return None;
    }
    Some(wd)
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: `pidfd_open` returns a descriptor we then own, or fails.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        debug!(pid, error = %std::io::Error::last_os_error(), "cannot watch process");
        return None;
    }
    // SAFETY: fresh and ours alone.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The first `struct inotify_event` in `buf` as (wd, mask, name), and what follows.
fn next_event(buf: &[u8]) -> Option<(i32, u32, &[u8], &[u8])> {
    const HEADER: usize = 16;
    if buf.len() < HEADER {
        return None;
    }
    let wd = i32::from_ne_bytes(buf[0..4].try_into().ok()?);
    let mask = u32::from_ne_bytes(buf[4..8].try_into().ok()?);
    let len = u32::from_ne_bytes(buf[12..16].try_into().ok()?) as usize;
    let name = buf.get(HEADER..HEADER + len)?;
    let name = name.split(|b| *b == 0).next().unwrap_or(name);
    Some((wd, mask, name, &buf[HEADER + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Bounded wait for a wake: true if one came.
    fn woke(watch: &NetnsWatch, within: Duration) -> bool {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async { tokio::time::timeout(within, watch.changed()).await.is_ok() })
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netns-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_deleted_reference_wakes_and_others_do_not() {
        let dir = scratch_dir("delete");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        let watch = NetnsWatch::start().unwrap();
        watch.watch([NetnsRef::Path(a.clone())]);
        assert!(
            !woke(&watch, Duration::from_millis(200)),
            "woke for nothing"
        );
        // Another file in the same directory, and a new one, are not references.
        std::fs::remove_file(&b).unwrap();
        std::fs::write(dir.join("c"), b"").unwrap();
        assert!(
            !woke(&watch, Duration::from_millis(200)),
            "woke for another file"
        );
        std::fs::remove_file(&a).unwrap();
        assert!(
            woke(&watch, Duration::from_millis(100)),
            "no wake after the delete"
        );
        assert!(!woke(&watch, Duration::from_millis(100)), "woke twice");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn references_through_two_spellings_of_one_directory_are_both_watched() {
        let dir = scratch_dir("alias");
        let alias = dir.with_extension("alias");
        let _ = std::fs::remove_file(&alias);
        std::os::unix::fs::symlink(&dir, &alias).unwrap();
        let (a, b) = (dir.join("a"), alias.join("b"));
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        let watch = NetnsWatch::start().unwrap();
        watch.watch([NetnsRef::Path(a.clone()), NetnsRef::Path(b.clone())]);
        assert!(
            !woke(&watch, Duration::from_millis(200)),
            "woke for nothing"
        );
        std::fs::remove_file(&b).unwrap();
        assert!(
            woke(&watch, Duration::from_millis(100)),
            "the reference through the other spelling went unseen"
        );
        // Dropping one of them leaves the other watched.
        watch.watch([NetnsRef::Path(a.clone())]);
        std::thread::sleep(Duration::from_millis(50));
        std::fs::remove_file(&a).unwrap();
        assert!(woke(&watch, Duration::from_millis(100)));
        let _ = std::fs::remove_file(&alias);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwatched_reference_does_not_wake() {
        let dir = scratch_dir("unwatch");
        let a = dir.join("a");
        std::fs::write(&a, b"").unwrap();
        let watch = NetnsWatch::start().unwrap();
        watch.watch([NetnsRef::Path(a.clone())]);
        watch.watch([]);
        // Let the thread take up the empty set before the delete.
        std::thread::sleep(Duration::from_millis(50));
        std::fs::remove_file(&a).unwrap();
        assert!(!woke(&watch, Duration::from_millis(200)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_reference_wakes_at_once() {
        let watch = NetnsWatch::start().unwrap();
        watch.watch([NetnsRef::Path("/nonexistent-netns-dir/x".into())]);
        assert!(woke(&watch, Duration::from_millis(100)));
    }

    #[test]
    fn a_process_exit_wakes() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let watch = NetnsWatch::start().unwrap();
        watch.watch([NetnsRef::Pid(child.id())]);
        assert!(
            !woke(&watch, Duration::from_millis(100)),
            "woke while it ran"
        );
        assert!(
            woke(&watch, Duration::from_millis(500)),
            "no wake after the exit"
        );
        child.wait().unwrap();
        // Once per exit, not again while the reference stays watched.
        assert!(!woke(&watch, Duration::from_millis(100)));
    }
}
