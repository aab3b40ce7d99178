//! `bench-wireguard`: encrypted networks against userspace WireGuard tunnels
//! (scripts/bench/wireguard.sh).

use std::time::{Duration, Instant};

use netagent_tests::cluster::Cluster;
use netagent_tests::Testbed;

use crate::common::median;

/// iperf3 -P1 from `client_ns` to `target` (a server in `server_ns`), in Gbit/s.
fn iperf_gbps(
    bed: &mut Testbed,
    server_ns: &str,
    client_ns: &str,
    target: &str,
    seconds: u32,
) -> f64 {
    let pid = bed.spawn(server_ns, "iperf3", &["-s", "-1", "-B", target]);
    std::thread::sleep(Duration::from_millis(400));
    let out = bed.exec(client_ns, &format!("iperf3 -c {target} -t {seconds} -J"));
    let _ = bed.kill(pid);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if std::env::var("BENCH_VERBOSE").is_ok() {
        eprintln!(
            "  {target}: retransmits {}",
            json["end"]["sum_sent"]["retransmits"]
        );
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// A userspace WireGuard tunnel between hosts 1 and 2 made by `program` (wireguard-go
/// or boringtun-cli), configured with `wg` over its UAPI socket; returns the address
/// of host 2's end and the daemons' pids.
fn userspace_tunnel(
    bed: &mut Testbed,
    program: &str,
    extra: &[&str],
    prefix: &str,
    net: u8,
) -> (String, Vec<u32>) {
    let (h1, h2) = (bed.hosts[0].clone(), bed.hosts[1].clone());
    let key = |_: ()| netagent_tests::sh_ok("wg genkey").trim().to_owned();
    let keys = [key(()), key(())];
    let public: Vec<String> = keys
        .iter()
        .map(|k| {
            netagent_tests::sh_ok(&format!("echo {k} | wg pubkey"))
                .trim()
                .to_owned()
        })
        .collect();
    let mut pids = Vec::new();
    for (i, (me, peer)) in [(&h1, &h2), (&h2, &h1)].into_iter().enumerate() {
        let dev = format!("{prefix}{}", i + 1);
        let mut args: Vec<&str> = extra.to_vec();
        args.push(&dev);
        // A killed daemon leaves its UAPI socket behind; wg would talk to that.
        let sock = format!("/var/run/wireguard/{dev}.sock");
        let _ = std::fs::remove_file(&sock);
        pids.push(bed.spawn(&me.netns, program, &args));
        let start = Instant::now();
        while !std::path::Path::new(&sock).exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{program} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let keyfile = std::env::temp_dir().join(format!("{}-{dev}.key", bed.id));
        std::fs::write(&keyfile, &keys[i]).unwrap();
        let port = 52000 + u32::from(net) * 10 + i as u32;
        let peer_port = 52000 + u32::from(net) * 10 + (1 - i) as u32;
        bed.exec_ok(
            &me.netns,
            &format!(
                "wg set {dev} private-key {} listen-port {port} peer {} endpoint {}:{peer_port} allowed-ips 100.{net}.0.{}/32 && \
                 ip addr add 100.{net}.0.{}/24 dev {dev} && ip link set {dev} mtu 1420 up",
                keyfile.display(),
                public[1 - i],
                peer.underlay,
                2 - i,
                i + 1
            ),
        );
        let _ = std::fs::remove_file(keyfile);
    }
    (format!("100.{net}.0.2"), pids)
}

/// Encrypted netagent network against wireguard-go (Debian's, and a modern build with
/// its TUN and UDP offloads when `modern_wireguard_go` names one) and boringtun-cli
/// tunnels between the same two hosts, plain VXLAN (our plain network) and the raw
/// underlay; iperf3 -P1, paths interleaved, three rounds, medians.
pub fn run(seconds: u32, boringtun: String, modern_wireguard_go: Option<String>) {
    let mut c = Cluster::running(2, 5);
    c.create_network("plain", "100.64.0.0/16");
    c.create_encrypted_network("secure", "100.66.0.0/16");
    let (p1, p2, s1, s2) = (
        c.bed.container("p1"),
        c.bed.container("p2"),
        c.bed.container("s1"),
        c.bed.container("s2"),
    );
    c.attach(1, &p1, "plain", &[]);
    let ip_p2 = c.attach(2, &p2, "plain", &[]).to_string();
    c.attach(1, &s1, "secure", &[]);
    let ip_s2 = c.attach(2, &s2, "secure", &[]).to_string();
    netagent_tests::cluster::wait_for(Duration::from_secs(10), "the mesh", || {
        c.bed.ping(&s1, ip_s2.parse().unwrap())
    });
    if std::env::var_os("BENCH_QUICK").is_some() {
        // While working on the datapath: ours only, against plain VXLAN.
        for round in 1..=3 {
            let e = iperf_gbps(&mut c.bed, &s2, &s1, &ip_s2, seconds);
            let v = iperf_gbps(&mut c.bed, &p2, &p1, &ip_p2, seconds);
            println!("round {round}: netagent encrypted {e:.2} Gbit/s, plain vxlan {v:.2}");
        }
        return;
    }
    let (h1, h2) = (c.bed.hosts[0].netns.clone(), c.bed.hosts[1].netns.clone());
    let underlay = c.bed.hosts[1].underlay.to_string();
    let (wgo, _) = userspace_tunnel(&mut c.bed, "wireguard-go", &["-f"], "wgo", 100);
    const ROUNDS: usize = 3;
    let modern = modern_wireguard_go
        .map(|program| userspace_tunnel(&mut c.bed, &program, &["-f"], "wgm", 99).0);
    let (mut enc, mut go, mut vx, mut raw, mut gom) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 1..=ROUNDS {
        enc.push(iperf_gbps(&mut c.bed, &s2, &s1, &ip_s2, seconds));
        go.push(iperf_gbps(&mut c.bed, &h2, &h1, &wgo, seconds));
        if let Some(addr) = &modern {
            gom.push(iperf_gbps(&mut c.bed, &h2, &h1, addr, seconds));
        }
        vx.push(iperf_gbps(&mut c.bed, &p2, &p1, &ip_p2, seconds));
        raw.push(iperf_gbps(&mut c.bed, &h2, &h1, &underlay, seconds));
        println!(
            "round {round}: netagent encrypted {:.2} Gbit/s, wireguard-go {:.2}, modern wireguard-go {}, plain vxlan {:.2}, raw underlay {:.2}",
            enc[round - 1],
            go[round - 1],
            gom.last().map_or("-".into(), |g| format!("{g:.2}")),
            vx[round - 1],
            raw[round - 1]
        );
    }
    // boringtun-cli at each thread count, rounds interleaved with ours again.
    let mut bt_best = 0.0f64;
    let mut bt_line = String::new();
    for threads in ["1", "2", "4"] {
        let (addr, pids) = userspace_tunnel(
            &mut c.bed,
            &boringtun,
            &["-f", "--disable-drop-privileges", "--threads", threads],
            &format!("bt{threads}x"),
            100 + threads.parse::<u8>().unwrap(),
        );
        let mut bt = vec![];
        for round in 1..=ROUNDS {
            bt.push(iperf_gbps(&mut c.bed, &h2, &h1, &addr, seconds));
            enc.push(iperf_gbps(&mut c.bed, &s2, &s1, &ip_s2, seconds));
            println!(
                "boringtun-cli --threads {threads} round {round}: {:.2} Gbit/s (netagent encrypted {:.2})",
                bt[round - 1],
                enc[enc.len() - 1]
            );
        }
        let m = median(bt);
        bt_line.push_str(&format!("boringtun_t{threads}_gbps={m:.2} "));
        bt_best = bt_best.max(m);
        for pid in pids {
            c.bed.kill(pid);
        }
    }
    let (e, g, v, r) = (median(enc), median(go), median(vx), median(raw));
    let modern_line = if gom.is_empty() {
        String::new()
    } else {
        let m = median(gom);
        format!(
            " wireguard_go_modern_gbps={m:.2} vs_wireguard_go_modern={:.2}",
            e / m
        )
    };
    println!(
        "encrypted_gbps={e:.2} wireguard_go_gbps={g:.2} boringtun_gbps={bt_best:.2} {bt_line}vxlan_gbps={v:.2} underlay_gbps={r:.2} vs_wireguard_go={:.2} vs_boringtun={:.2}{modern_line}",
        e / g,
        e / bt_best
    );
}
