//! What several subcommands share: section headings, shown commands, medians and
//! resident memory.

use netagent_tests::Testbed;

/// Network "bench" (100.64.0.0/14) with /22 blocks: one host holds up to 1,021
/// endpoints of it.
pub fn create_bench_network(c: &netagent_tests::cluster::Cluster) {
    c.cli_ok(
        1,
        &[
            "network",
            "create",
            "bench",
            "--subnet",
            "100.64.0.0/14",
            "--block-size",
            "22",
        ],
    );
}

/// A bold section heading in the output.
pub fn step(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Runs `cmd` in `netns`, showing it and its output.
pub fn show(bed: &Testbed, netns: &str, label: &str, cmd: &str) {
    println!("$ {label}: {cmd}");
    print!("{}", bed.exec_ok(netns, cmd));
}

/// The median of figures from interleaved rounds: the machine's drift hits all alike.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// VmRSS in KiB from the text of a /proc/PID/status file.
pub fn vm_rss_kib(status: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
