#!/usr/bin/env bash
# The demo: a three-host mesh on this one machine (hosts are network namespaces),
# an agent per host, app containers attached across hosts. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root: sudo $0" >&2; exit 1; }
scripts/deps.sh
cargo build --release --workspace --bins
bin_dir=$(release_dir)
exec "$bin_dir/netagent-testbed" demo
