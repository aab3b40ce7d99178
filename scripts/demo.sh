#!/usr/bin/env bash
# The demo: a three-host mesh on this one machine (hosts are network namespaces),
# an agent per host, app containers attached across hosts. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
prepare_test_bed
bin_dir=$(release_dir)
exec "$bin_dir/netagent-testbed" demo
