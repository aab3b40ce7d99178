//! A container's process, pinned by a pidfd, and the one file the agent edits inside
//! its filesystem.
//!
//! A process id alone names whichever process holds it now: a container that exits
//! between an inspect and an attach can hand its number to another process. A pidfd
//! names one process for good; anything read through `/proc/<pid>` and confirmed by a
//! live pidfd afterwards belonged to that process.
//!
//! Inside a container's filesystem every path is the container's to shape: symlinks,
//! FIFOs, devices, a swapped `/etc`. `/proc/<pid>/root/...` resolves absolute symlinks
//! against the host's root, so files there are only ever reached through an `O_PATH`
//! handle on the pinned root and `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`,
//! itself `O_PATH|O_NOFOLLOW` (nothing is opened until the file is known to be a
//! regular file of bounded size, and the one expected), never `O_CREAT`; it is then
//! reopened through that handle and rewritten on the same descriptor.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

use crate::error::{Error, Result};

/// A running process, pinned: while [`PinnedProcess::alive`] says so, its pid names
/// this process and no other (a pid is reused only after its process is reaped).
#[derive(Debug)]
pub struct PinnedProcess {
    pid: u32,
    pidfd: OwnedFd,
}

impl PinnedProcess {
    /// Pins process `pid`. Blocking (a syscall); fine on any thread.
    pub fn pin(pid: u32) -> Result<Self> {
        if pid == 0 {
            return Err(Error::NoSuchProcess { pid });
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1;
        // no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
        if fd < 0 {
            return Err(Error::NoSuchProcess { pid });
        }
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(PinnedProcess { pid, pidfd })
    }

    /// The process has not exited (signal 0 through the pidfd: no signal is sent).
    pub fn alive(&self) -> bool {
        // SAFETY: pidfd_send_signal with signal 0 only checks; the fd is ours and open.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        r == 0
    }

    /// Fails unless the pinned process still runs, so whatever was read through
    /// `/proc/<pid>` just before was this process's.
    fn confirm(&self) -> Result<()> {
        if self.alive() {
            Ok(())
        } else {
            Err(Error::NoSuchProcess { pid: self.pid })
        }
    }

    /// The identity (nsfs inode) of the process's network namespace.
    pub fn netns_identity(&self) -> Result<u64> {
        let path = format!("/proc/{}/ns/net", self.pid);
        let meta = std::fs::metadata(&path).map_err(|_| Error::NoSuchProcess { pid: self.pid })?;
        self.confirm()?;
        Ok(meta.ino())
    }

    /// An `O_PATH` handle on the process's root directory.
    pub fn root(&self) -> Result<OwnedFd> {
        let path = format!("/proc/{}/root", self.pid);
        let root = nix::fcntl::open(
            path.as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|_| Error::NoSuchProcess { pid: self.pid })?;
        self.confirm()?;
        Ok(root)
    }
}

/// Largest file [`rewrite_in_root`] reads (a resolv.conf is a few hundred bytes).
pub const MAX_CONTAINER_FILE: u64 = 64 * 1024;

/// What [`rewrite_in_root`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewrite {
    Unchanged,
    Rewritten,
}

/// Rewrites the regular file at `path` inside the filesystem whose root is `root`
/// (from [`PinnedProcess::root`]): `edit` gets the current text and returns the new
/// one. The file must already exist; symlinks resolve inside the root, a final
/// symlink, a magic link, a FIFO, a device or a file over [`MAX_CONTAINER_FILE`] is
/// refused. With `expected` (device and inode), the file must be that very file.
/// Blocking.
///
/// The path is first opened `O_PATH` (which opens nothing: a device node's driver
/// never sees it) and checked; only a regular file is then opened for writing,
/// through that handle, never through the path again.
pub fn rewrite_in_root(
    root: &OwnedFd,
    path: &str,
    expected: Option<(u64, u64)>,
    edit: impl FnOnce(&str) -> String,
) -> Result<Rewrite> {
    let refused = |why: String| Error::ContainerFile {
        path: path.to_owned(),
        why,
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let handle = openat2(root, path, how).map_err(|e| refused(format!("cannot open it: {e}")))?;
    let identity = |fd: &OwnedFd| -> Result<(bool, u64, u64, u64)> {
        let st = nix::sys::stat::fstat(fd).map_err(|e| refused(format!("cannot stat it: {e}")))?;
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        Ok((regular, st.st_dev, st.st_ino, st.st_size as u64))
    };
    let (regular, dev, ino, size) = identity(&handle)?;
    if !regular {
        return Err(refused("not a regular file".into()));
    }
    if expected.is_some_and(|e| e != (dev, ino)) {
        return Err(refused(
            "not the file the container engine made for it (replaced or redirected)".into(),
        ));
    }
    if size > MAX_CONTAINER_FILE {
        return Err(refused(format!(
            "{size} bytes, more than the {MAX_CONTAINER_FILE} allowed"
        )));
    }
    // Reopened through our own descriptor: the same inode, whatever the path says now.
    let reopen = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let fd = nix::fcntl::open(
        reopen.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| refused(format!("cannot open it for writing: {e}")))?;
    let (regular, dev2, ino2, _) = identity(&fd)?;
    if !regular || (dev2, ino2) != (dev, ino) {
        return Err(refused("it changed while it was opened".into()));
    }
    let mut file = File::from(fd);
    // Bounded even if the file grows while it is read.
    let mut bytes = Vec::with_capacity(size as usize);
    (&mut file)
        .take(MAX_CONTAINER_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| refused(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > MAX_CONTAINER_FILE {
        return Err(refused("it grew past the size allowed".into()));
    }
    let current = String::from_utf8_lossy(&bytes);
    let wanted = edit(&current);
    if wanted == current {
        return Ok(Rewrite::Unchanged);
    }
    let write = |file: &mut File| -> std::io::Result<()> {
        file.seek(SeekFrom::Start(0))?;
        file.write_all(wanted.as_bytes())?;
        file.set_len(wanted.len() as u64)
    };
    write(&mut file).map_err(|e| refused(format!("cannot write it: {e}")))?;
    Ok(Rewrite::Rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root_of(dir: &std::path::Path) -> OwnedFd {
        nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap()
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("netagent-pinned-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        dir
    }

    #[test]
    fn rewrites_a_regular_file_in_place() {
        let dir = scratch("regular");
        std::fs::write(dir.join("etc/resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        let root = root_of(&dir);
        let edit = |_: &str| "nameserver 127.0.0.11\n".to_owned();
        assert_eq!(
            rewrite_in_root(&root, "/etc/resolv.conf", None, edit).unwrap(),
            Rewrite::Rewritten
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/resolv.conf")).unwrap(),
            "nameserver 127.0.0.11\n"
        );
        assert_eq!(
            rewrite_in_root(&root, "/etc/resolv.conf", None, edit).unwrap(),
            Rewrite::Unchanged
        );
        // Another file than the one expected is refused.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.join("etc/resolv.conf")).unwrap();
        let right = Some((meta.dev(), meta.ino()));
        let wrong = Some((meta.dev(), meta.ino() + 1));
        assert!(rewrite_in_root(&root, "/etc/resolv.conf", wrong, edit).is_err());
        assert_eq!(
            rewrite_in_root(&root, "/etc/resolv.conf", right, edit).unwrap(),
            Rewrite::Unchanged
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_links_fifos_devices_missing_and_huge_files() {
        let dir = scratch("hostile");
        let outside = dir.with_extension("outside");
        std::fs::write(&outside, "host file\n").unwrap();
        let root = root_of(&dir);
        let edit = |_: &str| "nameserver 127.0.0.11\n".to_owned();
        // Missing: never created.
        assert!(rewrite_in_root(&root, "/etc/resolv.conf", None, edit).is_err());
        assert!(!dir.join("etc/resolv.conf").exists());
        // A final symlink pointing out of the root.
        symlink(&outside, dir.join("etc/resolv.conf")).unwrap();
        assert!(rewrite_in_root(&root, "/etc/resolv.conf", None, edit).is_err());
        // A directory symlink in the middle resolves inside the root, not the host.
        std::fs::remove_file(dir.join("etc/resolv.conf")).unwrap();
        std::fs::remove_dir(dir.join("etc")).unwrap();
        symlink(outside.parent().unwrap(), dir.join("etc")).unwrap();
        let name = outside.file_name().unwrap().to_str().unwrap();
        assert!(rewrite_in_root(&root, &format!("/etc/{name}"), None, edit).is_err());
        std::fs::remove_file(dir.join("etc")).unwrap();
        std::fs::create_dir(dir.join("etc")).unwrap();
        // A FIFO with no writer: refused at once, not waited on.
        nix::unistd::mkfifo(
            &dir.join("etc/resolv.conf"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert!(rewrite_in_root(&root, "/etc/resolv.conf", None, edit).is_err());
        std::fs::remove_file(dir.join("etc/resolv.conf")).unwrap();
        // A device node (a container with CAP_MKNOD can make one): never opened.
        if nix::unistd::geteuid().is_root() {
            nix::sys::stat::mknod(
                &dir.join("etc/resolv.conf"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 5),
            )
            .unwrap();
            let e = rewrite_in_root(&root, "/etc/resolv.conf", None, edit).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
            std::fs::remove_file(dir.join("etc/resolv.conf")).unwrap();
        }
        // Too large.
        std::fs::write(dir.join("etc/resolv.conf"), vec![b'#'; 70 * 1024]).unwrap();
        assert!(rewrite_in_root(&root, "/etc/resolv.conf", None, edit).is_err());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host file\n");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&outside).unwrap();
    }

    #[test]
    fn a_pinned_process_is_alive_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pinned = PinnedProcess::pin(child.id()).unwrap();
        assert!(pinned.alive());
        assert!(pinned.netns_identity().is_ok());
        assert!(pinned.root().is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!pinned.alive());
        assert!(pinned.netns_identity().is_err());
    }
}
