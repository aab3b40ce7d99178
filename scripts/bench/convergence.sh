#!/usr/bin/env bash
# Control-plane benchmark on the test bed (etcd + 3 hosts, an agent each):
#   convergence  attach returning on host 2 -> the name resolving on host 1 (p50/p99)
#   detection    host 3 killed and cut off -> its endpoint leaves host 1's answers
#   memory       agent RSS with 1,000 endpoints across the 3 hosts
# Usage: sudo scripts/bench/convergence.sh [ATTACHES]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
prepare_test_bed
bin_dir=$(release_dir)
exec "$bin_dir/netagent-testbed" bench-convergence "${1:-100}"
