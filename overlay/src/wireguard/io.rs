//! The syscalls of the userspace datapath: the TUN device, and batched UDP with
//! recvmmsg/sendmmsg (one call moves up to [`BATCH`] datagrams). Blocking; used only
//! from the mesh's own threads.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;
/// Room for one datagram or packet (the mesh MTU is far below).
pub const BUF: usize = 2048;

/// Creates (or opens) the TUN device `name` in the calling thread's namespace:
/// layer 3, no packet-info header, non-blocking.
pub fn open_tun(name: &str) -> io::Result<File> {
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let file = unsafe { File::from_raw_fd(fd) };
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits until `fd` is readable or `timeout_ms` passes; true when readable.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

/// One packet from the TUN device into `buf`; None when none is waiting.
pub fn read_packet(tun: &File, buf: &mut [u8]) -> Option<usize> {
    let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then_some(n as usize)
}

/// One packet to the TUN device (the kernel takes it as received on the interface).
pub fn write_packet(tun: &File, packet: &[u8]) {
    unsafe { libc::write(tun.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Datagrams to send, gathered and then sent with one sendmmsg.
pub struct SendBatch {
    bufs: Vec<[u8; BUF]>,
    lens: Vec<usize>,
    to: Vec<libc::sockaddr_in>,
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            bufs: vec![[0u8; BUF]; BATCH],
            lens: Vec::with_capacity(BATCH),
            to: Vec::with_capacity(BATCH),
        }
    }

    pub fn is_full(&self) -> bool {
        self.lens.len() == BATCH
    }

    /// The buffer the next datagram is written into.
    pub fn next_buf(&mut self) -> &mut [u8; BUF] {
        let i = self.lens.len();
        &mut self.bufs[i]
    }

    /// Keeps the first `len` bytes of `next_buf` for `to`.
    pub fn push(&mut self, len: usize, to: SocketAddrV4) {
        self.lens.push(len);
        self.to.push(sockaddr(to));
    }

    /// Sends what was gathered (a full socket buffer drops, as a NIC queue would).
    pub fn flush(&mut self, socket: &UdpSocket) {
        let n = self.lens.len();
        if n == 0 {
            return;
        }
        let mut iov: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..n)
            .map(|i| {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (&mut self.to[i] as *mut libc::sockaddr_in).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_hdr.msg_iov = &mut iov[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut sent = 0;
        while sent < n {
            let r = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs[sent..].as_mut_ptr(),
                    (n - sent) as u32,
                    0,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    wait_writable(socket.as_raw_fd());
                    continue;
                }
                break;
            }
            sent += r as usize;
        }
        self.lens.clear();
        self.to.clear();
    }
}

fn wait_writable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    unsafe { libc::poll(&mut p, 1, 100) };
}

/// Buffers for recvmmsg.
pub struct RecvBatch {
    bufs: Vec<[u8; BUF]>,
    from: Vec<libc::sockaddr_in>,
    lens: Vec<usize>,
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![[0u8; BUF]; BATCH],
            from: vec![unsafe { std::mem::zeroed() }; BATCH],
            lens: vec![0; BATCH],
        }
    }

    /// Receives what is waiting (up to BATCH); returns how many.
    pub fn recv(&mut self, socket: &UdpSocket) -> usize {
        let mut iov: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: BUF,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|i| {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (&mut self.from[i] as *mut libc::sockaddr_in).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_hdr.msg_iov = &mut iov[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        for (i, m) in msgs.iter().take(r as usize).enumerate() {
            self.lens[i] = m.msg_len as usize;
        }
        r as usize
    }

    /// The `i`th datagram received and where it came from.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddrV4) {
        let f = &self.from[i];
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(f.sin_addr.s_addr)),
            u16::from_be(f.sin_port),
        );
        (&self.bufs[i][..self.lens[i]], from)
    }
}
