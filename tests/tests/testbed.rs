//! The test bed's own tests: hosts reach each other over the underlay, and nothing of
//! a test bed survives its teardown.

use netagent_tests::{root_test, sh_ok, Testbed};

#[test]
fn hosts_ping_each_other_over_the_underlay() {
    root_test!();
    let bed = Testbed::new(3);
    for a in &bed.hosts {
        for b in &bed.hosts {
            if a.name != b.name {
                assert!(
                    bed.ping(&a.netns, b.underlay),
                    "{} cannot reach {}",
                    a.name,
                    b.name
                );
            }
        }
    }
}

#[test]
fn teardown_leaves_no_namespace_link_or_process() {
    root_test!();
    let links_before = sh_ok("ip -o link show | wc -l");
    let (namespaces, pid) = {
        let mut bed = Testbed::new(2);
        let c = bed.container("x");
        let pid = bed.spawn(&c, "sleep", &["300"]);
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        (bed.namespaces().to_vec(), pid)
    };
    let listed = sh_ok("ip netns list");
    for ns in &namespaces {
        assert!(
            !listed.contains(ns.as_str()),
            "namespace {ns} survived teardown"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        !status.contains("State:\tS"),
        "process {pid} survived teardown"
    );
    assert_eq!(
        links_before,
        sh_ok("ip -o link show | wc -l"),
        "links leaked into the root namespace"
    );
}

#[test]
fn panicking_test_still_tears_down() {
    root_test!();
    let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = names.clone();
    let result = std::panic::catch_unwind(move || {
        let bed = Testbed::new(1);
        *seen.lock().unwrap() = bed.namespaces().to_vec();
        panic!("test failure inside a test bed");
    });
    assert!(result.is_err());
    let listed = sh_ok("ip netns list");
    let names = names.lock().unwrap();
    assert!(!names.is_empty());
    for ns in names.iter() {
        assert!(
            !listed.contains(ns.as_str()),
            "namespace {ns} survived a panic"
        );
    }
}

#[test]
fn leftovers_of_a_killed_run_are_removed_by_the_next() {
    root_test!();
    // A namespace named as a test bed of a process that no longer exists (a PID above
    // pid_max cannot be alive), with a process still running inside it.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = format!("ntb{}x0h1", pid_max + 1);
    sh_ok(&format!("ip netns add {stale}"));
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "300"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _bed = Testbed::new(1);
    assert!(
        !sh_ok("ip netns list").contains(&stale),
        "stale namespace {stale} survived"
    );
    let status = sleeper.wait().unwrap();
    assert!(
        !status.success(),
        "the process in the stale namespace should have been killed"
    );
}
