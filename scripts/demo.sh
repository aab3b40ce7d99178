#!/usr/bin/env bash
# The demo: a three-host mesh on this one machine (hosts are network namespaces),
# an agent per host, app containers attached across hosts. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: sudo $0" >&2; exit 1; }
scripts/deps.sh
cargo build --release --workspace --bins
exec target/release/netagent-testbed demo
