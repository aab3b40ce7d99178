//! Batched UDP I/O: one `recvmmsg` takes up to [`BATCH`] queries and one `sendmmsg`
//! sends their answers, so under load a query costs a fraction of a system call
//! instead of two. Non-blocking; the caller drives readiness through tokio.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Queries taken per system call at most.
pub const BATCH: usize = 32;
/// Buffers a new socket starts with: an agent has one socket per attached namespace,
/// most of them nearly idle, so a batch grows only where queries queue up.
const FIRST_BATCH: usize = 2;
const BUF: usize = 4096;

/// Receive buffers and peer addresses for one batch.
pub struct Batch {
    bufs: Vec<[u8; BUF]>,
    peers: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    peer_lens: Vec<libc::socklen_t>,
    count: usize,
}

impl Batch {
    pub fn new() -> Self {
        Self {
            bufs: vec![[0u8; BUF]; FIRST_BATCH],
            // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
            peers: vec![unsafe { zeroed() }; FIRST_BATCH],
            lens: vec![0; FIRST_BATCH],
            peer_lens: vec![0; FIRST_BATCH],
            count: 0,
        }
    }

    /// Doubles the batch (up to BATCH) after a receive that filled it.
    fn grow(&mut self) {
        let to = (self.bufs.len() * 2).min(BATCH);
        self.bufs.resize(to, [0u8; BUF]);
        // SAFETY: as in `new`.
        self.peers.resize(to, unsafe { zeroed() });
        self.lens.resize(to, 0);
        self.peer_lens.resize(to, 0);
    }

    /// Receives as many queries as are waiting (up to BATCH) without blocking.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        if self.count == self.bufs.len() && self.bufs.len() < BATCH {
            self.grow();
        }
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: BUF,
            })
            .collect();
        let storage = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(self.peers.iter_mut())
            .map(|(iov, peer)| header(peer, storage, iov))
            .collect();
        // SAFETY: msgs holds one valid header per buffer, pointing into self's buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, m) in msgs.iter().take(n).enumerate() {
            self.lens[i] = m.msg_len as usize;
            self.peer_lens[i] = m.msg_hdr.msg_namelen;
        }
        self.count = n;
        Ok(n)
    }

    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        to_socket_addr(&self.peers[i])
    }

    /// Sends `replies[k] = (query index, bytes)` to the queries' senders in one call;
    /// returns how many went out (the caller sends the rest one by one).
    pub fn send(&self, fd: RawFd, replies: &[(usize, Vec<u8>)]) -> io::Result<usize> {
        if replies.is_empty() {
            return Ok(0);
        }
        let mut iovs: Vec<libc::iovec> = replies
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // The kernel only reads the peer addresses when sending; the cast to *mut is
        // what the C struct's type demands.
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(replies)
            .map(|(iov, (i, _))| {
                let peer = &self.peers[*i] as *const libc::sockaddr_storage as *mut _;
                header(peer, self.peer_lens[*i], iov)
            })
            .collect();
        // SAFETY: msgs holds valid headers for `replies.len()` messages.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// One message header: a peer address buffer and one buffer of data. The pointers
/// must outlive the system call the header is passed to.
fn header(
    peer: *mut libc::sockaddr_storage,
    peer_len: libc::socklen_t,
    iov: &mut libc::iovec,
) -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain data; all-zero is valid (no control data, no flags).
    let mut m: libc::mmsghdr = unsafe { zeroed() };
    m.msg_hdr.msg_name = peer.cast();
    m.msg_hdr.msg_namelen = peer_len;
    m.msg_hdr.msg_iov = iov;
    m.msg_hdr.msg_iovlen = 1;
    m
}

fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn receives_a_batch_and_answers_each_sender() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        for (i, text) in ["one", "two", "three", "four", "five"].iter().enumerate() {
            let sender = if i % 2 == 0 { &a } else { &b };
            sender.send_to(text.as_bytes(), to).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut batch = Batch::new();
        // A new batch is small; having been filled, it grows and takes the rest.
        assert_eq!(batch.recv(server.as_raw_fd()).unwrap(), FIRST_BATCH);
        assert_eq!(batch.packet(1), b"two");
        assert_eq!(batch.recv(server.as_raw_fd()).unwrap(), 3);
        assert_eq!(batch.packet(1), b"four");
        assert_eq!(batch.peer(1), Some(b.local_addr().unwrap()));
        let replies: Vec<(usize, Vec<u8>)> = (0..3)
            .map(|i| (i, [b"re:", batch.packet(i)].concat()))
            .collect();
        assert_eq!(batch.send(server.as_raw_fd(), &replies).unwrap(), 3);
        let mut buf = [0u8; 64];
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"re:four");
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"re:three");
        // Nothing waiting: WouldBlock, not a hang.
        assert_eq!(
            batch.recv(server.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
