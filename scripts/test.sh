#!/usr/bin/env bash
# The test command: installs what the tests need, builds, runs every test.
# As root, the namespace tests run; under CI=true a missing privilege fails them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then scripts/deps.sh; fi
cargo build --release --workspace --bins
cargo test --release --workspace
