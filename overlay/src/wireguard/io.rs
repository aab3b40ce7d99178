//! The syscalls of the userspace datapath: the mesh device (TAP with offloads), and
//! batched UDP with recvmmsg/sendmmsg (one call moves up to [`BATCH`] datagrams).
//! Blocking; used only from the mesh's own threads.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use super::offload;

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;
/// Room for one datagram or packet: a 9000-byte (jumbo) mesh packet with WireGuard's
/// 32 bytes, and some to spare.
pub const BUF: usize = 9216;
/// Room for one frame from the mesh device: a virtio-net header, Ethernet and a
/// burst of up to 64 KiB.
pub const FRAME_BUF: usize = 70 * 1024;

/// `TUNSETOFFLOAD` bits: checksums left to us, TCP bursts, TCP bursts inside a UDP
/// tunnel (Linux 6.17+).
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x80;

/// The mesh device, as the kernel agreed to run it.
pub struct Device {
    pub file: File,
    /// Its Ethernet address: frames we write are addressed to it.
    pub mac: [u8; 6],
    /// Whether bursts inside VXLAN pass in both directions (else the kernel cuts
    /// them before they reach us, and we write packets one by one).
    pub tunnel_bursts: bool,
}

/// Creates (or opens) the TAP device `name` in the calling thread's namespace with a
/// virtio-net header on every frame and as many offloads as the kernel offers;
/// non-blocking. `tunnel_offload` false leaves bursts inside VXLAN to the kernel to cut.
pub fn open_tap(name: &str, tunnel_offload: bool) -> io::Result<Device> {
    // SAFETY: the path is a NUL-terminated literal that outlives the call; open
    // touches no other memory.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor (checked above); nothing else owns
    // it, so the File may close it.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain C data (integers, arrays, a union of them): all zero
    // bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `fd` is open (owned by `file`); TUNSETIFF reads and writes back one
    // `ifreq`, and `ifr` is one, exclusively borrowed for the call.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let size = offload::VNET_HDR_LEN as libc::c_int;
    // SAFETY: `fd` is open; TUNSETVNETHDRSZ reads one int, and `size` is one.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The tunnel fields are little-endian whatever the host.
    let on: libc::c_int = 1;
    // SAFETY: `fd` is open; TUNSETVNETLE reads one int, and `on` is one.
    unsafe { libc::ioctl(fd, libc::TUNSETVNETLE, &on) };
    let plain = TUN_F_CSUM | TUN_F_TSO4;
    let full = plain | TUN_F_UDP_TUNNEL_GSO;
    let tunnel_bursts = tunnel_offload
        // SAFETY: `fd` is open; TUNSETOFFLOAD takes its flags by value, no memory.
        && unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, full as libc::c_ulong) } == 0;
    if !tunnel_bursts {
        // SAFETY: as above: flags by value on an open descriptor.
        unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, plain as libc::c_ulong) };
    }
    // SAFETY: `fd` is open; SIOCGIFHWADDR writes one `ifreq`, and `ifr` is one,
    // exclusively borrowed for the call.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR succeeded, so the kernel wrote the `ifru_hwaddr` member;
    // any bytes are a valid `c_char` array anyway.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(hw) {
        *m = b as u8;
    }
    Ok(Device {
        file,
        mac,
        tunnel_bursts,
    })
}

/// Poll timeout of the I/O threads: how quickly they notice `stop`.
pub const POLL_MS: i32 = 200;

/// Waits until `fd` is readable or `timeout_ms` passes; true when readable.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one `pollfd`, exclusively borrowed, and a count of 1.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

/// One frame from the device into `buf`; None when none is waiting. An error means
/// the device is gone (deleted under us).
pub fn read_frame(dev: &File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which is
    // exclusively borrowed for the call; the descriptor is open (borrowed `dev`).
    let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok((n > 0).then_some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(e),
    }
}

/// One frame to the device (the kernel takes it as received on the interface).
pub fn write_frame(dev: &File, frame: &[u8]) {
    // SAFETY: the kernel reads `frame.len()` bytes from `frame`, borrowed for the
    // call; the descriptor is open (borrowed `dev`).
    unsafe { libc::write(dev.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
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

/// `setsockopt(SOL_UDP, UDP_SEGMENT)`: one send carries many equal datagrams.
const UDP_SEGMENT: libc::c_int = 103;
/// `setsockopt(SOL_UDP, UDP_GRO)`: the kernel hands over coalesced datagrams.
const UDP_GRO: libc::c_int = 104;
/// Segments per UDP GSO send (the kernel's limit is 64) and bytes per super-datagram.
const MAX_SEGMENTS: usize = 64;
const MAX_SUPER: usize = 65_000;
/// Super-datagrams per recvmmsg.
const RX_BATCH: usize = 8;
const RX_BUF: usize = 65_536;

/// Room for the control messages of one datagram, aligned as `struct cmsghdr` must be
/// (the CMSG macros hand out headers at its start, which Rust then reads and writes).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct ControlBuf([u8; CONTROL_LEN]);
const CONTROL_LEN: usize = 64;
const _: () = assert!(std::mem::align_of::<libc::cmsghdr>() <= 8);

impl ControlBuf {
    const EMPTY: ControlBuf = ControlBuf([0; CONTROL_LEN]);
}

/// Socket buffers of the WireGuard socket: room for bursts while a thread is busy
/// writing to the mesh device, instead of drops that TCP inside pays for.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// An integer socket option; best effort (the datapath works without, only slower).
fn set_option(socket: &UdpSocket, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: the kernel reads one `c_int` from `value`, a live local, and the
    // length passed is that of a `c_int`; the socket is open (borrowed).
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
}

/// Large send and receive buffers (forced past the sysctl limits; we run as root).
pub fn grow_buffers(socket: &UdpSocket) {
    for name in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        set_option(socket, libc::SOL_SOCKET, name, SOCKET_BUFFER);
    }
}

/// Lets the kernel keep datagrams from one sender together (UDP GRO): one receive
/// returns up to 64 of them, as they were sent with UDP GSO.
pub fn enable_gro(socket: &UdpSocket) {
    set_option(socket, libc::SOL_UDP, UDP_GRO, 1);
}

/// Consecutive datagrams to one destination with one size (the last may be
/// shorter): sent as one super-datagram that the kernel splits as late as it can
/// (UDP GSO), so routing, netfilter and the underlay see it once.
struct Run {
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    closed: bool,
    to: SocketAddrV4,
}

/// Datagrams to send, gathered into runs and then sent with one sendmmsg.
pub struct SendBatch {
    scratch: [u8; BUF],
    runs: Vec<Run>,
    active: usize,
    /// Datagrams gathered since the last flush.
    total: usize,
    // sendmmsg's arguments, refilled on each flush without allocating.
    control: Vec<ControlBuf>,
    to: Vec<libc::sockaddr_in>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            scratch: [0u8; BUF],
            runs: Vec::new(),
            active: 0,
            total: 0,
            control: Vec::new(),
            to: Vec::new(),
            iov: Vec::new(),
            msgs: Vec::new(),
        }
    }

    /// Enough for one flush: a batch of runs, or two full GSO sends' worth.
    pub fn is_full(&self) -> bool {
        self.active == BATCH || self.total >= 2 * MAX_SEGMENTS
    }

    /// The buffer the next datagram is written into.
    pub fn next_buf(&mut self) -> &mut [u8; BUF] {
        &mut self.scratch
    }

    /// Keeps the first `len` bytes of `next_buf` for `to`.
    pub fn push(&mut self, len: usize, to: SocketAddrV4) {
        self.total += 1;
        if self.active > 0 {
            let r = &mut self.runs[self.active - 1];
            if r.to == to
                && !r.closed
                && len <= r.segment
                && r.count < MAX_SEGMENTS
                && r.buf.len() + len <= MAX_SUPER
            {
                r.buf.extend_from_slice(&self.scratch[..len]);
                r.count += 1;
                // Only the last segment may be shorter.
                r.closed = len < r.segment;
                return;
            }
        }
        if self.active == self.runs.len() {
            self.runs.push(Run {
                buf: Vec::with_capacity(MAX_SUPER),
                segment: 0,
                count: 0,
                closed: false,
                to,
            });
        }
        let r = &mut self.runs[self.active];
        r.buf.clear();
        r.buf.extend_from_slice(&self.scratch[..len]);
        r.segment = len;
        r.count = 1;
        r.closed = false;
        r.to = to;
        self.active += 1;
    }

    /// Sends what was gathered (a full socket buffer drops, as a NIC queue would).
    pub fn flush(&mut self, socket: &UdpSocket) {
        let n = self.active;
        if n == 0 {
            return;
        }
        // SAFETY: CMSG_SPACE is arithmetic on a length; it touches no memory.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        debug_assert!(space <= CONTROL_LEN);
        let control = &mut self.control;
        control.clear();
        control.resize(n, ControlBuf::EMPTY);
        let to = &mut self.to;
        to.clear();
        to.extend(self.runs[..n].iter().map(|r| sockaddr(r.to)));
        let iov = &mut self.iov;
        iov.clear();
        iov.extend(self.runs[..n].iter_mut().map(|r| libc::iovec {
            iov_base: r.buf.as_mut_ptr().cast(),
            iov_len: r.buf.len(),
        }));
        let msgs = &mut self.msgs;
        msgs.clear();
        for i in 0..n {
            // SAFETY: `mmsghdr` is plain C data (integers and pointers): all zero bytes
            // (null pointers, zero lengths) are a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut to[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_hdr.msg_iov = &mut iov[i];
            h.msg_hdr.msg_iovlen = 1;
            if self.runs[i].count > 1 {
                h.msg_hdr.msg_control = control[i].0.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = space;
                // SAFETY: `msg_control` points to `space` bytes of a `ControlBuf`
                // (aligned for `cmsghdr`, larger than `space`), exclusively ours, and
                // `space` = CMSG_SPACE(2) holds a header and a u16, so CMSG_FIRSTHDR
                // returns a non-null, aligned header inside it; the u16 is written
                // unaligned within the same bytes.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(
                        libc::CMSG_DATA(cmsg).cast::<u16>(),
                        self.runs[i].segment as u16,
                    );
                }
            }
            msgs.push(h);
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: `msgs[sent..]` holds `n - sent` headers; each points to its own
            // `to`, `iov` and control entries and the iovec to a run's buffer, all
            // built above and left untouched (neither moved nor resized) until the
            // call returns; the socket is open (borrowed).
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
                // This message cannot go (e.g. no route); the others still may.
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
        self.active = 0;
        self.total = 0;
    }
}

fn wait_writable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one `pollfd`, exclusively borrowed, and a count of 1.
    unsafe { libc::poll(&mut p, 1, 100) };
}

/// Buffers for recvmmsg of coalesced (GRO) datagrams.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    from: Vec<libc::sockaddr_in>,
    control: Vec<ControlBuf>,
    lens: Vec<usize>,
    segments: Vec<usize>,
    // recvmmsg's arguments, built once: they point into the heap buffers above,
    // which never move.
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    pub fn new() -> Self {
        let mut b = RecvBatch {
            bufs: vec![vec![0u8; RX_BUF]; RX_BATCH],
            // SAFETY: `sockaddr_in` is plain C data: all zero bytes are a valid value.
            from: vec![unsafe { std::mem::zeroed() }; RX_BATCH],
            control: vec![ControlBuf::EMPTY; RX_BATCH],
            lens: vec![0; RX_BATCH],
            segments: vec![0; RX_BATCH],
            iov: Vec::with_capacity(RX_BATCH),
            msgs: Vec::with_capacity(RX_BATCH),
        };
        for buf in &mut b.bufs {
            b.iov.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: RX_BUF,
            });
        }
        for i in 0..RX_BATCH {
            // SAFETY: `mmsghdr` is plain C data (integers and pointers): all zero bytes
            // (null pointers, zero lengths) are a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut b.from[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_iov = &mut b.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = b.control[i].0.as_mut_ptr().cast();
            b.msgs.push(h);
        }
        b
    }

    /// Receives what is waiting; returns how many (possibly coalesced) messages.
    pub fn recv(&mut self, socket: &UdpSocket) -> usize {
        // The kernel shrinks these to what it wrote; give the full room again.
        for h in &mut self.msgs {
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_hdr.msg_controllen = CONTROL_LEN;
        }
        let msgs = &mut self.msgs;
        // SAFETY: `msgs` holds RX_BATCH headers, each pointing to its own `from`,
        // `control` and iovec entry (lengths reset above to those entries' sizes) and
        // the iovec to an RX_BUF-byte buffer; all are heap storage of `self`, built
        // once and never resized, so they stay put while `self` is exclusively
        // borrowed for the call; a null timeout is allowed; the socket is open.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                RX_BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        for (i, m) in msgs.iter().take(r as usize).enumerate() {
            let len = m.msg_len as usize;
            self.lens[i] = len;
            self.segments[i] = gro_segment(&m.msg_hdr).unwrap_or(len).max(1);
        }
        r as usize
    }

    /// The datagrams of the `i`th message (split at the GRO segment size) and their
    /// sender.
    pub fn get(&self, i: usize) -> (std::slice::Chunks<'_, u8>, SocketAddrV4) {
        let f = &self.from[i];
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(f.sin_addr.s_addr)),
            u16::from_be(f.sin_port),
        );
        (self.bufs[i][..self.lens[i]].chunks(self.segments[i]), from)
    }
}

/// The segment size the kernel reports for a coalesced receive.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: `h` was just filled by recvmmsg: its control pointer and length
    // describe a `ControlBuf` (aligned for `cmsghdr`) holding `msg_controllen` bytes
    // the kernel wrote. CMSG_FIRSTHDR and CMSG_NXTHDR return only headers that lie
    // wholly inside those bytes (or null), and the value is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(h);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            cmsg = libc::CMSG_NXTHDR(h, cmsg);
        }
    }
    None
}
