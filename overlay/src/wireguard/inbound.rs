//! The inbound thread: UDP → decrypt → device, with the checks every datagram passes
//! before it reaches a peer's session and every packet before it reaches the device.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tracing::debug;

use super::peers::{PeerState, Peers};
use super::receive::{self, Classified, Dropped, Opened};
use super::{io, offload, scope, Shared};
use crate::constants::ENCRYPTED_VXLAN_PORT;

/// The Ethernet source of frames written to the mesh device (any unicast address
/// but the device's own).
const SENDER_MAC: [u8; 6] = [0x02, 0x6e, 0x61, 0x77, 0x67, 0x00];

/// UDP → decrypt → device; consecutive packets of one TCP stream go as one burst.
pub(super) fn run(s: &Shared) -> std::result::Result<(), String> {
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
        if !io::wait_readable(s.udp.as_raw_fd(), io::POLL_MS) {
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
                Classified::Drop(why) => {
                    debug!(%from, len = datagram.len(), ?why, "datagram dropped unopened");
                    s.drops.count(why);
                    continue;
                }
                Classified::CookieReply(len) => {
                    s.drops.count(Dropped::RateLimited);
                    replies.push(len, from);
                    continue;
                }
                Classified::Index(index) => peers
                    .by_index
                    .get(&index)
                    .cloned()
                    .ok_or(Dropped::NoSession),
                Classified::Initiation => {
                    initiator(s, &peers, datagram).ok_or(Dropped::UnknownPeer)
                }
            };
            let peer = match peer {
                Ok(peer) => peer,
                Err(why) => {
                    debug!(%from, ?why, "datagram from no known peer; dropped");
                    s.drops.count(why);
                    continue;
                }
            };
            let mut tunn = peer.tunn.lock();
            let room = &mut out[offload::FRAME_HEADROOM..];
            let opened = receive::open(&mut tunn, *from.ip(), datagram, room);
            if opened.authenticated() {
                // The peer is where this came from (roaming).
                *peer.endpoint.lock() = from;
            }
            match opened {
                Opened::Nothing => {}
                Opened::Refused(why) => {
                    debug!(%from, peer = %peer.address, ?why, "datagram refused");
                    s.drops.count(why);
                }
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
                        s.drops.count(Dropped::OutOfScope);
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
