//! Running commands for tests, and the root/CI gate.

use std::path::PathBuf;
use std::process::{Command, Output};

/// True when the test may go on. Outside CI a non-root user gets a printed skip; under
/// `CI=true` a missing privilege fails the run, so CI can never pass by skipping.
pub fn require_root(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root (namespaces, netlink, nftables) and CI=true forbids skipping");
    }
    eprintln!(
        "SKIPPED {test}: needs root (namespaces, netlink, nftables); run as root or under sudo"
    );
    false
}

/// Runs a shell command, returning its output whatever the exit status.
pub fn sh(script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh: {e}"))
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn sh_ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "command failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `netagent` binary built beside the test executable (target/<profile>/netagent),
/// or `$NETAGENT_BIN`.
pub fn netagent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NETAGENT_BIN") {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps, helper binaries one level up.
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("target/<profile>");
    let bin = [dir.join("netagent"), dir.join("../netagent")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("netagent"));
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p netagent) or set NETAGENT_BIN",
        bin.display()
    );
    bin
}
