//! The kernel keeps forwarding while the controlling process dies; a new process
//! adopts what is there without disturbing traffic.

use std::time::{Duration, Instant};

use netagent_tests::{netagent_bin, root_test, write_state, Mesh, Testbed};

#[test]
fn killing_and_replacing_the_controller_loses_no_packet() {
    root_test!();
    let bin = netagent_bin();
    let bin = bin.to_str().unwrap();
    let mut bed = Testbed::new(2);
    let c1 = bed.container("a1");
    let c2 = bed.container("a2");
    let mut mesh = Mesh::new(&bed).network("a", 100, "100.64.0.0/16");
    mesh.endpoint(1, "a", &c1, 10);
    let ip2 = mesh.endpoint(2, "a", &c2, 10);
    let dir = std::env::temp_dir().join(format!("{}-adopt", bed.id));
    std::fs::create_dir_all(&dir).unwrap();
    let mut agents = Vec::new();
    for (i, h) in bed.hosts.clone().iter().enumerate() {
        let file = dir.join(format!("{}.toml", h.name));
        write_state(&file, &mesh.state(i + 1));
        let f = file.to_str().unwrap().to_string();
        agents.push((
            h.netns.clone(),
            f.clone(),
            bed.spawn(
                &h.netns,
                bin,
                &["apply", "--state", &f, "--hold", "--interval", "1"],
            ),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !bed.ping(&c1, ip2) {
        assert!(Instant::now() < deadline, "overlay never came up");
    }

    // 100 pings at 50 ms while both controllers are killed and replaced.
    let ping = bed.spawn(
        &c1,
        "ping",
        &[
            "-n",
            "-q",
            "-i",
            "0.05",
            "-c",
            "100",
            "-W",
            "1",
            &ip2.to_string(),
        ],
    );
    std::thread::sleep(Duration::from_millis(1000));
    let mut replaced = Vec::new();
    for (netns, file, pid) in agents {
        bed.kill(pid);
        replaced.push(bed.spawn(
            &netns,
            bin,
            &["apply", "--state", &file, "--hold", "--interval", "1"],
        ));
    }
    let out = bed.take(ping).unwrap().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("100 packets transmitted, 100 received"),
        "packets lost:\n{text}"
    );

    // The new controllers found everything in place and changed nothing.
    std::thread::sleep(Duration::from_millis(500));
    for pid in replaced {
        let log = bed.kill(pid);
        assert!(
            log.contains("0 created, 0 removed, 0 adjusted, firewall unchanged"),
            "new controller changed the kernel:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
