//! The agent's metrics end to end: two hosts on an encrypted network, DNS queries
//! from an attached namespace moving the DNS counters, the page passing
//! `promtool check metrics`, and a real Prometheus inside host 1 scraping the agent.
//! Every client runs inside a host's namespace, where the endpoint listens on
//! loopback.

use std::time::Duration;

use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::{root_test, sh, sh_ok};

const METRICS: &str = "127.0.0.1:9464";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// The metrics page of host `host`, fetched inside its namespace.
fn scrape(c: &Cluster, host: usize) -> String {
    sh_ok(&format!(
        "ip netns exec {} curl -sf --max-time 3 http://{METRICS}/metrics",
        c.bed.hosts[host - 1].netns
    ))
}

/// The value of the sample written exactly as `series` (name and labels).
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Values of every sample of family `name` (any labels).
fn values(page: &str, name: &str) -> Vec<f64> {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// Asks Prometheus (inside host 1) for `query`: the result's values.
fn prometheus_query(c: &Cluster, query: &str) -> Vec<String> {
    let out = sh(&format!(
        "ip netns exec {} curl -s --max-time 3 'http://{PROMETHEUS}/api/v1/query?query={query}'",
        c.bed.hosts[0].netns
    ));
    let Ok(reply) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    reply["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s["value"][1].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dns_queries_count_the_page_lints_and_prometheus_scrapes_it() {
    root_test!();
    let mut c = Cluster::new(2, 3);
    for host in 1..=2 {
        c.extra_tables[host - 1] = format!("[http]\nlisten = \"{METRICS}\"\n");
        c.start_agent(host);
    }
    c.create_encrypted_network("secure", "100.66.0.0/16");
    let s1 = c.bed.container("s1");
    let s2 = c.bed.container("s2");
    c.attach(1, &s1, "secure", &["--name", "web"]);
    let ip_s2 = c.attach(2, &s2, "secure", &["--name", "db"]);
    wait_for(Duration::from_secs(10), "ping over the mesh", || {
        c.bed.ping(&s1, ip_s2)
    });

    // Queries at 127.0.0.11 move the request and response counters.
    let a_queries = "netagent_dns_requests_total{proto=\"udp\",type=\"A\"}";
    let noerror = "netagent_dns_responses_total{rcode=\"NOERROR\"}";
    let before = scrape(&c, 1);
    let (a0, ok0) = (value(&before, a_queries), value(&before, noerror));
    for _ in 0..5 {
        let got = sh_ok(&format!(
            "ip netns exec {s1} dig +short +tries=1 +time=2 @127.0.0.11 db A"
        ));
        assert_eq!(got.trim(), ip_s2.to_string());
    }
    let after = scrape(&c, 1);
    let (a1, ok1) = (value(&after, a_queries), value(&after, noerror));
    assert!(
        a1.unwrap() >= a0.unwrap() + 5.0,
        "A queries {a0:?} -> {a1:?}\n{after}"
    );
    assert!(
        ok1.unwrap() >= ok0.unwrap() + 5.0,
        "NOERROR {ok0:?} -> {ok1:?}"
    );
    let answered = "netagent_dns_request_duration_seconds_count";
    assert!(value(&after, answered).unwrap() >= value(&before, answered).unwrap() + 5.0);

    // The mesh is up between the two: its series are there, with traffic.
    assert!(
        values(&after, "netagent_mesh_peer_receive_bytes_total")
            .iter()
            .any(|b| *b > 0.0),
        "{after}"
    );
    assert!(value(
        &after,
        "netagent_mesh_dropped_datagrams_total{reason=\"bad_mac\"}"
    )
    .is_some());
    assert_eq!(value(&after, "netagent_store_connected"), Some(1.0));
    assert_eq!(values(&after, "netagent_endpoints"), vec![1.0]);

    // The page as Prometheus's own linter reads it.
    let lint = sh(&format!(
        "ip netns exec {} curl -sf --max-time 3 http://{METRICS}/metrics | promtool check metrics",
        c.bed.hosts[0].netns
    ));
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // A real Prometheus in host 1, scraping every second.
    let dir = std::env::temp_dir().join(format!("netagent-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: netagent\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )
    .unwrap();
    let (config_arg, storage_arg, listen_arg) = (
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={PROMETHEUS}"),
    );
    let netns = c.bed.hosts[0].netns.clone();
    let prometheus = c.bed.spawn_logged(
        &netns,
        "prometheus",
        &[&config_arg, &storage_arg, &listen_arg],
        &dir.join("prometheus.log"),
    );
    let scraped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            Duration::from_secs(60),
            "Prometheus to scrape the agent",
            || {
                prometheus_query(&c, "up") == ["1"]
                    && prometheus_query(&c, "netagent_store_connected") == ["1"]
            },
        )
    }));
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    c.bed.kill(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    if scraped.is_err() {
        panic!("Prometheus never saw the agent up; its log:\n{log}");
    }
}
