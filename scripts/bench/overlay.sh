#!/usr/bin/env bash
# Overlay throughput against a bare kernel VXLAN pair and the raw underlay, in one
# run, on the test bed (two hosts). Run by hand as root. Usage: overlay.sh [SECONDS]
# Last line: overlay_gbps=.. vxlan_gbps=.. underlay_gbps=.. ratio=.. (ratio = overlay/underlay, -P1)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
scripts/deps.sh
cargo build --release --workspace --bins >&2
bin_dir=$(release_dir)
exec "$bin_dir/netagent-testbed" bench-overlay "${1:-10}"
