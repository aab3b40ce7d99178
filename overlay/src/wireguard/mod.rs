//! The encrypted mesh: one device (`nawg0`) per host carrying the mesh address,
//! and a userspace WireGuard datapath around boringtun's `noise` state machines.
//! Encrypted networks' VXLAN runs over the mesh addresses, so every frame of theirs
//! between hosts leaves inside WireGuard.
//!
//! The device is a TAP with virtio-net headers and offloads: the kernel hands over a
//! TCP burst of up to 64 KiB (inside VXLAN) in one read and takes one back in one
//! write (see `offload`), so the kernel's per-packet work happens per burst.
//!
//! Three dedicated threads, no per-packet hand-off between them: one reads bursts
//! from the device, cuts and encrypts them and sends the batch with one sendmmsg,
//! equal datagrams to one peer joined into one UDP GSO send; one receives with
//! recvmmsg and UDP GRO (up to 64 datagrams per message), decrypts, joins packets of
//! one TCP stream into bursts again and writes them to the device;
//! one drives the protocol's timers (handshakes, keepalives, rekeying). A packet is
//! delivered only when it decrypts under a peer's session and is VXLAN from that
//! peer's mesh address into an encrypted network both hosts are part of (`scope`).
//!
//! Before any per-peer lookup or Diffie-Hellman, handshake messages pass mac1 and one
//! rate limit shared by all peers (`receive`); a peer's endpoint moves only after a
//! datagram that proved it holds the peer's keys.

mod io;
mod offload;
mod receive;
mod scope;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

// Spins briefly before sleeping: the in and out threads meet on a peer's session
// for a microsecond at a time, too short to be worth a futex wait.
use parking_lot::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::panic::AssertUnwindSafe;
use tracing::{debug, error, info};

use crate::error::{Error, Result};
use crate::host::ENCRYPTED_VXLAN_PORT;
use crate::netns::Netns;
use receive::{Classified, Opened};
use scope::Scope;

/// The mesh device on every host (a TAP without ARP).
pub const MESH_INTERFACE: &str = "nawg0";
/// WireGuard over IPv4: outer IP 20 + UDP 8 + data header 16 + authentication tag 16.
pub const WIREGUARD_OVERHEAD: u32 = 60;
/// WireGuard's bytes around a packet inside the UDP payload (header and tag).
const DATA_OVERHEAD: usize = 32;
/// The largest mesh MTU the datapath's buffers carry (jumbo frames; an underlay with
/// larger frames still gets 9000).
pub const MAX_MESH_MTU: u32 = 9000;

/// A host's key pair; the private half never leaves this process but to its file.
#[derive(Clone)]
pub struct KeyPair {
    secret: StaticSecret,
    /// Derived once: every handshake initiation and `status` needs it.
    public: PublicKey,
}

impl KeyPair {
    /// A new random key pair (from the kernel's random source).
    pub fn generate() -> std::io::Result<KeyPair> {
        let mut bytes = [0u8; 32];
        let mut f = File::open("/dev/urandom")?;
        std::io::Read::read_exact(&mut f, &mut bytes)?;
        Ok(KeyPair::from_private(bytes))
    }

    pub fn from_private(bytes: [u8; 32]) -> KeyPair {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        KeyPair { secret, public }
    }

    pub fn private_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private half.
        write!(f, "KeyPair(public {:02x?}..)", &self.public()[..4])
    }
}

/// How the mesh runs on this host.
#[derive(Clone, Copy, Debug)]
pub struct MeshOptions {
    /// The WireGuard socket's port on the underlay address.
    pub listen_port: u16,
    /// Asks the kernel for TCP bursts inside VXLAN (Linux 6.17+); without, or where
    /// the kernel refuses, the datapath runs packet by packet.
    pub tunnel_offload: bool,
}

/// Another host of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    pub public_key: [u8; 32],
    /// Where its WireGuard socket listens (its underlay address and port).
    pub endpoint: SocketAddrV4,
    /// Its address on the mesh: the only source accepted from it.
    pub address: Ipv4Addr,
    /// The VNIs of the encrypted networks both it and this host hold a block of: the
    /// only networks its packets may enter here.
    pub vnis: BTreeSet<u32>,
}

/// What `peers` shows of one mesh peer.
#[derive(Clone, Debug)]
pub struct PeerStats {
    pub public_key: [u8; 32],
    pub address: Ipv4Addr,
    /// Where its packets come from now (roaming followed).
    pub endpoint: SocketAddrV4,
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

struct PeerState {
    public_key: [u8; 32],
    address: Ipv4Addr,
    /// Our receiver index for it (random, 24 bits; boringtun adds 8 session bits).
    index: u32,
    endpoint: Mutex<SocketAddrV4>,
    tunn: Mutex<Tunn>,
    /// Follows the networks it shares with this host, its sessions untouched.
    scope: parking_lot::RwLock<Scope>,
}

#[derive(Default)]
struct Peers {
    by_address: HashMap<Ipv4Addr, Arc<PeerState>>,
    by_index: HashMap<u32, Arc<PeerState>>,
    by_key: HashMap<[u8; 32], Arc<PeerState>>,
}

/// This host's key pair and the handshake rate limiter of all peers, which checks
/// mac1 against our public key and so changes with the key.
struct Keys {
    pair: KeyPair,
    limiter: Arc<RateLimiter>,
}

impl Keys {
    fn new(pair: KeyPair) -> Keys {
        let limiter = Arc::new(RateLimiter::new(&pair.public, receive::LIMITER_COUNT));
        Keys { pair, limiter }
    }
}

struct Shared {
    dev: io::Device,
    udp: UdpSocket,
    /// This host's mesh address: the only destination a peer's packet may have.
    address: Ipv4Addr,
    keys: RwLock<Keys>,
    peers: RwLock<Peers>,
    /// The peer set last given to `set_peers`: the same again changes nothing.
    configured: Mutex<Vec<MeshPeer>>,
    stop: AtomicBool,
    /// Why the datapath stopped by itself (its device deleted, a thread's panic).
    failure: Mutex<Option<String>>,
}

/// Called (from a datapath thread) when the datapath stops by itself.
pub type OnFailure = Arc<dyn Fn() + Send + Sync>;

/// The running mesh datapath; stops (and its device goes) when dropped.
pub struct Mesh {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    pub address: Ipv4Addr,
}

impl Mesh {
    /// Creates the mesh device in `ns`, binds the WireGuard socket to `listen`, and
    /// starts the datapath threads (addressing the device is `Host::start_mesh`'s).
    pub(crate) async fn start(
        ns: &Netns,
        keys: KeyPair,
        address: Ipv4Addr,
        listen: SocketAddrV4,
        tunnel_offload: bool,
        on_failure: OnFailure,
    ) -> Result<Mesh> {
        let (dev, udp) = ns
            .run(move || {
                let dev =
                    io::open_tap(MESH_INTERFACE, tunnel_offload).map_err(|e| Error::Mesh {
                        message: format!(
                        "cannot create TAP device {MESH_INTERFACE}: {e} (is /dev/net/tun there?)"
                    ),
                    })?;
                // IPv4 only: no IPv6 neighbour discovery for the datapath to drop.
                let _ = std::fs::write(
                    format!("/proc/sys/net/ipv6/conf/{MESH_INTERFACE}/disable_ipv6"),
                    "1",
                );
                let udp = UdpSocket::bind(listen).map_err(|e| Error::Mesh {
                    message: format!(
                        "cannot listen for WireGuard on {listen}: {e}; set [mesh] listen_port"
                    ),
                })?;
                udp.set_nonblocking(true).map_err(|e| Error::Mesh {
                    message: e.to_string(),
                })?;
                io::enable_gro(&udp);
                io::grow_buffers(&udp);
                Ok((dev, udp))
            })
            .await?;
        if dev.tunnel_bursts {
            info!("mesh device {MESH_INTERFACE}: TCP bursts inside VXLAN pass whole");
        } else if tunnel_offload {
            info!("mesh device {MESH_INTERFACE}: this kernel cuts TCP bursts inside VXLAN before the device (Linux 6.17+ passes them whole); packet by packet");
        } else {
            info!("mesh device {MESH_INTERFACE}: packet by packet ([mesh] tunnel_offload = false)");
        }
        let shared = Arc::new(Shared {
            dev,
            udp,
            address,
            keys: RwLock::new(Keys::new(keys)),
            peers: RwLock::new(Peers::default()),
            configured: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        let spawn = |name: &'static str, f: fn(&Shared) -> std::result::Result<(), String>| {
            let s = shared.clone();
            let on_failure = on_failure.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| f(&s)));
                    if s.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let why = match outcome {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => e,
                        Err(_) => format!("thread {name} panicked"),
                    };
                    error!("encrypted mesh datapath stopped: {why}");
                    *s.failure.lock() = Some(why);
                    on_failure();
                })
                .expect("spawn a mesh thread")
        };
        let threads = vec![
            spawn("mesh-out", outbound),
            spawn("mesh-in", inbound),
            spawn("mesh-timers", timers),
        ];
        Ok(Mesh {
            shared,
            threads,
            address,
        })
    }

    /// Makes the peer set `peers`: a peer whose key is unchanged keeps its sessions
    /// and takes its new scope.
    pub fn set_peers(&self, peers: &[MeshPeer]) {
        // Called on every store change; the datapath's lock is taken only for a change.
        let previous = {
            let mut configured = self.shared.configured.lock();
            if configured.as_slice() == peers {
                return;
            }
            std::mem::replace(&mut *configured, peers.to_vec())
        };
        let (keys, limiter) = {
            let k = self.shared.keys.read().unwrap();
            (k.pair.clone(), k.limiter.clone())
        };
        let mut table = self.shared.peers.write().unwrap();
        let mut next = Peers::default();
        for p in peers {
            let state = match table.by_key.get(&p.public_key) {
                Some(existing) if existing.address == p.address => {
                    // A roamed endpoint stays unless the store's changed (a change of
                    // scope alone must not undo roaming).
                    let moved = !previous
                        .iter()
                        .any(|q| q.public_key == p.public_key && q.endpoint == p.endpoint);
                    if moved {
                        *existing.endpoint.lock() = p.endpoint;
                    }
                    *existing.scope.write() = Scope::new(p.vnis.iter().copied());
                    existing.clone()
                }
                _ => {
                    let taken =
                        |i: &u32| table.by_index.contains_key(i) || next.by_index.contains_key(i);
                    let index = match random_index(taken) {
                        Ok(index) => index,
                        Err(e) => {
                            // Tried again on the next call (the set is not remembered).
                            error!(peer = %p.address, error = %e, "no random receiver index; mesh peer left out for now");
                            self.shared.configured.lock().clear();
                            continue;
                        }
                    };
                    Arc::new(PeerState {
                        public_key: p.public_key,
                        address: p.address,
                        index,
                        endpoint: Mutex::new(p.endpoint),
                        tunn: Mutex::new(new_tunn(&keys, &limiter, p.public_key, index)),
                        scope: parking_lot::RwLock::new(Scope::new(p.vnis.iter().copied())),
                    })
                }
            };
            next.by_address.insert(state.address, state.clone());
            next.by_index.insert(state.index, state.clone());
            next.by_key.insert(state.public_key, state);
        }
        *table = next;
    }

    /// Replaces this host's key: every session starts over with a new handshake.
    pub fn set_keys(&self, keys: KeyPair) {
        let next = Keys::new(keys.clone());
        let limiter = next.limiter.clone();
        *self.shared.keys.write().unwrap() = next;
        let table = self.shared.peers.read().unwrap();
        for p in table.by_key.values() {
            p.tunn.lock().set_static_private(
                keys.secret.clone(),
                keys.public,
                Some(limiter.clone()),
            );
        }
    }

    /// Why the datapath stopped by itself, if it did (the mesh must then be started
    /// again).
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().clone()
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        let table = self.shared.peers.read().unwrap();
        table
            .by_key
            .values()
            .map(|p| {
                let (last_handshake, tx, rx, ..) = p.tunn.lock().stats();
                PeerStats {
                    public_key: p.public_key,
                    address: p.address,
                    endpoint: *p.endpoint.lock(),
                    last_handshake,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn new_tunn(keys: &KeyPair, limiter: &Arc<RateLimiter>, peer: [u8; 32], index: u32) -> Tunn {
    // Keepalive every 10 s: a restarted peer finds out quickly that our session is
    // gone, and a NAT on the way keeps its mapping.
    Tunn::new(
        keys.secret.clone(),
        PublicKey::from(peer),
        None,
        Some(10),
        index,
        Some(limiter.clone()),
    )
}

/// A receiver index from the kernel's random source, unused (and not 0): a sender
/// that guesses sequential indices finds no session by them.
fn random_index(taken: impl Fn(&u32) -> bool) -> std::result::Result<u32, getrandom::Error> {
    loop {
        let mut bytes = [0u8; 4];
        getrandom::getrandom(&mut bytes)?;
        let index = u32::from_le_bytes(bytes) & 0x00ff_ffff;
        if index != 0 && !taken(&index) {
            return Ok(index);
        }
    }
}

/// The Ethernet source of frames written to the mesh device (any unicast address
/// but the device's own).
const SENDER_MAC: [u8; 6] = [0x02, 0x6e, 0x61, 0x77, 0x67, 0x00];

/// Poll timeout of the I/O threads: how quickly they notice `stop`.
const POLL_MS: i32 = 200;

/// Device → encrypt → UDP, in batches: a burst from the device is cut into packets
/// that each become one WireGuard datagram, sent together with UDP GSO.
fn outbound(s: &Shared) -> std::result::Result<(), String> {
    let mut frame = vec![0u8; io::FRAME_BUF];
    let mut segment = [0u8; io::BUF];
    let mut batch = io::SendBatch::new();
    while !s.stop.load(Ordering::Relaxed) {
        if !io::wait_readable(s.dev.file.as_raw_fd(), POLL_MS) {
            continue;
        }
        let peers = s.peers.read().unwrap();
        while !batch.is_full() {
            let n = match io::read_frame(&s.dev.file, &mut frame) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return Err(format!("{MESH_INTERFACE} is gone ({e})")),
            };
            // IPv4 only: the destination is bytes 16..20.
            if n < offload::FRAME_HEADROOM + 20
                || frame[offload::VNET_HDR_LEN + 12..offload::FRAME_HEADROOM] != [0x08, 0x00]
            {
                continue;
            }
            let (hdr, ip) = frame[..n].split_at_mut(offload::FRAME_HEADROOM);
            let hdr = offload::VnetHeader::parse(hdr[..offload::VNET_HDR_LEN].try_into().unwrap());
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let Some(peer) = peers.by_address.get(&dst) else {
                continue;
            };
            let to = *peer.endpoint.lock();
            let mut tunn = peer.tunn.lock();
            let split = offload::split(&hdr, ip, &mut segment, |packet| {
                // boringtun panics on a buffer too small; the MTU keeps packets below.
                if packet.len() + DATA_OVERHEAD > io::BUF {
                    return;
                }
                if let TunnResult::WriteToNetwork(out) = tunn.encapsulate(packet, batch.next_buf())
                {
                    let len = out.len();
                    batch.push(len, to);
                }
            });
            if let Err(e) = split {
                debug!(error = %e, ?hdr, "frame from {MESH_INTERFACE} dropped");
            }
        }
        drop(peers);
        batch.flush(&s.udp);
    }
    Ok(())
}

/// UDP → decrypt → device; consecutive packets of one TCP stream go as one burst.
fn inbound(s: &Shared) -> std::result::Result<(), String> {
    let mut batch = io::RecvBatch::new();
    let mut out = [0u8; offload::FRAME_HEADROOM + io::BUF];
    let mut eth = [0u8; offload::ETH_LEN];
    eth[..6].copy_from_slice(&s.dev.mac);
    eth[6..12].copy_from_slice(&SENDER_MAC);
    eth[12..].copy_from_slice(&[0x08, 0x00]);
    let mut bursts = offload::Coalescer::new(eth, s.dev.tunnel_bursts);
    let mut write = |frame: &[u8]| io::write_frame(&s.dev.file, frame);
    let mut replies = io::SendBatch::new();
    while !s.stop.load(Ordering::Relaxed) {
        if !io::wait_readable(s.udp.as_raw_fd(), POLL_MS) {
            continue;
        }
        let n = batch.recv(&s.udp);
        let limiter = s.keys.read().unwrap().limiter.clone();
        let peers = s.peers.read().unwrap();
        let datagrams = (0..n).flat_map(|i| {
            let (chunks, from) = batch.get(i);
            chunks.map(move |d| (d, from))
        });
        for (datagram, from) in datagrams {
            if replies.is_full() {
                replies.flush(&s.udp);
            }
            // mac1 and the rate limit before any lookup or Diffie-Hellman.
            let peer = match receive::classify(
                &limiter,
                *from.ip(),
                datagram,
                io::BUF,
                replies.next_buf(),
            ) {
                Classified::Drop => {
                    debug!(%from, len = datagram.len(), "datagram dropped unopened");
                    continue;
                }
                Classified::CookieReply(len) => {
                    replies.push(len, from);
                    continue;
                }
                Classified::Index(index) => peers.by_index.get(&index).cloned(),
                Classified::Initiation => initiator(s, &peers, datagram),
            };
            let Some(peer) = peer else {
                debug!(%from, "datagram from no known peer; dropped");
                continue;
            };
            let mut tunn = peer.tunn.lock();
            let room = &mut out[offload::FRAME_HEADROOM..];
            let opened = receive::open(&mut tunn, *from.ip(), datagram, room);
            if opened.authenticated() {
                // The peer is where this came from (roaming).
                *peer.endpoint.lock() = from;
            }
            match opened {
                Opened::Nothing => debug!(%from, peer = %peer.address, "datagram refused"),
                Opened::Reply {
                    bytes,
                    authenticated,
                } => {
                    let len = bytes.len();
                    replies.next_buf()[..len].copy_from_slice(bytes);
                    replies.push(len, from);
                    // Packets queued while the handshake ran go now, to the peer
                    // (never to whoever earned a cookie reply).
                    if !authenticated {
                        continue;
                    }
                    loop {
                        if replies.is_full() {
                            replies.flush(&s.udp);
                        }
                        match tunn.decapsulate(None, &[], replies.next_buf()) {
                            TunnResult::WriteToNetwork(p) => {
                                let len = p.len();
                                replies.push(len, from);
                            }
                            _ => break,
                        }
                    }
                }
                Opened::Data {
                    packet: Some((packet, _)),
                } => {
                    let scope = peer.scope.read();
                    if !scope::admits(
                        packet,
                        peer.address,
                        s.address,
                        ENCRYPTED_VXLAN_PORT,
                        &scope,
                    ) {
                        debug!(peer = %peer.address, "packet outside the peer's networks dropped");
                        continue;
                    }
                    let len = offload::FRAME_HEADROOM + packet.len();
                    bursts.push(&mut out[..len], &mut write);
                }
                Opened::Data { packet: None } => {}
            }
        }
        drop(peers);
        bursts.flush(&mut write);
        replies.flush(&s.udp);
    }
    Ok(())
}

/// The peer a handshake initiation (mac1 and the rate limit passed) comes from, by
/// the static key it carries.
fn initiator(s: &Shared, peers: &Peers, datagram: &[u8]) -> Option<Arc<PeerState>> {
    let Ok(Packet::HandshakeInit(p)) = Tunn::parse_incoming_packet(datagram) else {
        return None;
    };
    let keys = s.keys.read().unwrap();
    let half = parse_handshake_anon(&keys.pair.secret, &keys.pair.public, &p).ok()?;
    peers.by_key.get(&half.peer_static_public).cloned()
}

/// Handshakes, keepalives and rekeying, four times a second.
fn timers(s: &Shared) -> std::result::Result<(), String> {
    let mut batch = io::SendBatch::new();
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        // The shared limiter counts handshakes per second: Tunn leaves resetting a
        // shared one to us (the limiter itself resets at most once a second).
        s.keys.read().unwrap().limiter.reset_count();
        let peers = s.peers.read().unwrap();
        for p in peers.by_key.values() {
            let to = *p.endpoint.lock();
            let mut tunn = p.tunn.lock();
            match tunn.update_timers(batch.next_buf()) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    batch.push(len, to);
                }
                TunnResult::Err(e) => debug!(peer = %p.address, error = ?e, "timer"),
                _ => {}
            }
            if batch.is_full() {
                batch.flush(&s.udp);
            }
        }
        drop(peers);
        batch.flush(&s.udp);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn receiver_indices_are_random_24_bit_and_unique() {
        let mut taken = HashSet::new();
        let mut order = Vec::new();
        for _ in 0..2000 {
            let index = random_index(|i| taken.contains(i)).unwrap();
            assert!(index != 0 && index <= 0x00ff_ffff, "{index:#x}");
            assert!(taken.insert(index), "{index:#x} given twice");
            order.push(index);
        }
        // Nothing a sender could guess from the last one: no run of neighbours.
        let neighbours = order
            .windows(2)
            .filter(|w| w[1].abs_diff(w[0]) < 256)
            .count();
        assert!(
            neighbours < 5,
            "{neighbours} indices close to the one before"
        );
        // Taken indices are skipped.
        for _ in 0..100 {
            assert_eq!(random_index(|i| i % 2 == 0).unwrap() % 2, 1);
        }
    }
}
