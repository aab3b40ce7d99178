//! `demo`: the product's tour on the test bed (scripts/demo.sh).

use std::time::Duration;

use netagent_tests::cluster::Cluster;
use netagent_tests::docker::{DockerHost, IMAGE};

use crate::common::{show, step};

/// Three hosts, etcd, an agent each; a network, a `db` and three `echo_api`
/// replicas spread over the hosts, seen from a client on host 1.
pub fn run() {
    step("etcd over mutual TLS (a CA, server and client certificates made with openssl) and three hosts (network namespaces on one underlay: 192.0.2.11-13), `netagent agent` on each");
    let mut c = Cluster::new(3, 5);
    // Host 1 also serves metrics, health and the live page (in its own namespace).
    c.extra_tables[0] = "[http]\nlisten = \"127.0.0.1:9464\"\n".into();
    for host in 1..=3 {
        c.start_agent(host);
    }
    let run = |c: &Cluster, host: usize, args: &[&str]| {
        println!("$ netagent {}        # on host{host}", args.join(" "));
        print!("{}", c.cli_ok(host, args));
    };
    run(&c, 1, &["status"]);
    run(
        &c,
        1,
        &["network", "create", "app-net", "--subnet", "100.64.0.0/16"],
    );
    run(
        &c,
        1,
        &[
            "network",
            "create",
            "other-net",
            "--subnet",
            "100.65.0.0/16",
        ],
    );

    step("containers (namespaces) attached on the hosts they run on");
    let client = c.bed.container("client");
    let db = c.bed.container("db");
    let replicas: Vec<(usize, String)> = [(2, "api1"), (2, "api2"), (3, "api3")]
        .iter()
        .map(|(h, n)| (*h, c.bed.container(n)))
        .collect();
    let outsider = c.bed.container("outsider");
    let attach = |c: &Cluster, host: usize, ns: &str, net: &str, extra: &[&str]| {
        let path = format!("/run/netns/{ns}");
        let mut args = vec!["attach", path.as_str(), net];
        args.extend_from_slice(extra);
        run(c, host, &args);
    };
    attach(&c, 1, &client, "app-net", &["--name", "client"]);
    attach(&c, 1, &db, "app-net", &["--service", "db", "--name", "db"]);
    for (i, (h, ns)) in replicas.iter().enumerate() {
        let name = format!("echo_api.{}", i + 1);
        attach(
            &c,
            *h,
            ns,
            "app-net",
            &["--service", "echo_api", "--name", &name],
        );
    }
    attach(&c, 3, &outsider, "other-net", &["--name", "outsider"]);

    step("the mesh, the services and every endpoint, as host 1 sees them");
    std::thread::sleep(Duration::from_millis(2500)); // one round-trip probe
    run(&c, 1, &["peers"]);
    run(&c, 1, &["services"]);
    run(&c, 1, &["endpoints"]);

    step("each echo_api replica serves its name over HTTP (busybox httpd)");
    for (i, (_, ns)) in replicas.iter().enumerate() {
        let dir = c.dir.join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("index.html"),
            format!("hello from echo_api.{}\n", i + 1),
        )
        .unwrap();
        c.bed.spawn(
            ns,
            "busybox",
            &["httpd", "-f", "-p", "80", "-h", dir.to_str().unwrap()],
        );
    }
    // The client's resolver is the embedded DNS, as in a Docker container.
    let etc = format!("/etc/netns/{client}");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.11\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));

    step("round-robin: echo_api from the client on host 1, four times (order rotates)");
    for _ in 0..4 {
        show(
            &c.bed,
            &client,
            "client",
            "dig +short echo_api | tr '\\n' ' '; echo",
        );
    }
    show(
        &c.bed,
        &client,
        "client",
        "busybox nslookup db 127.0.0.11 | tail -n +3",
    );

    step("requests by name reach every replica across hosts");
    for _ in 0..3 {
        show(
            &c.bed,
            &client,
            "client",
            "busybox wget -q -O - http://echo_api/",
        );
    }

    step("other-net is isolated from app-net; its names are not visible either");
    let reach = c.bed.ping(&outsider, "100.64.0.2".parse().unwrap());
    println!(
        "outsider (other-net, host3) -> client (app-net, host1): {}",
        if reach { "REACHABLE (bug!)" } else { "blocked" }
    );
    show(
        &c.bed,
        &outsider,
        "outsider",
        "dig +short @127.0.0.11 echo_api; echo \"(no answer: NXDOMAIN)\"",
    );

    step("an encrypted network: between hosts only WireGuard (userspace, ours) carries it");
    run(
        &c,
        1,
        &[
            "network",
            "create",
            "secure-net",
            "--subnet",
            "100.66.0.0/16",
            "--encrypted",
        ],
    );
    let vault = c.bed.container("vault");
    attach(&c, 3, &vault, "secure-net", &["--service", "vault"]);
    attach(&c, 1, &client, "secure-net", &[]);
    let dir = c.dir.join("vault");
    std::fs::create_dir_all(&dir).unwrap();
    // 4 MiB, so the transfer shows in the byte counters.
    std::fs::write(dir.join("index.html"), vec![b'x'; 4 << 20]).unwrap();
    c.bed.spawn(
        &vault,
        "busybox",
        &["httpd", "-f", "-p", "80", "-h", dir.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_millis(300));
    show(
        &c.bed,
        &client,
        "client",
        "busybox wget -q -O - http://vault/ | wc -c",
    );
    run(&c, 1, &["peers"]);

    step("Docker, the seed's Compose case: a dockerd on host 1 and on host 2; containers run with --network none and a label, the agents (restarted to follow their engine) do the rest");
    let engines: Vec<DockerHost> = (1..=2)
        .map(|h| {
            let dir = std::env::temp_dir().join(format!("{}-docker{h}", c.bed.id));
            DockerHost::start(&c.bed.hosts[h - 1].netns, &dir)
        })
        .collect();
    for (i, e) in engines.iter().enumerate() {
        c.stop_agent(i + 1);
        c.docker_sockets[i] = Some(e.socket.clone());
        c.start_agent(i + 1);
    }
    let web = ["netagent.network=app-net", "com.docker.compose.service=web"];
    for name in ["web1", "web2"] {
        println!("$ docker run -d --network none --label {} --label {} --name {name} {IMAGE} sh -c 'hostname > /www/index.html; httpd -f -p 80 -h /www'        # on host2", web[0], web[1]);
        engines[1].run_web(name, &web, &[]);
    }
    println!("$ docker run -d --network none --label netagent.network=app-net --name shell {IMAGE} sleep 1d        # on host1");
    engines[0].run(
        "shell",
        &["netagent.network=app-net"],
        &[],
        &["sleep", "86400"],
    );
    netagent_tests::cluster::wait_for(Duration::from_secs(10), "web to resolve", || {
        engines[0].nslookup("shell", "web").len() == 2
    });
    let docker_exec = |cmd: &[&str]| {
        println!("$ docker exec shell {}        # on host1", cmd.join(" "));
        println!("{}", engines[0].exec_ok("shell", cmd));
    };
    docker_exec(&["cat", "/etc/resolv.conf"]);
    docker_exec(&["nslookup", "-type=a", "web"]);
    for _ in 0..2 {
        docker_exec(&["wget", "-q", "-O", "-", "http://web/"]);
    }
    docker_exec(&["nslookup", "-type=a", "db"]);
    run(&c, 1, &["services"]);
    step("operating it: the hosts the store knows, and host 1's HTTP endpoint (readiness, a few of its Prometheus series)");
    run(&c, 1, &["node", "ls"]);
    let h1 = c.bed.hosts[0].netns.clone();
    show(
        &c.bed,
        &h1,
        "host1",
        "curl -s http://127.0.0.1:9464/readyz; echo",
    );
    show(
        &c.bed,
        &h1,
        "host1",
        "curl -s http://127.0.0.1:9464/metrics | grep -E '^netagent_(peers|endpoints|store_connected|dns_requests_total)' | head -8",
    );

    drop(engines);

    step("cleaning up");
    let _ = std::fs::remove_dir_all(&etc);
    drop(c);
    println!("done");
}
