//! Containers are the untrusted party: each test here is an attack a container (or a
//! process that reached the host's sockets) would make, and what must hold after it.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::docker::DockerHost;
use netagent_tests::{docker_test, root_test};

const NET: &str = "netagent.network=app";

/// The engine goes before the test bed (containers removed, dockerd stopped).
struct Host {
    engine: DockerHost,
    c: Cluster,
}

/// A container whose entrypoint swaps its /etc for one it made (allowed by every
/// storage driver that can rename a lower directory: vfs here, btrfs, zfs,
/// fuse-overlayfs), runs `trap` in it, and says when it is done.
fn trap(d: &DockerHost, name: &str, labels: &[&str], trap: &str) {
    let script =
        format!("mv /etc /etc.o && mkdir /etc && {trap} && touch /tmp/ready && exec sleep 3600");
    d.run(name, labels, &[], &["sh", "-c", &script]);
    wait_for(Duration::from_secs(10), &format!("{name}'s trap"), || {
        d.docker(&["exec", name, "test", "-e", "/tmp/ready"])
            .status
            .success()
    });
}

#[test]
fn resolv_conf_traps_leave_host_files_and_the_event_loop_alone() {
    docker_test!();
    let mut c = Cluster::new(1, 3);
    let dir = std::env::temp_dir().join(format!("{}-docker-vfs", c.bed.id));
    let engine = DockerHost::start_with(&c.bed.hosts[0].netns, &dir, &["--storage-driver", "vfs"]);
    c.docker_sockets[0] = Some(engine.socket.clone());
    c.start_agent(1);
    c.create_network("app", "100.64.0.0/16");
    let t = Host { engine, c };
    let (d, c) = (&t.engine, &t.c);

    // A host file the container names by its absolute path.
    let sentinel = dir.join("authorized_keys");
    let original = b"ssh-ed25519 AAAA host-admin\n".to_vec();
    std::fs::write(&sentinel, &original).unwrap();

    // 1. resolv.conf is a symlink to the host file; attached by hand once set.
    trap(
        d,
        "symlink",
        &[],
        &format!("ln -s {} /etc/resolv.conf", sentinel.display()),
    );
    c.cli_ok(1, &["attach", "symlink", "app"]);
    // 2. /etc is a symlink to a host directory.
    trap(
        d,
        "etcdir",
        &[],
        &format!(
            "rmdir /etc && ln -s {} /etc",
            sentinel.parent().unwrap().display()
        ),
    );
    // The trap names the file resolv.conf inside the host directory.
    std::fs::write(dir.join("resolv.conf"), &original).unwrap();
    c.cli_ok(1, &["attach", "etcdir", "app"]);
    // 3. A FIFO nobody writes: a read would block for good (labelled: the event path).
    trap(d, "fifo", &[NET], "mkfifo /etc/resolv.conf");
    // 4. The host's /dev/zero: a read would never end.
    trap(d, "zero", &[], "ln -s /dev/zero /etc/resolv.conf");
    c.cli_ok(1, &["attach", "zero", "app"]);

    let refused = || c.log(1).matches("container file /etc/resolv.conf").count();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refused() < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&sentinel).unwrap()),
        String::from_utf8_lossy(&original),
        "a host file was written through a container's symlink"
    );
    assert_eq!(std::fs::read(dir.join("resolv.conf")).unwrap(), original);
    assert_eq!(refused(), 4, "each trap refused once:\n{}", c.log(1));

    // The Docker events still flow: a container started after the traps is attached
    // and pointed at the embedded DNS, and the FIFO one was attached too.
    d.run("after", &[NET], &[], &["sleep", "3600"]);
    wait_for(
        Duration::from_secs(10),
        "the later container attached",
        || {
            let endpoints = c.cli_ok(1, &["endpoints"]);
            endpoints.contains("after") && endpoints.contains("fifo")
        },
    );
    wait_for(Duration::from_secs(5), "its resolver pointed at us", || {
        d.exec_ok("after", &["cat", "/etc/resolv.conf"])
            .contains("nameserver 127.0.0.11")
    });
    let status = c.cli_ok(1, &["status"]);
    assert!(status.contains("state:      ok"), "{status}");
    assert_eq!(std::fs::read(&sentinel).unwrap(), original);
}

#[test]
fn the_host_namespace_cannot_join_a_network() {
    root_test!();
    let c = Cluster::running(1, 3);
    c.create_network("app", "100.64.0.0/16");
    // The agent's host, by its path; and init's namespace (which a sandbox may not
    // even let the agent open: refused either way).
    let host_ns = format!("/run/netns/{}", c.bed.hosts[0].netns);
    let out = c.cli(1, &["attach", &host_ns, "app"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the host's namespace was attached");
    assert!(err.contains("host's own network namespace"), "{err}");
    assert!(!err.contains("backtrace"), "{err}");
    assert!(!c.cli(1, &["attach", "pid:1", "app"]).status.success());
    let endpoints = c.cli_ok(1, &["endpoints"]);
    assert!(!endpoints.contains("100.64."), "{endpoints}");
}

#[test]
fn a_container_gets_no_ipv6_path_to_its_host() {
    root_test!();
    let mut c = Cluster::running(1, 3);
    c.create_network("app", "100.64.0.0/16");
    let ns = c.bed.container("probe");
    c.attach(1, &ns, "app", &[]);
    // The firewall filters IPv4: over IPv6 link-local the host would answer on any
    // service bound to [::]. All nodes on the link: the host end must not be one.
    // The probe's own link-local address may answer too (once out of DAD): not the host.
    let own = String::from_utf8_lossy(&c.bed.exec(&ns, "ip -6 -o addr show dev eth0").stdout)
        .into_owned();
    let out = c.bed.exec(&ns, "ping -6 -c2 -W1 ff02::1%eth0");
    let said = String::from_utf8_lossy(&out.stdout);
    let others: Vec<&str> = said
        .lines()
        .filter_map(|l| l.split("bytes from ").nth(1))
        // "fe80::…%eth0: icmp_seq=2 …": the address before the zone.
        .map(|rest| rest.split(['%', ' ']).next().unwrap_or(rest))
        .filter(|from| !own.contains(&format!("inet6 {from}/")))
        .collect();
    assert!(others.is_empty(), "the host answered over IPv6: {said}");
    // IPv4 to the outside still works.
    assert!(c
        .bed
        .exec(
            &ns,
            &format!("ping -c1 -W2 {}", netagent_tests::OUTSIDE_ADDRESS)
        )
        .status
        .success());
}

#[test]
fn the_api_socket_is_private_and_refuses_huge_requests() {
    root_test!();
    let c = Cluster::running(1, 3);
    let socket = c.socket(1);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());
    let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // 2 MiB and no newline: the agent must not keep buffering.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..32 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("larger than"), "{reply:?}");
    // The agent still answers.
    assert!(c.cli_ok(1, &["status"]).contains("state:"));
}

#[test]
fn a_bad_store_record_takes_out_only_itself() {
    root_test!();
    let mut c = Cluster::running(2, 3);
    c.create_network("app", "100.64.0.0/16");
    c.create_network("other", "100.65.0.0/16");
    let a1 = c.bed.container("a1");
    let a2 = c.bed.container("a2");
    let o1 = c.bed.container("o1");
    let o2 = c.bed.container("o2");
    c.attach(1, &a1, "app", &["--service", "web"]);
    c.attach(2, &a2, "app", &["--service", "web"]);
    c.attach(1, &o1, "other", &[]);
    let o2_ip = c.attach(2, &o2, "other", &["--service", "db"]);
    // A store writer adds a third owner of "app" blocks at host 2's underlay (a clash
    // in one network), a network for 0.0.0.0/0, and an endpoint with 1,000 aliases.
    let put = |key: &str, value: &str| {
        let out = c.etcdctl(&format!("put /netagent/{key} '{value}'"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    put(
        "blocks/app/100.64.200.0_24",
        r#"{"network":"app","block":"100.64.200.0/24","node":"ghost","underlay":"192.0.2.12"}"#,
    );
    put(
        "networks/everything",
        r#"{"name":"everything","subnet":"0.0.0.0/0","vni":77,"block_prefix":24}"#,
    );
    let aliases: Vec<String> = (0..1000).map(|i| format!("\"n{i}\"")).collect();
    put(
        "endpoints/other/100.65.9.9",
        &format!(
            r#"{{"network":"other","address":"100.65.9.9","node":"host2","id":"ns:1","netns":"/proc/1/ns/net","aliases":[{}]}}"#,
            aliases.join(",")
        ),
    );
    wait_for(Duration::from_secs(5), "status to name each", || {
        let s = c.cli_ok(1, &["status"]);
        s.contains("store record /netagent/networks/everything")
            || s.contains("store record networks/everything")
    });
    let status = c.cli_ok(1, &["status"]);
    assert!(
        status.contains("everything") && status.contains("/8 to /30"),
        "{status}"
    );
    assert!(
        status.contains("100.65.9.9") && status.contains("aliases"),
        "{status}"
    );
    assert!(
        status.contains("network \"app\" on this host") && status.contains("used twice"),
        "{status}"
    );
    // The other network still carries traffic and answers names across hosts.
    assert_eq!(netagent_tests::cluster::resolve(&o1, "db"), vec![o2_ip]);
    assert_eq!(
        netagent_tests::tcp_transfer(&o2, o2_ip, &o1, 1 << 16),
        1 << 16
    );
    assert!(!c.cli_ok(1, &["network", "ls"]).contains("everything"));
    // A network made after the bad records is wired across hosts (the datapath
    // reconcile goes on for every network but the clashing one).
    c.create_network("late", "100.66.0.0/16");
    let l1 = c.bed.container("l1");
    let l2 = c.bed.container("l2");
    c.attach(1, &l1, "late", &[]);
    let l2_ip = c.attach(2, &l2, "late", &[]);
    wait_for(Duration::from_secs(5), "late network across hosts", || {
        c.bed
            .exec(&l1, &format!("ping -c1 -W1 {l2_ip}"))
            .status
            .success()
    });
}
