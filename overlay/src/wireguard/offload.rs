//! TUN offloads, the packet side: the mesh device hands over whole TCP bursts (up to
//! 64 KiB, also inside VXLAN) described by a virtio-net header, and takes bursts back
//! the same way. [`split`] cuts a burst into the packets WireGuard sends; a
//! [`Coalescer`] joins decrypted packets of one TCP stream into one burst again, so
//! the kernel runs VXLAN decapsulation, the routing hop into the container's veth
//! and the container's TCP once per burst instead of once per packet. Pure byte
//! work, no syscalls.
//!
//! Frames on the device are `[virtio-net header][Ethernet][IPv4 ...]`: the kernel
//! accepts GSO over a UDP tunnel only from a layer-2 device, so the mesh device is a
//! TAP without ARP.

use std::fmt;

/// `struct virtio_net_hdr_v1_hash_tunnel`: the header size that turns on the UDP
/// tunnel fields (Linux 6.17+; older kernels read the first 12 bytes and skip the rest).
pub const VNET_HDR_LEN: usize = 24;
pub const ETH_LEN: usize = 14;
/// Bytes in front of the IPv4 packet in a frame.
pub const FRAME_HEADROOM: usize = VNET_HDR_LEN + ETH_LEN;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
const GSO_UDP_TUNNEL_IPV6: u8 = 0x40;
const GSO_ECN: u8 = 0x80;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

// TCP flags.
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

/// The virtio-net header in front of every frame (little-endian fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub outer_th_offset: u16,
    pub inner_nh_offset: u16,
}

impl VnetHeader {
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> VnetHeader {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            outer_th_offset: u16_at(20),
            inner_nh_offset: u16_at(22),
        }
    }

    pub fn write(&self, b: &mut [u8]) {
        b[..VNET_HDR_LEN].fill(0);
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[20..22].copy_from_slice(&self.outer_th_offset.to_le_bytes());
        b[22..24].copy_from_slice(&self.inner_nh_offset.to_le_bytes());
    }
}

/// A frame from the device that cannot be sent as it is described.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

// ---- checksums ----

/// Ones' complement sum of `data` (big-endian 16-bit words) added to `acc`.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sets the header checksum of the IPv4 header at the start of `ip`.
fn set_ipv4_checksum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[10..12].fill(0);
    let c = !fold(sum(&ip[..ihl], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The TCP/UDP pseudo-header sum of the IPv4 header at the start of `ip`.
fn pseudo_header(ip: &[u8], proto: u8, l4_len: usize) -> u64 {
    sum(&ip[12..20], u64::from(proto) + l4_len as u64)
}

/// The header length of the IPv4 header at the start of `ip` (version 4, IHL 5 or
/// more); `None` for anything else.
fn ipv4_header_len(ip: &[u8]) -> Option<usize> {
    let first = *ip.first()?;
    let len = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && len >= 20).then_some(len)
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn put_u16(b: &mut [u8], i: usize, v: u16) {
    b[i..i + 2].copy_from_slice(&v.to_be_bytes());
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

// ---- device → network ----

/// Turns the IPv4 packet `ip` read from the device with header `hdr` into packets
/// ready for the wire, each passed to `emit`: a GSO burst (TCP, plain or inside a
/// UDP tunnel such as VXLAN) is cut at its segment size with every length, IP id,
/// sequence number, flag and checksum set as the kernel's own segmentation would; a
/// single packet with a checksum left to us gets it. `scratch` holds one segment.
pub fn split(
    hdr: &VnetHeader,
    ip: &mut [u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<(), Malformed> {
    // The header's offsets count from the Ethernet header.
    let offset = |v: u16| {
        usize::from(v)
            .checked_sub(ETH_LEN)
            .ok_or(Malformed("offset"))
    };
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let start = offset(hdr.csum_start)?;
            let at = start + usize::from(hdr.csum_offset);
            if at + 2 > ip.len() {
                return Err(Malformed("checksum offset past the packet"));
            }
            // The field holds the pseudo-header sum; the kernel left the rest to us.
            let c = !fold(sum(&ip[start..], 0));
            put_u16(ip, at, c);
        }
        emit(ip);
        return Ok(());
    }
    if hdr.gso_type & GSO_UDP_TUNNEL_IPV6 != 0
        || hdr.gso_type & !(GSO_UDP_TUNNEL_IPV4 | GSO_ECN) != GSO_TCPV4
    {
        return Err(Malformed("GSO type not offered"));
    }
    let tunnel = hdr.gso_type & GSO_UDP_TUNNEL_IPV4 != 0;
    let th = offset(hdr.csum_start)?;
    let nh = if tunnel {
        offset(hdr.inner_nh_offset)?
    } else {
        0
    };
    let outer_th = if tunnel {
        offset(hdr.outer_th_offset)?
    } else {
        0
    };
    if th + 20 > ip.len() || nh + 20 > th || (tunnel && (outer_th < 20 || outer_th + 8 > nh)) {
        return Err(Malformed("header offsets"));
    }
    // Each IPv4 header must end where the next header starts: the checksums below
    // cover IHL bytes, which a lying IHL would carry past the segment.
    if ipv4_header_len(&ip[nh..]) != Some(th - nh)
        || (tunnel && ipv4_header_len(ip) != Some(outer_th))
    {
        return Err(Malformed("IPv4 header length"));
    }
    let tcp_len = usize::from(ip[th + 12] >> 4) * 4;
    if tcp_len < 20 {
        return Err(Malformed("TCP data offset below 5"));
    }
    let headers = th + tcp_len;
    if headers >= ip.len() {
        return Err(Malformed("TCP header reaches the end of the burst"));
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(Malformed("segment size 0"));
    }
    if headers + mss > scratch.len().min(MAX_BURST) {
        return Err(Malformed("segment size"));
    }
    let (head, payload) = ip.split_at(headers);
    let outer_id = u16_at(head, 4);
    let inner_id = u16_at(head, nh + 4);
    let seq = u32_at(head, th + 4);
    let flags = head[th + 13];
    let count = payload.len().div_ceil(mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let len = headers + chunk.len();
        let seg = &mut scratch[..len];
        seg[..headers].copy_from_slice(head);
        seg[headers..].copy_from_slice(chunk);
        if tunnel {
            put_u16(seg, 2, len as u16);
            put_u16(seg, 4, outer_id.wrapping_add(i as u16));
            set_ipv4_checksum(seg);
            put_u16(seg, outer_th + 4, (len - outer_th) as u16);
            // No outer UDP checksum: the kernel offers tunnel GSO without it only.
            put_u16(seg, outer_th + 6, 0);
        }
        put_u16(seg, nh + 2, (len - nh) as u16);
        put_u16(seg, nh + 4, inner_id.wrapping_add(i as u16));
        set_ipv4_checksum(&mut seg[nh..]);
        seg[th + 4..th + 8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(FIN | PSH);
        }
        if i > 0 {
            f &= !CWR;
        }
        seg[th + 13] = f;
        put_u16(seg, th + 16, 0);
        let c = !fold(sum(
            &seg[th..],
            pseudo_header(&seg[nh..], PROTO_TCP, len - th),
        ));
        put_u16(seg, th + 16, c);
        emit(seg);
    }
    Ok(())
}

// ---- network → device ----

/// Where the parts of a VXLAN-carried TCP packet start (outer IPv4 without options).
const OUTER_UDP: usize = 20;
const VXLAN: usize = OUTER_UDP + 8;
const INNER_ETH: usize = VXLAN + 8;
const INNER_IP: usize = INNER_ETH + ETH_LEN;
const INNER_TCP: usize = INNER_IP + 20;
/// An IPv4 packet's length field caps a burst.
const MAX_BURST: usize = 65_535;

/// The TCP header's end and payload length when `ip` is a packet a burst can carry:
/// IPv4 without options or fragmentation, UDP without checksum, VXLAN, Ethernet,
/// IPv4 likewise, TCP with data and ACK and no flag that must stay on its own packet.
fn burstable(ip: &[u8]) -> Option<(usize, usize)> {
    if ip.len() <= INNER_TCP + 20
        || ip[0] != 0x45
        || u16_at(ip, 6) & 0x3fff != 0
        || ip[9] != PROTO_UDP
        || usize::from(u16_at(ip, 2)) != ip.len()
        || usize::from(u16_at(ip, OUTER_UDP + 4)) != ip.len() - OUTER_UDP
        || u16_at(ip, OUTER_UDP + 6) != 0
        || ip[VXLAN] != 0x08
        || ip[INNER_ETH + 12..INNER_ETH + 14] != ETHERTYPE_IPV4
        || ip[INNER_IP] != 0x45
        || u16_at(ip, INNER_IP + 6) & 0x3fff != 0
        || ip[INNER_IP + 9] != PROTO_TCP
        || usize::from(u16_at(ip, INNER_IP + 2)) != ip.len() - INNER_IP
    {
        return None;
    }
    let flags = ip[INNER_TCP + 13];
    if flags & ACK == 0 || flags & (FIN | SYN | RST | URG | ECE | CWR) != 0 {
        return None;
    }
    let headers = INNER_TCP + usize::from(ip[INNER_TCP + 12] >> 4) * 4;
    (headers >= INNER_TCP + 20 && headers < ip.len()).then_some((headers, ip.len() - headers))
}

/// Header bytes that must be equal for two packets to share a burst: all but
/// lengths, IP ids, checksums, the sequence number and PSH.
const SAME: [(usize, usize); 9] = [
    (0, 2),
    (6, 10),
    (12, OUTER_UDP + 4),
    (VXLAN, INNER_IP + 2),
    (INNER_IP + 6, INNER_IP + 10),
    (INNER_IP + 12, INNER_TCP + 4),
    (INNER_TCP + 8, INNER_TCP + 13),
    (INNER_TCP + 14, INNER_TCP + 16),
    (INNER_TCP + 18, INNER_TCP + 20),
];

/// Joins consecutive decrypted packets of one TCP stream over VXLAN into bursts for
/// the device; anything else passes through one by one, in order.
pub struct Coalescer {
    /// `[virtio-net header][Ethernet][burst]`.
    /// (Its Ethernet header, written once, is the one every frame carries.)
    buf: Vec<u8>,
    /// Whether the kernel takes GSO over a UDP tunnel (otherwise: packets only).
    enabled: bool,
    /// Bytes of the burst (from its outer IPv4 header); 0 when none is open.
    len: usize,
    headers: usize,
    segment: usize,
    count: usize,
    next_seq: u32,
    /// A shorter or PSH segment ends a burst.
    closed: bool,
    push_seen: bool,
}

impl Coalescer {
    pub fn new(eth: [u8; ETH_LEN], enabled: bool) -> Coalescer {
        let mut buf = vec![0u8; FRAME_HEADROOM + MAX_BURST];
        buf[VNET_HDR_LEN..FRAME_HEADROOM].copy_from_slice(&eth);
        Coalescer {
            buf,
            enabled,
            len: 0,
            headers: 0,
            segment: 0,
            count: 0,
            next_seq: 0,
            closed: false,
            push_seen: false,
        }
    }

    /// Takes the packet at `frame[FRAME_HEADROOM..]` (the room in front is ours to
    /// use): joined to the open burst, or starting one, or written as it is. `write`
    /// gets whole frames for the device.
    pub fn push(&mut self, frame: &mut [u8], write: &mut impl FnMut(&[u8])) {
        // No room for the headers in front: nothing a device could take.
        let Some(ip) = frame.get(FRAME_HEADROOM..) else {
            return;
        };
        let Some((headers, payload)) = burstable(ip).filter(|_| self.enabled) else {
            self.flush(write);
            VnetHeader::default().write(frame);
            frame[VNET_HDR_LEN..FRAME_HEADROOM]
                .copy_from_slice(&self.buf[VNET_HDR_LEN..FRAME_HEADROOM]);
            write(frame);
            return;
        };
        if self.len > 0 && !self.joins(ip, headers, payload) {
            self.flush(write);
        }
        let flags = ip[INNER_TCP + 13];
        if self.len == 0 {
            self.buf[FRAME_HEADROOM..FRAME_HEADROOM + ip.len()].copy_from_slice(ip);
            self.len = ip.len();
            self.headers = headers;
            self.segment = payload;
            self.count = 1;
            self.push_seen = false;
        } else {
            let at = FRAME_HEADROOM + self.len;
            self.buf[at..at + payload].copy_from_slice(&ip[headers..]);
            self.len += payload;
            self.count += 1;
            self.closed = payload < self.segment;
        }
        self.next_seq = u32_at(ip, INNER_TCP + 4).wrapping_add(payload as u32);
        if flags & PSH != 0 {
            self.push_seen = true;
            self.closed = true;
        }
    }

    fn joins(&self, ip: &[u8], headers: usize, payload: usize) -> bool {
        let open = &self.buf[FRAME_HEADROOM..FRAME_HEADROOM + self.len];
        !self.closed
            && headers == self.headers
            && payload <= self.segment
            && self.len + payload <= MAX_BURST
            && u32_at(ip, INNER_TCP + 4) == self.next_seq
            && SAME.iter().all(|&(a, b)| ip[a..b] == open[a..b])
            && ip[INNER_TCP + 13] & !PSH == open[INNER_TCP + 13] & !PSH
            // TCP options (timestamps) as well, as the kernel's own GRO requires.
            && ip[INNER_TCP + 20..headers] == open[INNER_TCP + 20..headers]
    }

    /// Writes the open burst, if any.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8])) {
        if self.len == 0 {
            return;
        }
        let len = self.len;
        let frame = &mut self.buf[..FRAME_HEADROOM + len];
        if self.count == 1 {
            VnetHeader::default().write(frame);
        } else {
            let ip = &mut frame[FRAME_HEADROOM..];
            put_u16(ip, 2, len as u16);
            set_ipv4_checksum(ip);
            put_u16(ip, OUTER_UDP + 4, (len - OUTER_UDP) as u16);
            put_u16(ip, INNER_IP + 2, (len - INNER_IP) as u16);
            set_ipv4_checksum(&mut ip[INNER_IP..]);
            if self.push_seen {
                ip[INNER_TCP + 13] |= PSH;
            }
            // A partial checksum: the pseudo-header sum, the rest left undone (the
            // data was authenticated by WireGuard; the kernel checks no further).
            let pseudo = fold(pseudo_header(&ip[INNER_IP..], PROTO_TCP, len - INNER_TCP));
            put_u16(ip, INNER_TCP + 16, pseudo);
            VnetHeader {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
                hdr_len: (ETH_LEN + self.headers) as u16,
                gso_size: self.segment as u16,
                csum_start: (ETH_LEN + INNER_TCP) as u16,
                csum_offset: 16,
                outer_th_offset: (ETH_LEN + OUTER_UDP) as u16,
                inner_nh_offset: (ETH_LEN + INNER_IP) as u16,
            }
            .write(frame);
        }
        write(frame);
        self.len = 0;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VXLAN-carried TCP packet with `payload` bytes of data at sequence `seq`.
    fn vxlan_tcp(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let len = INNER_TCP + 32 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        put_u16(&mut p, 2, len as u16);
        put_u16(&mut p, 4, 7);
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[100, 127, 192, 1]);
        p[16..20].copy_from_slice(&[100, 127, 192, 2]);
        set_ipv4_checksum(&mut p);
        put_u16(&mut p, OUTER_UDP, 40000);
        put_u16(&mut p, OUTER_UDP + 2, 4790);
        put_u16(&mut p, OUTER_UDP + 4, (len - OUTER_UDP) as u16);
        p[VXLAN] = 0x08;
        p[VXLAN + 6] = 42;
        p[INNER_ETH..INNER_ETH + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
        p[INNER_ETH + 12..INNER_ETH + 14].copy_from_slice(&ETHERTYPE_IPV4);
        let ip = &mut p[INNER_IP..];
        ip[0] = 0x45;
        put_u16(ip, 2, (len - INNER_IP) as u16);
        put_u16(ip, 4, 100);
        put_u16(ip, 6, 0x4000);
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&[198, 51, 100, 2]);
        ip[16..20].copy_from_slice(&[198, 51, 100, 3]);
        set_ipv4_checksum(ip);
        let t = &mut p[INNER_TCP..];
        put_u16(t, 0, 5201);
        put_u16(t, 2, 40001);
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&9u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = flags;
        put_u16(t, 14, 500);
        // Timestamp option: NOP NOP TS.
        t[20..24].copy_from_slice(&[1, 1, 8, 10]);
        t[24..28].copy_from_slice(&77u32.to_be_bytes());
        t[32..].copy_from_slice(payload);
        let c = !fold(sum(
            &p[INNER_TCP..],
            pseudo_header(&p[INNER_IP..], PROTO_TCP, len - INNER_TCP),
        ));
        put_u16(&mut p, INNER_TCP + 16, c);
        p
    }

    fn tcp_checksum_ok(p: &[u8], ip: usize, th: usize) -> bool {
        fold(sum(
            &p[th..],
            pseudo_header(&p[ip..], PROTO_TCP, p.len() - th),
        )) == 0xffff
    }

    fn ipv4_checksum_ok(ip: &[u8]) -> bool {
        fold(sum(&ip[..20], 0)) == 0xffff
    }

    fn framed(p: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; FRAME_HEADROOM];
        f.extend_from_slice(p);
        f
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn header_round_trip() {
        let h = VnetHeader {
            flags: 1,
            gso_type: 0x21,
            hdr_len: 118,
            gso_size: 1338,
            csum_start: 84,
            csum_offset: 16,
            outer_th_offset: 34,
            inner_nh_offset: 64,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.write(&mut b);
        assert_eq!(VnetHeader::parse(&b), h);
    }

    #[test]
    fn a_burst_of_joined_packets_splits_back_into_the_same_packets() {
        let body = data(3 * 1000 + 10);
        let packets: Vec<Vec<u8>> = body
            .chunks(1000)
            .enumerate()
            .map(|(i, c)| {
                let flags = if i == 3 { ACK | PSH } else { ACK };
                vxlan_tcp(5000 + (i * 1000) as u32, c, flags)
            })
            .collect();
        let mut frames = Vec::new();
        let mut c = Coalescer::new([0xaa; ETH_LEN], true);
        for p in &packets {
            c.push(&mut framed(p), &mut |f: &[u8]| frames.push(f.to_vec()));
        }
        c.flush(&mut |f: &[u8]| frames.push(f.to_vec()));
        assert_eq!(frames.len(), 1, "four packets, one burst");
        let frame = &frames[0];
        assert_eq!(frame[VNET_HDR_LEN..FRAME_HEADROOM], [0xaa; ETH_LEN]);
        let hdr = VnetHeader::parse(frame[..VNET_HDR_LEN].try_into().unwrap());
        assert_eq!(hdr.gso_type, GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4);
        assert_eq!(hdr.gso_size, 1000);
        assert_eq!(hdr.inner_nh_offset as usize, ETH_LEN + INNER_IP);
        let burst = &frame[FRAME_HEADROOM..];
        assert!(ipv4_checksum_ok(burst) && ipv4_checksum_ok(&burst[INNER_IP..]));
        assert_eq!(burst.len(), INNER_TCP + 32 + body.len());
        assert_eq!(burst[INNER_TCP + 13], ACK | PSH);

        // The way back: the kernel would hand this burst over as it is written.
        let mut burst = burst.to_vec();
        let mut out = Vec::new();
        let mut scratch = vec![0u8; 2048];
        split(&hdr, &mut burst, &mut scratch, |s| out.push(s.to_vec())).unwrap();
        assert_eq!(out.len(), 4);
        for (got, want) in out.iter().zip(&packets) {
            assert_eq!(&got[INNER_TCP..], &want[INNER_TCP..], "TCP segment");
            assert_eq!(u16_at(got, 2), u16_at(want, 2), "outer length");
            assert!(ipv4_checksum_ok(got) && ipv4_checksum_ok(&got[INNER_IP..]));
            assert!(tcp_checksum_ok(got, INNER_IP, INNER_TCP));
        }
        assert_eq!(u16_at(&out[1], INNER_IP + 4), 101, "IP ids count up");
    }

    #[test]
    fn only_packets_that_continue_the_stream_join() {
        let mut frames = Vec::new();
        let mut c = Coalescer::new([0; ETH_LEN], true);
        let mut w = |f: &[u8]| frames.push(f.to_vec());
        c.push(&mut framed(&vxlan_tcp(0, &data(100), ACK)), &mut w);
        // A gap in the sequence.
        c.push(&mut framed(&vxlan_tcp(300, &data(100), ACK)), &mut w);
        // Another stream (other VNI).
        let mut other = vxlan_tcp(400, &data(100), ACK);
        other[VXLAN + 6] = 43;
        c.push(&mut framed(&other), &mut w);
        // A SYN never joins.
        c.push(&mut framed(&vxlan_tcp(500, &data(100), ACK | SYN)), &mut w);
        c.flush(&mut w);
        assert_eq!(frames.len(), 4);
        for f in &frames {
            assert_eq!(f[1], GSO_NONE, "single packets go without GSO");
        }
        assert_eq!(
            &frames[2][FRAME_HEADROOM..],
            &other[..],
            "passed through unchanged"
        );
    }

    #[test]
    fn nothing_joins_when_the_kernel_takes_no_tunnel_bursts() {
        let mut n = 0;
        let mut c = Coalescer::new([0; ETH_LEN], false);
        for i in 0..3 {
            let p = vxlan_tcp(i * 100, &data(100), ACK);
            c.push(&mut framed(&p), &mut |_: &[u8]| n += 1);
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn a_plain_tcp_burst_is_cut_like_the_kernel_cuts_it() {
        // TCP to a mesh address directly (no VXLAN): the device offers TSO for it too.
        let burst = vxlan_tcp(1000, &data(2500), ACK | PSH | FIN)[INNER_IP..].to_vec();
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1000,
            csum_start: (ETH_LEN + 20) as u16,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut ip = burst.clone();
        split(&hdr, &mut ip, &mut [0u8; 2048], |s| out.push(s.to_vec())).unwrap();
        let sizes: Vec<usize> = out.iter().map(|s| s.len() - 20 - 32).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        for (i, seg) in out.iter().enumerate() {
            assert!(ipv4_checksum_ok(seg) && tcp_checksum_ok(seg, 0, 20));
            assert_eq!(usize::from(u16_at(seg, 2)), seg.len());
            assert_eq!(u32_at(seg, 24), 1000 + 1000 * i as u32);
            let last = i == 2;
            assert_eq!(
                seg[33] & (PSH | FIN) != 0,
                last,
                "PSH and FIN on the last only"
            );
            assert_eq!(seg[52..], burst[52 + 1000 * i..][..seg.len() - 52]);
        }
    }

    #[test]
    fn a_single_packet_gets_the_checksum_the_kernel_left_undone() {
        let mut p = vxlan_tcp(1, &data(33), ACK);
        let pseudo = fold(pseudo_header(
            &p[INNER_IP..],
            PROTO_TCP,
            p.len() - INNER_TCP,
        ));
        put_u16(&mut p, INNER_TCP + 16, pseudo);
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: (ETH_LEN + INNER_TCP) as u16,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = Vec::new();
        split(&hdr, &mut p, &mut [0u8; 2048], |s| out.push(s.to_vec())).unwrap();
        assert!(tcp_checksum_ok(&out[0], INNER_IP, INNER_TCP));
    }

    #[test]
    fn bursts_of_a_kind_not_offered_are_refused() {
        let mut p = vxlan_tcp(1, &data(3000), ACK);
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: 5, // UDP_L4
            gso_size: 1000,
            csum_start: 84,
            csum_offset: 6,
            ..Default::default()
        };
        let r = split(&hdr, &mut p, &mut [0u8; 2048], |_| {});
        assert_eq!(r, Err(Malformed("GSO type not offered")));
    }

    /// A plain TCP burst (no tunnel) and its header, as the device hands it over.
    fn plain_burst(payload: usize, mss: u16) -> (VnetHeader, Vec<u8>) {
        let burst = vxlan_tcp(1000, &data(payload), ACK)[INNER_IP..].to_vec();
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: (ETH_LEN + 20 + 32) as u16,
            gso_size: mss,
            csum_start: (ETH_LEN + 20) as u16,
            csum_offset: 16,
            ..Default::default()
        };
        (hdr, burst)
    }

    /// The same burst inside VXLAN.
    fn tunnel_burst(payload: usize, mss: u16) -> (VnetHeader, Vec<u8>) {
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
            hdr_len: (ETH_LEN + INNER_TCP + 32) as u16,
            gso_size: mss,
            csum_start: (ETH_LEN + INNER_TCP) as u16,
            csum_offset: 16,
            outer_th_offset: (ETH_LEN + OUTER_UDP) as u16,
            inner_nh_offset: (ETH_LEN + INNER_IP) as u16,
        };
        (hdr, vxlan_tcp(1000, &data(payload), ACK))
    }

    fn split_all(hdr: &VnetHeader, ip: &[u8]) -> Result<Vec<Vec<u8>>, Malformed> {
        let mut out = Vec::new();
        let mut ip = ip.to_vec();
        split(hdr, &mut ip, &mut [0u8; 2048], |s| out.push(s.to_vec()))?;
        Ok(out)
    }

    #[test]
    fn a_tcp_data_offset_of_4_is_refused() {
        // 17 bytes after a 16-byte "header" cut at 16: a last segment of one byte,
        // too short for the checksum field the old code wrote into it.
        for (hdr, mut p, th) in [
            (plain_burst(1, 16).0, plain_burst(1, 16).1, 20),
            (tunnel_burst(1, 16).0, tunnel_burst(1, 16).1, INNER_TCP),
        ] {
            p[th + 12] = 4 << 4;
            assert_eq!(
                split_all(&hdr, &p),
                Err(Malformed("TCP data offset below 5"))
            );
            p[th + 12] = 0;
            assert_eq!(
                split_all(&hdr, &p),
                Err(Malformed("TCP data offset below 5"))
            );
        }
    }

    #[test]
    fn an_inner_ipv4_header_length_past_the_segment_is_refused() {
        // IHL 15 says 60 header bytes; the segments are 57 bytes long.
        let (hdr, mut p) = plain_burst(5, 1000);
        p[0] = 0x4f;
        assert_eq!(split_all(&hdr, &p), Err(Malformed("IPv4 header length")));
        let (hdr, mut p) = tunnel_burst(5, 1000);
        p[INNER_IP] = 0x4f;
        assert_eq!(split_all(&hdr, &p), Err(Malformed("IPv4 header length")));
        // Nor may the outer header claim the UDP header as its own.
        let (hdr, mut p) = tunnel_burst(5, 1000);
        p[0] = 0x46;
        assert_eq!(split_all(&hdr, &p), Err(Malformed("IPv4 header length")));
        // An IHL below 5, or a version other than 4.
        let (hdr, mut p) = plain_burst(5, 1000);
        p[0] = 0x44;
        assert!(split_all(&hdr, &p).is_err());
        p[0] = 0x65;
        assert!(split_all(&hdr, &p).is_err());
    }

    #[test]
    fn a_hdr_len_past_the_segment_is_only_a_hint() {
        // The kernel's hdr_len is a hint; the headers are read from the packet.
        let (hdr, p) = tunnel_burst(2500, 1000);
        let want = split_all(&hdr, &p).unwrap();
        for hdr_len in [0, 1, 2000, u16::MAX] {
            let h = VnetHeader { hdr_len, ..hdr };
            assert_eq!(split_all(&h, &p).unwrap(), want);
        }
    }

    #[test]
    fn a_gso_size_of_0_is_refused() {
        let (hdr, p) = tunnel_burst(2500, 0);
        assert_eq!(split_all(&hdr, &p), Err(Malformed("segment size 0")));
    }

    #[test]
    fn a_segment_larger_than_the_scratch_or_an_ipv4_packet_is_refused() {
        let (hdr, p) = plain_burst(2500, 2000);
        assert_eq!(split_all(&hdr, &p), Err(Malformed("segment size")));
        let (hdr, mut p) = plain_burst(2500, u16::MAX);
        let mut scratch = vec![0u8; 2 * MAX_BURST];
        let r = split(&hdr, &mut p, &mut scratch, |_| {});
        assert_eq!(r, Err(Malformed("segment size")));
    }

    #[test]
    fn truncated_bursts_are_refused_or_cut_whole() {
        for (hdr, p, headers) in [
            (plain_burst(300, 100).0, plain_burst(300, 100).1, 52),
            (
                tunnel_burst(300, 100).0,
                tunnel_burst(300, 100).1,
                INNER_TCP + 32,
            ),
        ] {
            for len in 0..p.len() {
                let r = split_all(&hdr, &p[..len]);
                if len <= headers {
                    assert!(r.is_err(), "{len} bytes: no payload, no segment");
                } else {
                    let segs = r.unwrap();
                    let payload: usize = segs.iter().map(|s| s.len() - headers).sum();
                    assert_eq!(payload, len - headers);
                }
            }
        }
    }

    #[test]
    fn offsets_out_of_order_or_past_the_packet_are_refused() {
        let (hdr, p) = tunnel_burst(300, 100);
        for h in [
            VnetHeader {
                csum_start: 0,
                ..hdr
            },
            VnetHeader {
                csum_start: u16::MAX,
                ..hdr
            },
            VnetHeader {
                inner_nh_offset: 0,
                ..hdr
            },
            VnetHeader {
                inner_nh_offset: hdr.csum_start,
                ..hdr
            },
            VnetHeader {
                outer_th_offset: 0,
                ..hdr
            },
            VnetHeader {
                outer_th_offset: hdr.inner_nh_offset,
                ..hdr
            },
        ] {
            assert!(split_all(&h, &p).is_err(), "{h:?}");
        }
        let (_, mut p) = plain_burst(3, 100);
        let single = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 0,
            csum_offset: u16::MAX,
            ..Default::default()
        };
        let r = split(&single, &mut p, &mut [], |_| {});
        assert_eq!(r, Err(Malformed("offset")));
        let past = VnetHeader {
            csum_start: ETH_LEN as u16,
            ..single
        };
        let r = split(&past, &mut p, &mut [], |_| {});
        assert_eq!(r, Err(Malformed("checksum offset past the packet")));
    }

    #[test]
    fn a_frame_without_room_for_headers_is_dropped() {
        let mut c = Coalescer::new([0; ETH_LEN], true);
        let mut n = 0;
        for len in 0..FRAME_HEADROOM {
            c.push(&mut vec![0u8; len], &mut |_: &[u8]| n += 1);
        }
        assert_eq!(n, 0);
    }

    mod fuzz;
}
