//! Forged VXLAN, as an attacker (a container, or a machine on the underlay) would
//! send it, and the facts about a host's VXLAN devices a forgery needs.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use crate::run::sh_ok;
use crate::testbed::in_netns;

/// Whether a datagram to port 5555 (where [`forged_vxlan`]'s inner datagram goes)
/// arrives at `ip` inside `netns` within `wait`; listening when this returns.
pub fn listen_once(
    netns: &str,
    ip: Ipv4Addr,
    wait: Duration,
) -> std::thread::JoinHandle<Option<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = in_netns(netns, move || {
        let s = UdpSocket::bind((ip, 5555)).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 256];
        s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    });
    rx.recv().unwrap();
    h
}

/// A VXLAN packet (the UDP payload) carrying, inside network `vni`, a UDP datagram
/// from `src`:4444 to `dst`:5555, in a frame for the device with MAC `mac`.
pub fn forged_vxlan(
    vni: u32,
    mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&mac);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&4444u16.to_be_bytes());
    p.extend_from_slice(&5555u16.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The MAC of host `netns`'s VXLAN device for `vni`.
pub fn vxlan_mac(netns: &str, vni: u32) -> [u8; 6] {
    let out = sh_ok(&format!("ip -n {netns} -o link show dev nax{vni}"));
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("link/ether");
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// The first IPv4 address on `device` in host `netns` (a gateway on `nax<vni>`, the
/// mesh address on `nawg0`).
pub fn address_on(netns: &str, device: &str) -> Ipv4Addr {
    let out = sh_ok(&format!("ip -n {netns} -4 -o addr show dev {device}"));
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address on {device} in {netns}: {out}"))
}
