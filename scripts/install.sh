#!/usr/bin/env bash
# Installs netagent on this host: the binary, the systemd unit and a commented
# default config (kept if one exists). Run from a checkout, as root:
#   sudo scripts/install.sh && sudo systemctl enable --now netagent-plugin.socket netagent
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root: sudo $0" >&2; exit 1; }
scripts/deps.sh
cargo build --release -p netagent
bin_dir=$(release_dir)
install -m 0755 "$bin_dir/netagent" /usr/local/bin/netagent
install -m 0644 scripts/netagent.service /etc/systemd/system/netagent.service
install -m 0644 scripts/netagent-plugin.socket /etc/systemd/system/netagent-plugin.socket
install -d -m 0755 /etc/netagent
if [ ! -e /etc/netagent/netagent.toml ]; then
  cat > /etc/netagent/netagent.toml <<'CONF'
# netagent configuration. Every key is optional; shown with its default.

# This host's name in the cluster (default: the hostname).
# node = "host1"

# This host's address toward its peers: VXLAN packets leave and arrive here
# (default: the source address of the route to the outside world).
# underlay_address = "192.0.2.11"

# state_dir = "/var/lib/netagent"
# api_socket = "/run/netagent/netagent.sock"

# The cluster store. Without [store] etcd, the agent keeps a local store in
# state_dir: a single host, no other setup.
# [store]
# etcd = ["https://192.0.2.2:2379"]   # every endpoint https:// (or all http://: plaintext, warned)
# ca_file = "/etc/netagent/etcd-ca.pem"              # CA of etcd's server certificate (PEM)
# cert_file = "/etc/netagent/etcd-client.pem"        # this host's client certificate (PEM)
# key_file = "/etc/netagent/etcd-client-key.pem"     # its private key, chmod 600
# username = "netagent"                              # etcd's own auth, if enabled
# password_file = "/etc/netagent/etcd-password"      # the password on one line, chmod 600
# lease_ttl_secs = 5        # a dead host leaves every answer after this long

# [dns]
# ttl_secs = 5
# upstream = ["192.0.2.53"]  # default: the nameservers of /etc/resolv.conf

# Encrypted networks' WireGuard mesh.
# [mesh]
# listen_port = 51820
# tunnel_offload = true  # whole TCP bursts through the mesh device (Linux 6.17+)

# Docker: `docker network create -d netagent --ipam-driver netagent`, and
# containers with the label netagent.network=NAME join that network.
# [docker]
# enabled = true
# socket = "/var/run/docker.sock"
# plugin_socket = "/run/docker/plugins/netagent.sock"  # "" turns the driver off
CONF
  echo "wrote /etc/netagent/netagent.toml (defaults; edit [store] for a multi-host cluster)"
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "installed; start with: systemctl enable --now netagent-plugin.socket netagent"
else
  echo "installed; systemd is not running here: start with: netagent agent --config /etc/netagent/netagent.toml"
fi
