//! Property tests of the offload byte work against hostile frames: whatever a
//! container (through the device) or a peer (through WireGuard) hands over, `split`
//! and the `Coalescer` return or pass it on, never panic; what they emit is
//! well-formed; and valid bursts survive split → coalesce → split unchanged.

use proptest::prelude::*;
use proptest::test_runner::Config;

use super::super::*;
use super::{data, framed};

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Failures print the minimal input; no files written into the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// A TCP packet with `opts` bytes of options (a multiple of 4), inside VXLAN when
/// `tunnel`, every length and checksum valid.
fn tcp_packet(
    tunnel: bool,
    opts: usize,
    seq: u32,
    flags: u8,
    ids: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let nh = if tunnel { INNER_IP } else { 0 };
    let th = nh + 20;
    let len = th + 20 + opts + payload.len();
    let mut p = vec![0u8; len];
    if tunnel {
        p[0] = 0x45;
        put_u16(&mut p, 2, len as u16);
        put_u16(&mut p, 4, ids.0);
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
    }
    let ip = &mut p[nh..];
    ip[0] = 0x45;
    put_u16(ip, 2, (len - nh) as u16);
    put_u16(ip, 4, ids.1);
    put_u16(ip, 6, 0x4000);
    ip[8] = 64;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&[198, 51, 100, 2]);
    ip[16..20].copy_from_slice(&[198, 51, 100, 3]);
    set_ipv4_checksum(ip);
    let t = &mut p[th..];
    put_u16(t, 0, 5201);
    put_u16(t, 2, 40001);
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&9u32.to_be_bytes());
    t[12] = (((20 + opts) / 4) as u8) << 4;
    t[13] = flags;
    put_u16(t, 14, 500);
    // NOPs, then a timestamp when there is room (as Linux sends).
    t[20..20 + opts].fill(1);
    if opts >= 12 {
        t[22..24].copy_from_slice(&[8, 10]);
        t[24..28].copy_from_slice(&seq.rotate_left(7).to_be_bytes());
    }
    t[20 + opts..].copy_from_slice(payload);
    let c = !fold(sum(&p[th..], pseudo_header(&p[nh..], PROTO_TCP, len - th)));
    put_u16(&mut p, th + 16, c);
    p
}

/// The virtio-net header the kernel writes for a burst built by [`tcp_packet`].
fn burst_header(tunnel: bool, opts: usize, mss: u16) -> VnetHeader {
    let nh = if tunnel { INNER_IP } else { 0 };
    VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: if tunnel {
            GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4
        } else {
            GSO_TCPV4
        },
        hdr_len: (ETH_LEN + nh + 40 + opts) as u16,
        gso_size: mss,
        csum_start: (ETH_LEN + nh + 20) as u16,
        csum_offset: 16,
        outer_th_offset: if tunnel {
            (ETH_LEN + OUTER_UDP) as u16
        } else {
            0
        },
        inner_nh_offset: if tunnel {
            (ETH_LEN + INNER_IP) as u16
        } else {
            0
        },
    }
}

fn ipv4_ok(ip: &[u8]) -> bool {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[0] >> 4 == 4 && ihl >= 20 && fold(sum(&ip[..ihl], 0)) == 0xffff
}

/// A segment `split` emitted for a GSO burst with header `hdr` is a packet a peer
/// can take: every length matches, every checksum holds, no larger than `room`.
fn assert_segment_ok(hdr: &VnetHeader, seg: &[u8], room: usize) -> Result<(), TestCaseError> {
    let tunnel = hdr.gso_type & GSO_UDP_TUNNEL_IPV4 != 0;
    let th = usize::from(hdr.csum_start) - ETH_LEN;
    let nh = if tunnel {
        usize::from(hdr.inner_nh_offset) - ETH_LEN
    } else {
        0
    };
    prop_assert!(seg.len() <= room && seg.len() <= MAX_BURST);
    prop_assert!(th + 20 <= seg.len());
    prop_assert!(ipv4_ok(&seg[nh..]), "inner IPv4 checksum");
    prop_assert_eq!(usize::from(u16_at(seg, nh + 2)), seg.len() - nh);
    prop_assert_eq!(
        fold(sum(
            &seg[th..],
            pseudo_header(&seg[nh..], PROTO_TCP, seg.len() - th)
        )),
        0xffff,
        "TCP checksum"
    );
    if tunnel {
        let outer_th = usize::from(hdr.outer_th_offset) - ETH_LEN;
        prop_assert!(ipv4_ok(seg), "outer IPv4 checksum");
        prop_assert_eq!(usize::from(u16_at(seg, 2)), seg.len());
        prop_assert_eq!(usize::from(u16_at(seg, outer_th + 4)), seg.len() - outer_th);
    }
    Ok(())
}

/// Splits and checks what came out: `Ok` segments are well-formed, a single packet
/// goes out as it came (bar the checksum the kernel left to us).
fn split_checked(
    hdr: &VnetHeader,
    ip: &[u8],
    room: usize,
) -> Result<Result<Vec<Vec<u8>>, Malformed>, TestCaseError> {
    let mut copy = ip.to_vec();
    let mut scratch = vec![0u8; room];
    let mut out = Vec::new();
    if let Err(e) = split(hdr, &mut copy, &mut scratch, |s| out.push(s.to_vec())) {
        return Ok(Err(e));
    }
    if hdr.gso_type == GSO_NONE {
        prop_assert_eq!(out.len(), 1);
        prop_assert_eq!(out[0].len(), ip.len());
    } else {
        prop_assert!(!out.is_empty());
        for seg in &out {
            assert_segment_ok(hdr, seg, room)?;
        }
    }
    Ok(Ok(out))
}

/// Offsets near the ones the kernel writes, or anything.
fn offset() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => Just((ETH_LEN + OUTER_UDP) as u16),
        3 => Just((ETH_LEN + INNER_IP) as u16),
        3 => Just((ETH_LEN + INNER_TCP) as u16),
        3 => Just((ETH_LEN + 20) as u16),
        4 => 0u16..160,
        1 => any::<u16>(),
    ]
}

fn any_header() -> impl Strategy<Value = VnetHeader> {
    let gso_type = prop_oneof![
        Just(GSO_NONE),
        Just(GSO_TCPV4),
        Just(GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4),
        Just(GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4 | GSO_ECN),
        any::<u8>(),
    ];
    let size = prop_oneof![0u16..64, 500u16..1500, any::<u16>()];
    (
        any::<u8>(),
        gso_type,
        any::<u16>(),
        size,
        offset(),
        prop_oneof![Just(16u16), any::<u16>()],
        offset(),
        offset(),
    )
        .prop_map(
            |(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, outer, inner)| {
                VnetHeader {
                    flags,
                    gso_type,
                    hdr_len,
                    gso_size,
                    csum_start,
                    csum_offset,
                    outer_th_offset: outer,
                    inner_nh_offset: inner,
                }
            },
        )
}

/// One change to a valid burst or its header.
#[derive(Clone, Debug)]
enum Mutation {
    None,
    Field(usize, u16),
    Byte(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => Just(Mutation::None),
        3 => (0usize..8, prop_oneof![0u16..200, any::<u16>()])
            .prop_map(|(f, v)| Mutation::Field(f, v)),
        // Mostly header bytes: that is where the fields are.
        4 => (0usize..120, any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        2 => (0usize..200).prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
    ]
}

fn mutate(m: &Mutation, hdr: &mut VnetHeader, p: &mut Vec<u8>) {
    match m {
        Mutation::None => {}
        Mutation::Field(f, v) => match f {
            0 => hdr.flags = *v as u8,
            1 => hdr.gso_type = *v as u8,
            2 => hdr.hdr_len = *v,
            3 => hdr.gso_size = *v,
            4 => hdr.csum_start = *v,
            5 => hdr.csum_offset = *v,
            6 => hdr.outer_th_offset = *v,
            _ => hdr.inner_nh_offset = *v,
        },
        Mutation::Byte(i, b) => {
            let i = i % p.len();
            p[i] = *b;
        }
        Mutation::Truncate(n) => p.truncate(*n),
        Mutation::Extend(more) => p.extend_from_slice(more),
    }
}

/// Bursts as the device hands them over: either kind, options or none, any size
/// of segment, ACK with PSH or FIN at times.
fn valid_burst() -> impl Strategy<Value = (bool, usize, u16, u8, u32, (u16, u16), usize)> {
    (
        any::<bool>(),
        (0usize..=10).prop_map(|w| w * 4),
        prop_oneof![1u16..64, 500u16..1449],
        prop_oneof![
            Just(ACK),
            Just(ACK | PSH),
            Just(ACK | PSH | FIN),
            Just(ACK | CWR)
        ],
        any::<u32>(),
        any::<(u16, u16)>(),
        1usize..8000,
    )
}

/// What the Coalescer wrote, back as the packets the kernel would see: bursts cut
/// by `split` (checked well-formed), single packets as they are.
fn expand(frames: &[Vec<u8>], eth: [u8; ETH_LEN]) -> Result<Vec<Vec<u8>>, TestCaseError> {
    let mut packets = Vec::new();
    for f in frames {
        prop_assert!(f.len() >= FRAME_HEADROOM);
        prop_assert_eq!(&f[VNET_HDR_LEN..FRAME_HEADROOM], &eth[..]);
        let hdr = VnetHeader::parse(f[..VNET_HDR_LEN].try_into().unwrap());
        let ip = &f[FRAME_HEADROOM..];
        if hdr.gso_type == GSO_NONE {
            prop_assert_eq!(hdr, VnetHeader::default());
            packets.push(ip.to_vec());
            continue;
        }
        prop_assert_eq!(usize::from(u16_at(ip, 2)), ip.len(), "burst length");
        match split_checked(&hdr, ip, MAX_BURST)? {
            Ok(segs) => {
                prop_assert!(segs.len() >= 2, "a burst joins two packets or more");
                packets.extend(segs);
            }
            Err(e) => prop_assert!(false, "our own burst does not split: {}", e),
        }
    }
    Ok(packets)
}

/// Bytes a burst may not carry through as they were: IP ids (counted from the
/// first) and checksums (computed afresh).
const MASKED: [(usize, usize); 5] = [
    (4, 6),
    (10, 12),
    (INNER_IP + 4, INNER_IP + 6),
    (INNER_IP + 10, INNER_IP + 12),
    (INNER_TCP + 16, INNER_TCP + 18),
];

fn masked(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    if burstable(&p).is_some() {
        for (a, b) in MASKED {
            p[a..b].fill(0);
        }
    }
    p
}

/// One packet pushed into the Coalescer in the stream fuzz.
#[derive(Clone, Debug)]
enum Input {
    Junk(Vec<u8>),
    /// A packet of the stream: its payload length (a full segment when None), a
    /// gap in the sequence, its flags, another VNI, and one byte changed.
    Stream {
        short: Option<usize>,
        gap: u32,
        flags: u8,
        other_vni: bool,
        byte: Option<(usize, u8)>,
    },
}

fn input() -> impl Strategy<Value = Input> {
    let stream = (
        prop_oneof![4 => Just(None), 1 => (1usize..1400).prop_map(Some)],
        prop_oneof![8 => Just(0u32), 1 => any::<u32>()],
        prop_oneof![8 => Just(ACK), 2 => Just(ACK | PSH), 1 => any::<u8>()],
        prop::bool::weighted(0.1),
        prop::option::weighted(0.15, (0usize..150, any::<u8>())),
    )
        .prop_map(|(short, gap, flags, other_vni, byte)| Input::Stream {
            short,
            gap,
            flags,
            other_vni,
            byte,
        });
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Input::Junk),
        8 => stream,
    ]
}

proptest! {
    #![proptest_config(config(30_000))]

    /// Random bytes under random headers: refused or well-formed, never a panic.
    #[test]
    fn fuzz_split_arbitrary(
        hdr in any_header(),
        ip in proptest::collection::vec(any::<u8>(), 0..1600),
        room in prop_oneof![0usize..200, 1000usize..9216],
    ) {
        let _ = split_checked(&hdr, &ip, room)?;
    }
}

proptest! {
    #![proptest_config(config(20_000))]

    /// Valid bursts with one field or byte changed. Unchanged ones cut into their
    /// payload, in order, and join back into the same burst.
    #[test]
    fn fuzz_split_near_valid(
        (tunnel, opts, mss, flags, seq, ids, len) in valid_burst(),
        m in mutation(),
    ) {
        let payload = data(len);
        let mut p = tcp_packet(tunnel, opts, seq, flags, ids, &payload);
        let mut hdr = burst_header(tunnel, opts, mss);
        mutate(&m, &mut hdr, &mut p);
        let r = split_checked(&hdr, &p, 9216)?;
        if !matches!(m, Mutation::None) {
            return Ok(());
        }
        let segs = r.map_err(|e| TestCaseError::fail(format!("valid burst refused: {e}")))?;
        let headers = if tunnel { INNER_TCP } else { 20 } + 20 + opts;
        prop_assert_eq!(segs.len(), len.div_ceil(usize::from(mss)));
        let joined: Vec<u8> = segs.iter().flat_map(|s| s[headers..].to_vec()).collect();
        prop_assert_eq!(&joined, &payload);
        // Back through the Coalescer: one burst again (VXLAN with ACK, PSH at most).
        if !tunnel || flags & !(ACK | PSH) != 0 {
            return Ok(());
        }
        let eth = [0xaa; ETH_LEN];
        let mut frames = Vec::new();
        let mut c = Coalescer::new(eth, true);
        for s in &segs {
            c.push(&mut framed(s), &mut |f: &[u8]| frames.push(f.to_vec()));
        }
        c.flush(&mut |f: &[u8]| frames.push(f.to_vec()));
        prop_assert_eq!(frames.len(), 1);
        let burst = &frames[0][FRAME_HEADROOM..];
        // All but the TCP checksum (a partial one, for the kernel to finish).
        prop_assert_eq!(&burst[..INNER_TCP + 16], &p[..INNER_TCP + 16]);
        prop_assert_eq!(&burst[INNER_TCP + 18..], &p[INNER_TCP + 18..]);
        let again = expand(&frames, eth)?;
        prop_assert_eq!(again, segs);
    }
}

proptest! {
    #![proptest_config(config(8_000))]

    /// Streams of packets, some junk, some changed, pushed into a Coalescer: what it
    /// writes, cut again, is what went in (bar IP ids and checksums), in order.
    #[test]
    fn fuzz_coalescer_push_flush(
        inputs in proptest::collection::vec(input(), 1..24),
        segment in prop_oneof![1usize..64, 500usize..1449],
        opts in (0usize..=10).prop_map(|w| w * 4),
        enabled in prop::bool::weighted(0.9),
        flush_between in prop::bool::weighted(0.1),
    ) {
        let eth = [0x5a; ETH_LEN];
        let mut c = Coalescer::new(eth, enabled);
        let mut frames = Vec::new();
        let mut pushed = Vec::new();
        let mut seq = 7u32;
        for (i, input) in inputs.iter().enumerate() {
            let p = match input {
                Input::Junk(bytes) => bytes.clone(),
                Input::Stream { short, gap, flags, other_vni, byte } => {
                    seq = seq.wrapping_add(*gap);
                    let len = short.map_or(segment, |s| s.min(segment));
                    let mut p = tcp_packet(true, opts, seq, *flags, (i as u16, 3 * i as u16), &data(len));
                    seq = seq.wrapping_add(len as u32);
                    if *other_vni {
                        p[VXLAN + 6] ^= 1;
                    }
                    if let Some((at, b)) = byte {
                        let at = at % p.len();
                        p[at] = *b;
                    }
                    p
                }
            };
            let mut frame = framed(&p);
            c.push(&mut frame, &mut |f: &[u8]| frames.push(f.to_vec()));
            pushed.push(p);
            if flush_between {
                c.flush(&mut |f: &[u8]| frames.push(f.to_vec()));
            }
        }
        c.flush(&mut |f: &[u8]| frames.push(f.to_vec()));
        if !enabled {
            prop_assert!(frames.iter().all(|f| f[1] == GSO_NONE));
        }
        let out = expand(&frames, eth)?;
        prop_assert_eq!(out.len(), pushed.len());
        for (got, want) in out.iter().zip(&pushed) {
            prop_assert_eq!(masked(got), masked(want));
        }
    }

    /// Raw frames of any length, including none at all.
    #[test]
    fn fuzz_coalescer_arbitrary_frames(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..12),
    ) {
        let mut c = Coalescer::new([0; ETH_LEN], true);
        let mut n = 0;
        for f in &frames {
            c.push(&mut f.clone(), &mut |_: &[u8]| n += 1);
        }
        c.flush(&mut |_: &[u8]| n += 1);
        prop_assert_eq!(n, frames.iter().filter(|f| f.len() >= FRAME_HEADROOM).count());
    }
}
