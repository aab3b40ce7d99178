#!/usr/bin/env bash
# Encrypted networks' throughput in one run on the test bed (two hosts): netagent's
# encrypted network against WireGuard tunnels between the same hosts made with
# Debian's wireguard-go, a modern wireguard-go with its TUN and UDP offloads (the
# anchor in ../shared/anchors, or WIREGUARD_GO_MODERN=PATH; skipped when absent), and
# boringtun's own CLI (best of --threads 1/2/4), plain VXLAN and the raw underlay. iperf3 -P1, interleaved, medians of 3. Run by hand as
# root. Usage: wireguard.sh [SECONDS]; BENCH_VERBOSE=1 prints each run's TCP retransmits,
# BENCH_QUICK=1 runs only netagent's encrypted and plain networks (while tuning).
# Last line: encrypted_gbps=.. wireguard_go_gbps=.. boringtun_gbps=.. vxlan_gbps=..
#            underlay_gbps=.. vs_wireguard_go=.. vs_boringtun=..
#            [wireguard_go_modern_gbps=.. vs_wireguard_go_modern=..]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
scripts/deps.sh
for p in wireguard-go wireguard-tools; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
tools=$(target_dir)/bench-tools
[ -x "$tools/bin/boringtun-cli" ] || cargo install --quiet --locked boringtun-cli --root "$tools" >&2
cargo build --release --workspace --bins >&2
modern=${WIREGUARD_GO_MODERN:-../shared/anchors/wireguard-go-modern}
[ -x "$modern" ] || { echo "no modern wireguard-go at $modern: that column is skipped" >&2; modern=; }
bin_dir=$(release_dir)
exec "$bin_dir/netagent-testbed" bench-wireguard "${1:-5}" "$tools/bin/boringtun-cli" ${modern:+"$(realpath "$modern")"}
