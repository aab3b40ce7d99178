//! `bench-overlay`: overlay throughput against a bare VXLAN pair and the underlay
//! (scripts/bench/overlay.sh).

use std::time::Duration;

use netagent_tests::{Mesh, Testbed};

use crate::common::median;

/// iperf3 across two hosts: overlay (namespace to namespace), a bare kernel VXLAN pair,
/// and the raw underlay, in one run. Last line: key=value figures.
pub fn run(seconds: u32) {
    let mut bed = Testbed::new(2);
    let c1 = bed.container("b1");
    let c2 = bed.container("b2");
    let mut mesh = Mesh::new(&bed).network("bench", 4300, "100.64.0.0/16");
    mesh.endpoint(1, "bench", &c1, 10);
    let server_ip = mesh.endpoint(2, "bench", &c2, 10);
    for (i, h) in bed.hosts.iter().enumerate() {
        netagent_tests::apply(&h.path(), &mesh.state(i + 1)).expect("apply");
    }
    let (h1, h2) = (bed.hosts[0].clone(), bed.hosts[1].clone());
    // A bare VXLAN pair between the same hosts, no bridge, no veth, no firewall, on a
    // port of its own (4789 and 4790 are the agent's, taken only from its peers), its
    // outer packets untracked as the agent's are.
    for (me, peer, addr) in [(&h1, &h2, "198.51.100.1"), (&h2, &h1, "198.51.100.2")] {
        bed.exec_ok(
            &me.netns,
            &format!(
                "ip link add vxbare type vxlan id 999 local {} remote {} dstport 4800 dev eth0 && \
             ip addr add {addr}/24 dev vxbare && ip link set vxbare up && \
             nft add table ip benchbare && \
             nft add chain ip benchbare pre '{{ type filter hook prerouting priority raw; }}' && \
             nft add chain ip benchbare out '{{ type filter hook output priority raw; }}' && \
             nft add rule ip benchbare pre udp dport 4800 notrack && \
             nft add rule ip benchbare out udp dport 4800 notrack",
                me.underlay, peer.underlay
            ),
        );
    }
    let iperf =
        |bed: &mut Testbed, server_ns: &str, client_ns: &str, target: &str, streams: u32| -> f64 {
            let pid = bed.spawn(server_ns, "iperf3", &["-s", "-1", "-B", target]);
            std::thread::sleep(Duration::from_millis(400));
            let out = bed.exec_ok(
                client_ns,
                &format!("iperf3 -c {target} -t {seconds} -P {streams} -J"),
            );
            let _ = bed.kill(pid);
            let json: serde_json::Value = serde_json::from_str(&out).expect("iperf3 json");
            json["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e9
        };
    // Paths interleaved, five rounds, medians: the machine's drift hits all alike.
    const ROUNDS: usize = 5;
    let mut figures = Vec::new();
    for streams in [1, 4] {
        let (mut o, mut v, mut u) = (vec![], vec![], vec![]);
        for round in 1..=ROUNDS {
            o.push(iperf(&mut bed, &c2, &c1, &server_ip.to_string(), streams));
            v.push(iperf(
                &mut bed,
                &h2.netns,
                &h1.netns,
                "198.51.100.2",
                streams,
            ));
            u.push(iperf(
                &mut bed,
                &h2.netns,
                &h1.netns,
                &h2.underlay.to_string(),
                streams,
            ));
            println!(
                "-P{streams} round {round}: overlay {:.2} Gbit/s, bare vxlan {:.2}, raw underlay {:.2}",
                o[round - 1], v[round - 1], u[round - 1]
            );
        }
        figures.push((median(o), median(v), median(u)));
    }
    let (o, v, u) = figures[0];
    let (o4, v4, u4) = figures[1];
    println!(
        "overlay_gbps={o:.2} vxlan_gbps={v:.2} underlay_gbps={u:.2} ratio={:.2} vs_vxlan={:.2} overlay_p4_gbps={o4:.2} vxlan_p4_gbps={v4:.2} underlay_p4_gbps={u4:.2} ratio_p4={:.2}",
        o / u, o / v, o4 / u4
    );
}
