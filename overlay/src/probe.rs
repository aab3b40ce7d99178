//! Round-trip probes over the overlay: ICMP echo to each peer's gateway, so the time
//! covers both hosts' VXLAN paths, not just the underlay. A raw socket (root) on a
//! dedicated thread; one round sends every echo, then collects replies until a deadline.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::{Error, Result};

/// Echoes every target once; returns the round trip of those that answered in time.
pub async fn overlay_rtt(
    targets: Vec<Ipv4Addr>,
    deadline: Duration,
) -> Result<HashMap<Ipv4Addr, Duration>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("rtt-probe".into())
        .spawn(move || {
            let _ = tx.send(probe(&targets, deadline));
        })
        .map_err(|e| Error::Worker(e.to_string()))?;
    rx.await
        .map_err(|_| Error::Worker("rtt probe panicked".into()))?
        .map_err(|e| Error::Worker(format!("rtt probe: {e}")))
}

fn probe(targets: &[Ipv4Addr], deadline: Duration) -> std::io::Result<HashMap<Ipv4Addr, Duration>> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let id = (std::process::id() as u16) ^ 0x4e41;
    let mut sent = HashMap::new();
    for (seq, target) in targets.iter().enumerate() {
        let packet = echo_request(id, seq as u16);
        let to = SockAddr::from(SocketAddrV4::new(*target, 0));
        if socket.send_to(&packet, &to).is_ok() {
            sent.insert(seq as u16, (*target, Instant::now()));
        }
    }
    let mut rtts = HashMap::new();
    let end = Instant::now() + deadline;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while rtts.len() < sent.len() && Instant::now() < end {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        // SAFETY: recv_from initialised the first n bytes.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
        let Some(ihl) = bytes.first().map(|b| usize::from(b & 0x0f) * 4) else {
            continue;
        };
        let icmp = &bytes[ihl.min(n)..];
        if icmp.len() < 8 || icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != id {
            continue;
        }
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        if let (Some((target, at)), Some(src)) = (sent.get(&seq), from.as_socket_ipv4()) {
            if src.ip() == target {
                rtts.insert(*target, at.elapsed());
            }
        }
    }
    Ok(rtts)
}

fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"netagent");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksum_of_a_known_echo() {
        // An echo request with id 1, seq 1 and no data sums to 0xf7fd.
        let mut p = [8u8, 0, 0, 0, 0, 1, 0, 1];
        let sum = super::checksum(&p);
        assert_eq!(sum, 0xf7fd);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(super::checksum(&p), 0);
    }
}
