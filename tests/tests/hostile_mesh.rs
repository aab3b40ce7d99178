//! The encrypted mesh against hostile hosts: a machine on the underlay that knows a
//! host's public key (it is no secret) and forges WireGuard handshake messages, and
//! a mesh peer that tries to send into an encrypted network it is no part of.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::vxlan::{address_on, forged_vxlan, listen_once, vxlan_mac};
use netagent_tests::{in_netns, root_test};

const MESH_PORT: u16 = 51820;
/// Where the attacker on the underlay sends from (etcd's machine).
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// `n` bytes from the kernel's random source.
fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b
}

/// Host `host`'s WireGuard public key, as `status` shows it.
fn public_key(c: &Cluster, host: usize) -> [u8; 32] {
    let out = c.cli_ok(host, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(v["public_key"].as_str().unwrap())
        .unwrap();
    key.try_into().unwrap()
}

/// WireGuard's mac1 of `msg` for the host whose public key is `public`: all an
/// attacker needs for a message that passes the first check.
fn mac1(public: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    let key = blake2::Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(public)
        .finalize();
    let mut mac = <blake2::Blake2sMac<U16> as KeyInit>::new_from_slice(&key).unwrap();
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// A handshake response (type 2, 92 bytes) to `receiver_index`, random inside,
/// with a valid mac1 for `public`.
fn forged_response(public: &[u8; 32], receiver_index: u32) -> Vec<u8> {
    let mut m = random(92);
    m[..4].copy_from_slice(&[2, 0, 0, 0]);
    m[8..12].copy_from_slice(&receiver_index.to_le_bytes());
    let mac = mac1(public, &m[..60]);
    m[60..76].copy_from_slice(&mac);
    m[76..].fill(0);
    m
}

/// A handshake initiation (type 1, 148 bytes), random inside; with a valid mac1
/// for `public` when given.
fn forged_initiation(public: Option<&[u8; 32]>) -> Vec<u8> {
    let mut m = random(148);
    m[..4].copy_from_slice(&[1, 0, 0, 0]);
    if let Some(public) = public {
        let mac = mac1(public, &m[..116]);
        m[116..132].copy_from_slice(&mac);
        m[132..].fill(0);
    }
    m
}

/// The endpoint host `host` has for its mesh peer `peer` (`netagent peers --json`).
fn peer_endpoint(c: &Cluster, host: usize, peer: &str) -> String {
    let out = c.cli_ok(host, &["peers", "--json"]);
    let peers: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == peer)
        .unwrap_or_else(|| panic!("{peer} among host{host}'s peers: {out}"));
    p["mesh"]["endpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("{peer} on the mesh: {p}"))
        .to_owned()
}

/// Sends every datagram in `packets` from `from` in namespace `netns` to `to`.
fn send_all(netns: &str, from: Ipv4Addr, to: SocketAddr, packets: Vec<Vec<u8>>) {
    in_netns(netns, move || {
        let s = UdpSocket::bind((from, 0)).unwrap();
        for p in &packets {
            let _ = s.send_to(p, to);
        }
    })
    .join()
    .unwrap();
}

#[test]
fn forged_handshake_responses_do_not_move_a_peer() {
    root_test!();
    let (c, s1, _s2, ip_s2) = Cluster::encrypted_pair(2);
    let victim = public_key(&c, 1);
    let before = peer_endpoint(&c, 1, "host2");
    assert_eq!(before, format!("{}:{MESH_PORT}", c.bed.hosts[1].underlay));
    // Responses for every small receiver index (as sequential numbering would give)
    // and session, far more than the handshake rate limit takes in a second: host 1
    // is under load and answers with cookies.
    let guesses: Vec<Vec<u8>> = (1u32..=16)
        .flat_map(|peer| (0u32..8).map(move |session| peer << 8 | session))
        .map(|index| forged_response(&victim, index))
        .collect();
    let to = SocketAddr::from((c.bed.hosts[0].underlay, MESH_PORT));
    let u = c.bed.underlay_ns.clone();
    for _ in 0..3 {
        let round: Vec<Vec<u8>> = (0..5).flat_map(|_| guesses.clone()).collect();
        send_all(&u, STRANGER, to, round);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            peer_endpoint(&c, 1, "host2"),
            before,
            "forged handshake responses moved host2's endpoint on host1"
        );
    }
    assert!(c.bed.ping(&s1, ip_s2), "traffic after forged responses");
    assert_eq!(peer_endpoint(&c, 1, "host2"), before);
}

#[test]
fn a_handshake_flood_does_not_stop_encrypted_traffic() {
    root_test!();
    let (c, s1, _s2, ip_s2) = Cluster::encrypted_pair(2);
    let victim = public_key(&c, 2);
    // Garbage initiations and initiations with a valid mac1 (anyone with the public
    // key can make them), alternating, at a steady 80,000 a second: each used to
    // cost the receiving thread an X25519 (~50 µs) before any check.
    let mut flood: Vec<Vec<u8>> = Vec::new();
    for _ in 0..128 {
        flood.push(forged_initiation(None));
        flood.push(forged_initiation(Some(&victim)));
    }
    let to = SocketAddr::from((c.bed.hosts[1].underlay, MESH_PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, sent) = (stop.clone(), sent.clone());
        in_netns(&c.bed.underlay_ns, move || {
            const RATE: f64 = 80_000.0;
            let s = UdpSocket::bind((STRANGER, 0)).unwrap();
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * RATE) as u64;
                while n < due {
                    let _ = s.send_to(&flood[n as usize % flood.len()], to);
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            sent.store(n, Ordering::Relaxed);
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let out = c
        .bed
        .exec(&s1, &format!("ping -n -q -c 50 -i 0.1 -W 1 {ip_s2}"));
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received: u32 = text
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" received")?.parse().ok())
        .unwrap_or_else(|| panic!("ping's summary: {text}"));
    let sent = sent.load(Ordering::Relaxed);
    eprintln!("handshake flood: {sent} datagrams; {received}/50 pings answered");
    assert!(sent > 100_000, "the flood sent only {sent} datagrams");
    assert!(
        received >= 40,
        "{received}/50 pings answered during a handshake flood"
    );
    assert!(c.bed.ping(&s1, ip_s2), "traffic after the flood");
}

#[test]
fn a_mesh_peer_cannot_send_into_a_network_it_is_no_part_of() {
    root_test!();
    // "secure" on hosts 1 and 2; "other" on hosts 2 and 3: host 3 is host 2's mesh
    // peer, with no block of "secure".
    let (mut c, s1, s2, ip_s2) = Cluster::encrypted_pair(3);
    c.create_encrypted_network("other", "100.68.0.0/16");
    let o2 = c.bed.container("o2");
    let o3 = c.bed.container("o3");
    let ip_o2 = c.attach(2, &o2, "other", &[]);
    let ip_o3 = c.attach(3, &o3, "other", &[]);
    wait_for(
        Duration::from_secs(10),
        "the mesh between hosts 2 and 3",
        || c.bed.ping(&o3, ip_o2),
    );
    let (secure_vni, other_vni) = (c.vni("secure"), c.vni("other"));
    let (h2, h3) = (c.bed.hosts[1].netns.clone(), c.bed.hosts[2].netns.clone());
    let (mesh2, mesh3) = (address_on(&h2, "nawg0"), address_on(&h3, "nawg0"));
    let to = SocketAddr::from((mesh2, 4790));
    // From host 3's mesh address, through its WireGuard session with host 2: VXLAN
    // frames as host 2's VXLAN devices would take them.
    let inject = |vni: u32, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]| {
        let frame = forged_vxlan(vni, vxlan_mac(&h2, vni), src, dst, payload);
        send_all(&h3, mesh3, to, vec![frame; 3]);
    };

    let got = listen_once(&s2, ip_s2, Duration::from_millis(1500));
    let ip_s1 = address_on(&s1, "eth0");
    inject(secure_vni, ip_s1, ip_s2, b"forged");
    assert_eq!(
        got.join().unwrap(),
        None,
        "host3 sent into network secure on host2 without a block of it"
    );
    // Into the network it is part of: delivered (VXLAN between peers of a network
    // is as trusted as the peers).
    let got = listen_once(&o2, ip_o2, Duration::from_secs(2));
    inject(other_vni, ip_o3, ip_o2, b"member");
    assert_eq!(got.join().unwrap().as_deref(), Some(&b"member"[..]));
    assert!(c.bed.ping(&s1, ip_s2), "secure between hosts 1 and 2");

    // Host 3 joins "secure": its scope on host 2 widens with the block.
    let s3 = c.bed.container("s3");
    c.attach(3, &s3, "secure", &[]);
    wait_for(Duration::from_secs(10), "secure from host 3", || {
        c.bed.ping(&s3, ip_s2)
    });
    assert!(c.bed.ping(&o3, ip_o2), "other between hosts 2 and 3");
}
