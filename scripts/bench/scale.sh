#!/usr/bin/env bash
# Scale benchmark on the test bed: HOSTS agents (one per host namespace) against one
# etcd, 10 endpoints on each host:
#   start        every agent up and ok
#   convergence  every host sees every endpoint and peer after the last attach
#   spread       an attach on one host -> the name resolves on every host (p50/p99)
#   etcd restart every agent back to ok, and the requests the restart caused
#   footprint    each agent's resident memory and idle CPU
# Usage: sudo scripts/bench/scale.sh [HOSTS] [--agent-bin PATH]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
prepare_test_bed
bin_dir=$(release_dir)
# etcd's data and the agents' state in memory: this one disk also carries builds, and
# etcd waiting seconds on fsync would measure the disk, not the agents.
export TMPDIR=/dev/shm
# A hundred agents with their DNS keepers and a thousand namespaces' sockets.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec "$bin_dir/netagent-testbed" bench-scale "${1:-100}" "${@:2}"
