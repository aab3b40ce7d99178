//! `wg show` on the encrypted mesh: the agent serves WireGuard's UAPI read-only,
//! checked with the real `wg` tool on a two-host encrypted cluster.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::{root_test, sh};

/// Removes the socket file even when the test fails (the agent removes it on stop).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn wg(args: &str) -> (bool, String) {
    let out = sh(&format!("wg {args}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// One raw UAPI exchange.
fn uapi(path: &PathBuf, request: &str) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut buf = [0; 4096];
    while !reply.ends_with(b"\n\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(reply).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64_decode(text: &str) -> Vec<u8> {
    let out = sh(&format!("printf %s '{text}' | base64 -d"));
    assert!(out.status.success());
    out.stdout
}

#[test]
fn wg_show_lists_mesh_peers_read_only() {
    root_test!();
    let name = format!("nat{}", std::process::id() % 1_000_000);
    let path = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
    let _cleanup = SocketFile(path.clone());
    let mut c = Cluster::new(2, 3);
    c.mesh_config[0] = format!("uapi_socket = \"{}\"", path.display());
    let (mut c, s1, _s2, ip_s2) = Cluster::encrypted_pair_of(c);

    // Root's alone, in a directory others may enter.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);

    let status: serde_json::Value =
        serde_json::from_str(&c.cli_ok(2, &["status", "--json"])).unwrap();
    let host2_key = status["public_key"].as_str().unwrap().to_owned();
    let host2_mesh = status["mesh_address"].as_str().unwrap().to_owned();

    let (ok, dump) = wg(&format!("show {name} dump"));
    assert!(ok, "{dump}");
    let peer: Vec<&str> = dump
        .lines()
        .find(|l| l.starts_with(&host2_key))
        .unwrap_or_else(|| panic!("host2's key {host2_key} not in:\n{dump}"))
        .split('\t')
        .collect();
    // public key, preshared key, endpoint, allowed ips, handshake, rx, tx, keepalive
    assert_eq!(
        peer[2],
        format!("{}:51820", c.bed.hosts[1].underlay),
        "{dump}"
    );
    assert_eq!(peer[3], format!("{host2_mesh}/32"), "{dump}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let handshake: u64 = peer[4].parse().unwrap();
    assert!(now - handshake < 60, "handshake {handshake}, now {now}");
    let (rx, tx): (u64, u64) = (peer[5].parse().unwrap(), peer[6].parse().unwrap());
    assert!(rx > 0 && tx > 0, "{dump}");
    assert_eq!(peer[7], "10");
    let device: Vec<&str> = dump.lines().next().unwrap().split('\t').collect();
    assert_eq!(device[..3], ["(none)", "(none)", "51820"], "{dump}");

    let (ok, shown) = wg(&format!("show {name}"));
    assert!(ok, "{shown}");
    assert!(shown.contains(&format!("peer: {host2_key}")), "{shown}");
    assert!(shown.contains("latest handshake:"), "{shown}");

    // The private key appears nowhere, in either encoding.
    let key_file = c.dir.join("h1-state/wireguard.key");
    let private_b64 = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    let private_hex = hex(&base64_decode(&private_b64));
    assert_eq!(private_hex.len(), 64);
    let raw = uapi(&path, "get=1\n\n");
    assert!(raw.ends_with("errno=0\n\n"), "{raw}");
    for text in [&dump, &shown, &raw] {
        assert!(!text.contains(&private_b64), "private key (base64) shown");
        assert!(!text.contains(&private_hex), "private key (hex) shown");
    }

    // Writes are refused and change nothing.
    let (ok, said) = wg(&format!("set {name} listen-port 12345"));
    assert!(!ok, "wg set succeeded: {said}");
    assert!(said.contains("Operation not permitted"), "{said}");
    let raw_set = uapi(&path, "set=1\nlisten_port=12345\nreplace_peers=true\n\n");
    assert_eq!(raw_set, "errno=-1\n\n");
    let (ok, after) = wg(&format!("show {name} dump"));
    assert!(
        ok && after.starts_with("(none)\t(none)\t51820\t"),
        "{after}"
    );
    assert!(after.contains(&host2_key), "{after}");
    assert!(c.bed.ping(&s1, ip_s2));

    // A second agent given the same path leaves the first one's socket alone.
    c.stop_agent(2);
    c.mesh_config[1] = format!("uapi_socket = \"{}\"", path.display());
    c.start_agent(2);
    wait_for(Duration::from_secs(10), "host 2's warning", || {
        c.log(2).contains("another process answers on this socket")
    });
    let status: serde_json::Value =
        serde_json::from_str(&c.cli_ok(2, &["status", "--json"])).unwrap();
    assert!(status["mesh_address"].is_string(), "{status}");
    let (ok, dump) = wg(&format!("show {name} dump"));
    assert!(ok && dump.contains(&host2_key), "{dump}");
    // Host 2 stopping does not take host 1's socket with it.
    c.stop_agent(2);
    assert!(path.exists());
    assert!(wg(&format!("show {name} dump")).0);

    // The socket goes with the agent.
    c.stop_agent(1);
    assert!(!path.exists(), "socket left behind after a clean stop");
}
