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
//! equal datagrams to one peer joined into one UDP GSO send (`outbound`); one
//! receives with recvmmsg and UDP GRO (up to 64 datagrams per message), decrypts,
//! joins packets of one TCP stream into bursts again and writes them to the device
//! (`inbound`); one drives the protocol's timers (handshakes, keepalives, rekeying;
//! `timers`). They share this host's keys (`keys`), the peer table (`peers`) and the
//! device and socket, whose syscalls are `io`'s. A packet is delivered only when it
//! decrypts under a peer's session and is VXLAN from that peer's mesh address into
//! an encrypted network both hosts are part of (`scope`).
//!
//! Before any per-peer lookup or Diffie-Hellman, handshake messages pass mac1 and one
//! rate limit shared by all peers (`receive`); a peer's endpoint moves only after a
//! datagram that proved it holds the peer's keys.

mod inbound;
mod io;
mod keys;
pub(crate) mod offload;
mod outbound;
mod peers;
mod receive;
mod scope;
mod timers;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tracing::{error, info};

use crate::constants::MESH_INTERFACE;
use crate::error::{Error, Result};
use crate::netns::Netns;
pub use keys::KeyPair;
use keys::Keys;
use peers::Peers;
pub use peers::{MeshPeer, PeerStats};

/// How the mesh runs on this host.
#[derive(Clone, Copy, Debug)]
pub struct MeshOptions {
    /// The WireGuard socket's port on the underlay address.
    pub listen_port: u16,
    /// Asks the kernel for TCP bursts inside VXLAN (Linux 6.17+); without, or where
    /// the kernel refuses, the datapath runs packet by packet.
    pub tunnel_offload: bool,
}

/// What the datapath threads share.
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
    /// Received datagrams dropped, by reason.
    drops: receive::DropCounts,
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
            drops: receive::DropCounts::default(),
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
            spawn("mesh-out", outbound::run),
            spawn("mesh-in", inbound::run),
            spawn("mesh-timers", timers::run),
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
        let (next, complete) = table.next(&previous, peers, &keys, &limiter);
        if !complete {
            // Tried again on the next call (the set is not remembered).
            self.shared.configured.lock().clear();
        }
        *table = next;
    }

    /// Replaces this host's key: every session starts over with a new handshake.
    pub fn set_keys(&self, keys: KeyPair) {
        let next = Keys::new(keys.clone());
        let limiter = next.limiter.clone();
        *self.shared.keys.write().unwrap() = next;
        self.shared.peers.read().unwrap().rekey(&keys, &limiter);
    }

    /// Why the datapath stopped by itself, if it did (the mesh must then be started
    /// again).
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().clone()
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        self.shared.peers.read().unwrap().stats()
    }

    /// Received datagrams dropped since the mesh started, by reason (every reason,
    /// as a metric label, with its count).
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.shared.drops.get()
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
