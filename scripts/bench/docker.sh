#!/usr/bin/env bash
# netagent as Docker's network driver, on the test bed (etcd + 2 hosts, a dockerd and
# an agent each; `docker network create -d netagent --ipam-driver netagent` on host 1):
#   start latency  `docker run -d` on the netagent network, a Docker bridge network and
#                  --network none, interleaved (p50/p99/mean; goal <= 1.2 x bridge)
#   resolvable     `docker run -d` on host 1 returned -> the name answers at 127.0.0.11
#                  inside a container on host 2 (p50/p99; goal p99 <= 100 ms)
# Usage: sudo scripts/bench/docker.sh [CONTAINERS]   (per kind, default 50)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
prepare_test_bed
bin_dir=$(release_dir)
# Engines' data roots, etcd's data and the agents' state in memory: this one disk also
# carries builds, and waiting on it would measure the disk, not the network driver.
export TMPDIR=/dev/shm
exec "$bin_dir/netagent-testbed" bench-docker "${1:-50}"
