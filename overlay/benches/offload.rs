//! The mesh datapath's byte work per TCP burst, without syscalls or crypto: the
//! splitter cutting a 64 KiB burst from the device into the packets WireGuard
//! encrypts, and the coalescer joining decrypted packets back into one burst.
//!
//! The burst is what a 1500-byte underlay gives: VXLAN-carried TCP with timestamps,
//! 1338-byte segments (mesh MTU 1440), 48 of them.
//!
//! `cargo bench -p netagent-overlay --bench offload`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use netagent_overlay::bench_support::{
    split, Coalescer, VnetHeader, ETH_LEN, FRAME_HEADROOM, VNET_HDR_LEN,
};

const SEGMENT: usize = 1338;
const SEGMENTS: usize = 48;
/// Outer IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14, IPv4 20, TCP 32 (timestamps).
const HEADERS: usize = 102;
const OUTER_UDP: usize = 20;
const INNER_IP: usize = 50;
const INNER_TCP: usize = 70;

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// One VXLAN-carried TCP segment (ACK, data at `seq`) behind FRAME_HEADROOM bytes of
/// room, as the inbound thread hands it to the coalescer. Checksums are left zero:
/// neither side checks them.
fn framed_segment(seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = HEADERS + payload.len();
    let mut f = vec![0u8; FRAME_HEADROOM + len];
    let p = &mut f[FRAME_HEADROOM..];
    p[0] = 0x45;
    put_u16(p, 2, len as u16);
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 127, 192, 1]);
    p[16..20].copy_from_slice(&[100, 127, 192, 2]);
    put_u16(p, OUTER_UDP, 40000);
    put_u16(p, OUTER_UDP + 2, 4790);
    put_u16(p, OUTER_UDP + 4, (len - OUTER_UDP) as u16);
    p[OUTER_UDP + 8] = 0x08;
    p[OUTER_UDP + 14] = 42;
    let eth = OUTER_UDP + 16;
    p[eth..eth + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
    p[eth + 12..eth + 14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut p[INNER_IP..];
    ip[0] = 0x45;
    put_u16(ip, 2, (len - INNER_IP) as u16);
    put_u16(ip, 6, 0x4000);
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[198, 51, 100, 2]);
    ip[16..20].copy_from_slice(&[198, 51, 100, 3]);
    let t = &mut p[INNER_TCP..];
    put_u16(t, 0, 5201);
    put_u16(t, 2, 40001);
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&9u32.to_be_bytes());
    t[12] = 8 << 4;
    t[13] = 0x10;
    put_u16(t, 14, 500);
    t[20..24].copy_from_slice(&[1, 1, 8, 10]);
    t[24..28].copy_from_slice(&77u32.to_be_bytes());
    t[32..].copy_from_slice(payload);
    f
}

fn segments() -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..SEGMENT).map(|i| (i * 7 + 3) as u8).collect();
    (0..SEGMENTS)
        .map(|i| framed_segment(1000 + (i * SEGMENT) as u32, &payload))
        .collect()
}

/// The one frame the coalescer writes for all segments: the burst the splitter gets.
fn burst(segments: &mut [Vec<u8>]) -> Vec<u8> {
    let mut frames = Vec::new();
    let mut c = Coalescer::new([0xaa; ETH_LEN], true);
    let mut write = |f: &[u8]| frames.push(f.to_vec());
    for s in segments.iter_mut() {
        c.push(s, &mut write);
    }
    c.flush(&mut write);
    assert_eq!(frames.len(), 1, "the segments must join into one burst");
    frames.pop().unwrap()
}

fn offload(c: &mut Criterion) {
    let mut segments = segments();
    let frame = burst(&mut segments);
    let mut group = c.benchmark_group("offload");
    group.throughput(Throughput::Bytes((SEGMENT * SEGMENTS) as u64));

    let hdr = VnetHeader::parse(frame[..VNET_HDR_LEN].try_into().unwrap());
    let mut ip = frame[FRAME_HEADROOM..].to_vec();
    let mut scratch = vec![0u8; 9216];
    let mut packets = 0;
    split(&hdr, &mut ip, &mut scratch, |_| packets += 1).unwrap();
    assert_eq!(packets, SEGMENTS, "the burst must split into its segments");
    group.bench_function("split_64k_burst", |b| {
        b.iter(|| {
            let mut n = 0;
            split(black_box(&hdr), &mut ip, &mut scratch, |p| n += p.len()).unwrap();
            black_box(n)
        })
    });

    let mut coalescer = Coalescer::new([0xaa; ETH_LEN], true);
    group.bench_function("coalesce_48_segments", |b| {
        b.iter(|| {
            let mut n = 0;
            let mut write = |f: &[u8]| n += f.len();
            for s in segments.iter_mut() {
                coalescer.push(black_box(s), &mut write);
            }
            coalescer.flush(&mut write);
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, offload);
criterion_main!(benches);
