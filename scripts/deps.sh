#!/usr/bin/env bash
# Installs, idempotently, the Debian packages netagent's build, tests, demo and
# benchmarks use. Needs root; does nothing when everything is present.
set -euo pipefail
# protobuf-compiler: etcd-client generates its gRPC code at build time.
packages=(iproute2 nftables iputils-ping busybox-static iperf3 dnsutils procps
  protobuf-compiler etcd-server etcd-client)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup or Debian's cargo)" >&2; exit 1; }
