#!/usr/bin/env bash
# Installs, idempotently, the Debian packages netagent's build, tests, demo and
# benchmarks use. Needs root; does nothing when everything is present.
set -euo pipefail
# protobuf-compiler and libprotobuf-dev (the well-known .proto files, only a
# Recommends of the compiler): etcd-client generates its gRPC code at build time.
# docker.io (dockerd, containerd, runc) and iptables: the Docker tests start their
# own engines, where docker-compose (1.29) runs examples/; util-linux has nsenter;
# openssl makes the test etcd's certificates.
# prometheus (with promtool) scrapes the agent's metrics, chromium renders its live
# page headless, wireguard-tools' `wg show` reads the mesh; curl asks the HTTP endpoint.
packages=(iproute2 nftables iptables iputils-ping busybox-static iperf3 dnsutils procps tcpdump
  util-linux protobuf-compiler libprotobuf-dev etcd-server etcd-client docker.io docker-compose openssl
  prometheus chromium wireguard-tools curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Installed, not started: the tests start the daemons they need themselves.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup or Debian's cargo)" >&2; exit 1; }
