//! The cluster store is reachable only with credentials: etcd over TLS with
//! `--client-cert-auth`, the agent's `[store]` certificate keys, and what a user sees
//! when a certificate is missing, foreign or not trusted.

use std::time::{Duration, Instant};

use netagent_tests::cluster::{wait_for, Cluster, ETCD_ADDRESS};
use netagent_tests::pki::Pki;
use netagent_tests::{netagent_bin, root_test, sh, Testbed};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn etcd_refuses_clients_without_a_client_certificate() {
    root_test!();
    let c = Cluster::new(1, 3);
    let pki = c.pki.clone().expect("a TLS cluster");
    let put = c.etcdctl("put /probe kept");
    assert!(put.status.success(), "{}", text(&put));

    let u = &c.bed.underlay_ns;
    let endpoint = format!("https://{ETCD_ADDRESS}:2379");
    let ca_only = |args: &str| {
        sh(&format!(
            "ip netns exec {u} etcdctl --endpoints {endpoint} --dial-timeout 1s --command-timeout 2s --cacert {} {args}",
            pki.ca.display()
        ))
    };
    let read = ca_only("get /probe");
    assert!(
        !read.status.success() && !text(&read).contains("kept"),
        "read without a client certificate: {}",
        text(&read)
    );
    let write = ca_only("put /probe stolen");
    assert!(!write.status.success(), "{}", text(&write));
    let plain = sh(&format!(
        "ip netns exec {u} etcdctl --endpoints http://{ETCD_ADDRESS}:2379 --dial-timeout 1s --command-timeout 2s put /probe stolen"
    ));
    assert!(!plain.status.success(), "plain http: {}", text(&plain));
    // A certificate from another CA is no better than none.
    let other = Pki::generate(&c.dir.join("other"), "other-ca", ETCD_ADDRESS);
    let foreign = sh(&format!(
        "ip netns exec {u} etcdctl --endpoints {endpoint} --dial-timeout 1s --command-timeout 2s --cacert {} --cert {} --key {} put /probe stolen",
        pki.ca.display(),
        other.client_cert.display(),
        other.client_key.display()
    ));
    assert!(!foreign.status.success(), "{}", text(&foreign));

    let got = c.etcdctl("get --print-value-only /probe");
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "kept");
}

#[test]
fn an_https_endpoint_without_ca_file_stops_the_agent_at_start() {
    root_test!();
    // In a host namespace of its own: an agent that took this config would start.
    let bed = Testbed::new(1);
    let dir = std::env::temp_dir().join(format!("netagent-store-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "node = \"x\"\nstate_dir = \"{d}/state\"\napi_socket = \"{d}/agent.sock\"\n[store]\netcd = [\"https://192.0.2.2:2379\"]\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // A bounded wait: an agent that accepted the config would run on.
    let out = sh(&format!(
        "ip netns exec {} env RUST_BACKTRACE=1 timeout 10 {} agent --config {}",
        bed.hosts[0].netns,
        netagent_bin().display(),
        config.display()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(124), "the agent started: {e}");
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("line 5: etcd endpoint https://192.0.2.2:2379 needs [store] ca_file (and cert_file/key_file for client certificates)"),
        "{e}"
    );
}

#[test]
fn an_agent_with_the_cluster_certificate_stores_and_says_so() {
    root_test!();
    let c = Cluster::running(1, 3);
    c.create_network("tls-net", "100.64.0.0/16");
    let status: serde_json::Value =
        serde_json::from_str(&c.cli_ok(1, &["status", "--json"])).unwrap();
    assert_eq!(status["state"], "ok", "{status}");
    assert_eq!(status["store"]["connected"], true, "{status}");
    assert_eq!(status["store"]["transport"], "mutual_tls", "{status}");
    let shown = c.cli_ok(1, &["status"]);
    assert!(
        shown.contains(&format!(
            "etcd https://{ETCD_ADDRESS}:2379 (connected; mutual TLS)"
        )),
        "{shown}"
    );
    // The record went into the TLS etcd: a client with the certificate reads it.
    let keys = c.etcdctl("get --prefix --keys-only /netagent/");
    let keys = String::from_utf8_lossy(&keys.stdout);
    assert!(keys.contains("tls-net"), "{keys}");
}

#[test]
fn a_foreign_certificate_or_ca_is_refused_and_status_says_why() {
    root_test!();
    let mut c = Cluster::new(2, 3);
    let pki = c.pki.clone().expect("a TLS cluster");
    let other = Pki::generate(&c.dir.join("other"), "other-ca", ETCD_ADDRESS);
    // Host 1: a client certificate signed by another CA. Host 2: trusts the wrong CA.
    c.store_keys[0] = Some(format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.ca.display(),
        other.client_cert.display(),
        other.client_key.display()
    ));
    c.store_keys[1] = Some(format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        other.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    ));
    c.spawn_agent(1);
    c.spawn_agent(2);
    let cases = [
        (
            1,
            format!(
                "etcd rejected this host's client certificate (cert_file {},",
                other.client_cert.display()
            ),
        ),
        (
            2,
            format!(
                "etcd's server certificate rejected: not signed by the CA in ca_file {}",
                other.ca.display()
            ),
        ),
    ];
    for (host, why) in &cases {
        let mut last = String::new();
        wait_for(
            Duration::from_secs(10),
            &format!("host{host}'s status to say {why:?}"),
            || {
                // An answer, not a hang, and never "ok".
                let start = Instant::now();
                let out = sh(&format!(
                    "timeout 5 {} --socket {} status",
                    netagent_bin().display(),
                    c.socket(*host).display()
                ));
                assert!(
                    start.elapsed() < Duration::from_secs(3),
                    "status took {:?}",
                    start.elapsed()
                );
                last = text(&out);
                assert!(!last.contains("state:      ok"), "{last}");
                if out.status.success() {
                    return false;
                }
                last.contains(why.as_str())
                && last.contains(&format!("waiting for its cluster store (etcd https://{ETCD_ADDRESS}:2379) before it serves: "))
            },
        );
        eprintln!("host{host}: netagent status says: {last}");
        assert!(!last.contains("backtrace"), "{last}");
        let log = c.log(*host);
        assert!(log.contains(why.as_str()), "host{host} log:\n{log}");
    }
    // Nothing was written by either.
    let keys = c.etcdctl("get --prefix --keys-only /netagent/");
    assert!(keys.status.success(), "{}", text(&keys));
    assert_eq!(String::from_utf8_lossy(&keys.stdout).trim(), "");
}

#[test]
fn a_plaintext_store_works_but_is_shown_insecure() {
    root_test!();
    let mut c = Cluster::plaintext(1, 3);
    c.start_agent(1);
    let status: serde_json::Value =
        serde_json::from_str(&c.cli_ok(1, &["status", "--json"])).unwrap();
    assert_eq!(status["store"]["transport"], "plaintext", "{status}");
    assert_eq!(status["store"]["connected"], true, "{status}");
    let shown = c.cli_ok(1, &["status"]);
    assert!(
        shown.contains(&format!(
            "etcd http://{ETCD_ADDRESS}:2379 (connected; INSECURE: plaintext http"
        )),
        "{shown}"
    );
    assert!(
        c.log(1).contains("etcd over plaintext http"),
        "{}",
        c.log(1)
    );
}
