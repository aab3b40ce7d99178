#!/usr/bin/env bash
# DNS benchmark, one run, same machine, same query mix (a 3-replica service name and
# a single container name): netagent's server, dnsmasq serving the same names from a
# hosts file, and Docker's embedded DNS (127.0.0.11 inside a container on a
# user-defined network) when a Docker engine can be started. Run by hand as root.
# Usage: dns.sh [SECONDS]   Last line: key=value figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
secs=${1:-5}
scripts/deps.sh
for p in dnsperf dnsmasq-base; do
  dpkg-query -W -f='${Status}' $p 2>/dev/null | grep -q "ok installed" || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $p >/dev/null
done
cargo build --release --workspace --bins >&2
bin_dir=$(release_dir)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "${DOCKER_HOST:-}" ]; then
    docker rm -f nabench-db nabench-e1 nabench-e2 nabench-e3 >/dev/null 2>&1 || true
    docker network rm nabench >/dev/null 2>&1 || true
    [ -n "${dockerd_pid:-}" ] && kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
printf 'echo_api A\ndb A\n' > "$work/queries"

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# run_dnsperf NAME SERVER PORT PID [nsenter-prefix...]: prints NAME_qps= ... fields
run_dnsperf() {
  local name=$1 server=$2 port=$3 pid=$4; shift 4
  local t0 t1 out qps avg lost completed hz cpu_us
  hz=$(getconf CLK_TCK)
  t0=$(cpu_ticks "$pid")
  out=$("$@" dnsperf -s "$server" -p "$port" -d "$work/queries" -l "$secs" -c 4 -Q 1000000 2>&1)
  t1=$(cpu_ticks "$pid")
  qps=$(echo "$out" | awk '/Queries per second/ {print $4}')
  avg=$(echo "$out" | awk '/Average Latency/ {print $4}')
  lost=$(echo "$out" | awk '/Queries lost/ {print $3}')
  completed=$(echo "$out" | awk '/Queries completed/ {print $3}')
  cpu_us=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v q="$completed" 'BEGIN { if (q > 0) printf "%.1f", d / hz * 1e6 / q; else print "NA" }')
  echo "$name: ${qps} q/s, avg latency ${avg} s, lost ${lost}, server CPU ${cpu_us} us/query" >&2
  echo "${name}_qps=${qps%.*} ${name}_avg_ms=$(awk -v a="$avg" 'BEGIN{printf "%.3f", a*1000}') ${name}_lost=${lost} ${name}_cpu_us=${cpu_us}"
}

# netagent
"$bin_dir/netagent-testbed" dns-serve 127.0.0.1:5301 > "$work/na.log" 2>&1 &
na=$!; pids+=("$na"); sleep 0.5
# dnsmasq, same names from a hosts file
cat > "$work/hosts" <<H
100.64.1.11 db
100.64.2.10 echo_api
100.64.2.11 echo_api
100.64.3.12 echo_api
H
dnsmasq -k --no-resolv --no-hosts --addn-hosts="$work/hosts" --listen-address=127.0.0.1 \
  --bind-interfaces -p 5302 --cache-size=1000 --pid-file="$work/dnsmasq.pid" -u root 2>"$work/dnsmasq.log" &
dm=$!; pids+=("$dm"); sleep 0.5

# Docker's embedded DNS: own dockerd, scratch image with static busybox.
have_docker=0
cpid=
if command -v dockerd >/dev/null && [ -x /bin/busybox ]; then
  export DOCKER_HOST=unix://$work/docker.sock
  dockerd --data-root "$work/docker" --exec-root "$work/docker-exec" --pidfile "$work/docker.pid" \
    -H "$DOCKER_HOST" --bridge=none > "$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 50); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
  if docker info >/dev/null 2>&1; then
    mkdir -p "$work/img" && cp /bin/busybox "$work/img/busybox"
    printf 'FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox"]\n' > "$work/img/Dockerfile"
    docker build -q -t nabench-busybox "$work/img" >/dev/null
    docker network create nabench >/dev/null
    docker run -d --name nabench-db --network nabench --network-alias db nabench-busybox sleep 3600 >/dev/null
    for i in 1 2 3; do
      docker run -d --name nabench-e$i --network nabench --network-alias echo_api nabench-busybox sleep 3600 >/dev/null
    done
    cpid=$(docker inspect -f '{{.State.Pid}}' nabench-db)
    have_docker=1
  else
    echo "docker: engine did not start (see $work/dockerd.log); skipped" >&2
  fi
fi

# Servers interleaved, three rounds, medians: the machine's drift hits all alike.
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
declare -A all
names=(netagent dnsmasq)
[ "$have_docker" = 1 ] && names+=(docker)
for round in 1 2 3; do
  for name in "${names[@]}"; do
    case $name in
      netagent) fig=$(run_dnsperf netagent 127.0.0.1 5301 "$na" env) ;;
      dnsmasq) fig=$(run_dnsperf dnsmasq 127.0.0.1 5302 "$dm" env) ;;
      docker) fig=$(run_dnsperf docker 127.0.0.11 53 "$dockerd_pid" nsenter -n -t "$cpid") ;;
    esac
    for kv in $fig; do all[${kv%%=*}]+="${kv#*=} "; done
  done
done
# Latency at a fixed, moderate rate (the same 20,000 q/s for every server), from
# dnsperf's per-query report: average and p99.
latency() {
  local name=$1 server=$2 port=$3; shift 3
  "$@" dnsperf -s "$server" -p "$port" -d "$work/queries" -l 3 -Q 20000 -c 4 -v 2>/dev/null \
    | awk '/^> / {print $NF}' | sort -n \
    | awk -v n="$name" '{v[NR]=$1; s+=$1} END {if (NR) printf "%s_lat_avg_ms=%.3f %s_p99_ms=%.3f\n", n, s/NR*1000, n, v[int(NR*0.99)]*1000}'
}
for name in "${names[@]}"; do
  case $name in
    netagent) fig=$(latency netagent 127.0.0.1 5301 env) ;;
    dnsmasq) fig=$(latency dnsmasq 127.0.0.1 5302 env) ;;
    docker) fig=$(latency docker 127.0.0.11 53 nsenter -n -t "$cpid") ;;
  esac
  echo "$name at 20k q/s: $fig" >&2
  for kv in $fig; do all[${kv%%=*}]+="${kv#*=} "; done
done
results=()
for key in "${!all[@]}"; do results+=("$key=$(echo ${all[$key]} | tr ' ' '\n' | median)"); done
docker_fig=""
[ "$have_docker" = 1 ] || docker_fig="docker_qps=NA"
line="${results[*]} $docker_fig"
get() { echo "$line" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'; }
ratio() { awk -v a="$(get "$1")" -v b="$(get "$2")" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "NA" }'; }
line=$(echo "$line" | tr ' ' '\n' | sort | tr '\n' ' ')
echo "$line vs_dnsmasq=$(ratio netagent_qps dnsmasq_qps) vs_docker=$(ratio netagent_qps docker_qps)" | tr -s ' '
