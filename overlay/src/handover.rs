//! Handing open sockets from one process to another: a local `SOCK_SEQPACKET`
//! channel whose messages carry file descriptors (`SCM_RIGHTS`), and a check of which
//! network namespace a received socket lives in. The agent's DNS sockets outlive a
//! restart this way: a keeper process holds copies, and the next agent takes them.
//!
//! Blocking calls: the keeper is a process of its own; the agent uses them off the
//! runtime's workers.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

/// Descriptors one message may carry at most; more are closed on arrival.
pub const MAX_FDS: usize = 4;
/// Bytes of one message at most.
pub const MAX_MESSAGE: usize = 1024;

fn io_error(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// A listening channel at a filesystem path, readable by its owner only.
pub struct HandoverListener {
    fd: OwnedFd,
}

impl HandoverListener {
    /// Listens at `path`, replacing a socket file left there by a process that is
    /// gone (one that still answers is left alone: an error).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = seqpacket()?;
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            match HandoverChannel::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is served by a running process", path.display()),
                    ))
                }
                Err(_) => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let addr = UnixAddr::new(path).map_err(io_error)?;
        // Owner-only from the first moment: the umask applies to the socket file.
        // (The mask is the process's: called where no other thread creates files.)
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(0o177));
        let bound = socket::bind(fd.as_raw_fd(), &addr).map_err(io_error);
        umask(old);
        bound?;
        socket::listen(&fd, Backlog::new(16).map_err(io_error)?).map_err(io_error)?;
        Ok(Self { fd })
    }

    /// The next connection (blocking unless the socket is non-blocking).
    pub fn accept(&self) -> io::Result<HandoverChannel> {
        let raw = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(io_error)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(HandoverChannel { fd })
    }
}

impl AsFd for HandoverListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One connected end: messages with descriptors, in order.
pub struct HandoverChannel {
    fd: OwnedFd,
}

impl HandoverChannel {
    /// Connects to a listener at `path`; a listener whose backlog is full (a hung
    /// process) makes this fail after 2 s instead of waiting for ever.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(io_error)?;
        let channel = Self { fd };
        channel.set_timeouts(std::time::Duration::from_secs(2))?;
        socket::connect(channel.fd.as_raw_fd(), &addr).map_err(io_error)?;
        Ok(channel)
    }

    /// The user id of the process at the other end, as the kernel saw it connect.
    pub fn peer_uid(&self) -> io::Result<u32> {
        let cred = socket::getsockopt(&self.fd, sockopt::PeerCredentials).map_err(io_error)?;
        Ok(cred.uid())
    }

    /// Whether the other end runs as this process's effective user.
    pub fn peer_is_same_user(&self) -> bool {
        self.peer_uid()
            .is_ok_and(|uid| uid == nix::unistd::geteuid().as_raw())
    }

    /// Every send and receive on this channel gives up after `limit`: a peer that
    /// stops reading or answering cannot hold this process.
    pub fn set_timeouts(&self, limit: std::time::Duration) -> io::Result<()> {
        let t = nix::sys::time::TimeVal::new(limit.as_secs() as _, limit.subsec_micros() as _);
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &t).map_err(io_error)?;
        socket::setsockopt(&self.fd, sockopt::SendTimeout, &t).map_err(io_error)
    }

    /// Sends one message with `fds` (at most `MAX_FDS`, four).
    pub fn send(&self, message: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS || message.len() > MAX_MESSAGE || message.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message too long or too many descriptors",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(message)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io_error)?;
        Ok(())
    }

    /// Receives one message and the descriptors it carried; `None` when the other
    /// end has closed. A message whose descriptors did not all fit is refused (and
    /// the ones that arrived are closed).
    pub fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (bytes, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io_error)?;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel installed these descriptors for us just now.
                        fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC);
            (msg.bytes, fds, truncated)
        };
        if bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a message or its descriptors did not fit",
            ));
        }
        buf.truncate(bytes);
        Ok(Some((buf, fds)))
    }
}

impl AsFd for HandoverChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until any of `fds` is readable (or closed), at most `timeout` (None: for
/// ever); says which are. Interrupted by a signal: nothing is ready.
pub fn wait_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<bool>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
    };
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match poll(&mut polled, timeout) {
        Ok(_) => Ok(polled
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect()),
        Err(nix::errno::Errno::EINTR) => Ok(vec![false; fds.len()]),
        Err(e) => Err(io_error(e)),
    }
}

/// Starts `command` in a session of its own: it outlives this process and the
/// signals sent to this process's group (a terminal's Ctrl-C, a supervisor's stop).
pub fn spawn_in_new_session(
    command: &mut std::process::Command,
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(io_error));
    }
    command.spawn()
}

/// Raises this process's limit of open descriptors to its hard limit: the agent and
/// the keeper hold a few per attached namespace. Best effort.
pub fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_error)
}

/// The identity (nsfs inode) of the network namespace a socket was created in, as
/// [`NetnsRef::identity`](crate::NetnsRef::identity) gives it for a namespace: a
/// received socket is used for the namespace it really belongs to, whatever the
/// sender called it.
pub fn socket_namespace(socket: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor (or -1).
    let raw = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGSKNS as _) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a new descriptor that nothing else owns.
    let ns = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    Ok(ns.metadata()?.ino())
}

/// A UDP socket and a TCP listener received from another process, checked to be what
/// they are said to be: an IPv4 UDP socket and a listening TCP socket, both bound to
/// `addr`, both in the namespace with identity `namespace`. Non-blocking on return.
pub fn received_listeners(
    udp: OwnedFd,
    tcp: OwnedFd,
    addr: std::net::SocketAddr,
    namespace: u64,
) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let refuse = |what: &str| Err(io::Error::new(io::ErrorKind::InvalidData, what.to_string()));
    let kind = |fd: &OwnedFd| socket::getsockopt(fd, sockopt::SockType).map_err(io_error);
    if kind(&udp)? != SockType::Datagram || kind(&tcp)? != SockType::Stream {
        return refuse("not a UDP socket and a TCP socket");
    }
    if !socket::getsockopt(&tcp, sockopt::AcceptConn).map_err(io_error)? {
        return refuse("the TCP socket is not listening");
    }
    let udp = std::net::UdpSocket::from(udp);
    let tcp = std::net::TcpListener::from(tcp);
    if udp.local_addr()? != addr || tcp.local_addr()? != addr {
        return refuse("not bound to the DNS address");
    }
    if socket_namespace(udp.as_fd())? != namespace || socket_namespace(tcp.as_fd())? != namespace {
        return refuse("from another namespace");
    }
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    Ok((udp, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_the_channel_and_stay_the_same_socket() {
        let dir = std::env::temp_dir().join(format!("handover-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keeper.sock");
        let listener = HandoverListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "the socket file is its owner's alone");
        let client = HandoverChannel::connect(&path).unwrap();
        let server = listener.accept().unwrap();
        assert_eq!(server.peer_uid().unwrap(), nix::unistd::geteuid().as_raw());

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        client.send(b"PUT dns:1", &[udp.as_fd()]).unwrap();
        let (msg, mut fds) = server.recv().unwrap().unwrap();
        assert_eq!(msg, b"PUT dns:1");
        assert_eq!(fds.len(), 1);
        // The same socket: a datagram sent to the original address arrives on the copy.
        drop(udp);
        let copy = std::net::UdpSocket::from(fds.pop().unwrap());
        assert_eq!(copy.local_addr().unwrap(), addr);
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"still here", addr).unwrap();
        let mut buf = [0u8; 16];
        let n = copy.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still here");

        drop(client);
        assert!(
            server.recv().unwrap().is_none(),
            "end of stream once closed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_socket_names_the_namespace_it_lives_in() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ns = match socket_namespace(udp.as_fd()) {
            Ok(ns) => ns,
            // Without CAP_NET_ADMIN the kernel refuses; nothing to compare.
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("skipped: SIOCGSKNS needs CAP_NET_ADMIN (run as root)");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(ns, own);
    }
}
