# Sourced by the scripts once they are in the repository root.

# The directory cargo builds into, as cargo itself resolves it: CARGO_TARGET_DIR (a
# relative one from the repository root, where the scripts run cargo),
# CARGO_BUILD_TARGET_DIR, build.target-dir of a .cargo/config.toml, else target/.
target_dir() {
  local dir
  dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  [ -n "$dir" ] || { echo "cargo metadata named no target directory" >&2; return 1; }
  echo "$dir"
}

# Where `cargo build --release` leaves the binaries.
release_dir() {
  local dir
  dir=$(target_dir) || return
  echo "$dir/release"
}

# What every script that drives the test bed does first: checks it runs as root,
# installs the Debian packages and builds the binaries (release).
prepare_test_bed() {
  [ "$(id -u)" = 0 ] || { echo "run as root: sudo $0" >&2; exit 1; }
  scripts/deps.sh
  cargo build --release --workspace --bins
}
