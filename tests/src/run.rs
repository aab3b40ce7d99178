//! Running commands for tests, and the root/CI gate that opens root tests
//! ([`root_test!`](crate::root_test), [`docker_test!`](crate::docker_test)).

use std::path::PathBuf;
use std::process::{Command, Output};

/// True when the test may go on. Outside CI a non-root user gets a printed skip; under
/// `CI=true` a missing privilege fails the run, so CI can never pass by skipping.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
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

/// The name of the function this is expanded in (for a test, the test's name).
#[macro_export]
macro_rules! function_name {
    () => {{
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}

/// Opens a test that needs root ([`require_root`], named after the test): returns
/// from the test with a printed reason for a non-root user outside CI, fails it under
/// `CI=true`.
#[macro_export]
macro_rules! root_test {
    () => {
        if !$crate::run::require_root($crate::function_name!()) {
            return;
        }
    };
}

/// Opens a test that needs root, dockerd and busybox
/// ([`require_docker`](crate::docker::require_docker)), as [`root_test!`] does.
#[macro_export]
macro_rules! docker_test {
    () => {
        if !$crate::docker::require_docker($crate::function_name!()) {
            return;
        }
    };
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

/// The `netagent` binary built beside the running executable (`<target dir>/<profile>/`
/// `netagent`, whatever `CARGO_TARGET_DIR` made the target dir), or `$NETAGENT_BIN`.
/// Not `CARGO_BIN_EXE_netagent`: cargo sets that only for a package's own binaries.
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

#[cfg(test)]
mod tests {
    #[test]
    fn function_name_is_the_enclosing_functions() {
        assert_eq!(
            crate::function_name!(),
            "function_name_is_the_enclosing_functions"
        );
    }
}
