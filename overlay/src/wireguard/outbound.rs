//! The outbound thread: device → encrypt → UDP.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use boringtun::noise::TunnResult;
use tracing::debug;

use super::{io, offload, Shared};
use crate::constants::MESH_INTERFACE;

/// WireGuard's bytes around a packet inside the UDP payload (header and tag).
const DATA_OVERHEAD: usize = 32;

/// Device → encrypt → UDP, in batches: a burst from the device is cut into packets
/// that each become one WireGuard datagram, sent together with UDP GSO.
pub(super) fn run(s: &Shared) -> std::result::Result<(), String> {
    let mut frame = vec![0u8; io::FRAME_BUF];
    let mut segment = [0u8; io::BUF];
    let mut batch = io::SendBatch::new();
    while !s.stop.load(Ordering::Relaxed) {
        if !io::wait_readable(s.dev.file.as_raw_fd(), io::POLL_MS) {
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
