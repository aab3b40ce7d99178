#!/usr/bin/env bash
# DNS benchmark, one run, same machine, same query mix (a 3-replica service name and
# a single container name), servers interleaved over three rounds (medians):
#   agent    a running `netagent agent` with 200 attached namespaces, queried at
#            127.0.0.11 from inside attached namespaces, as containers query it
#   dnsmasq  the same names from a hosts file
#   docker   Docker's embedded DNS, 127.0.0.11 inside containers on a user-defined
#            network, when a Docker engine can be started
#   library  netagent's DNS server alone in a process (`netagent-testbed dns-serve`)
# Each is loaded by one client (dnsperf -c 4) and by 10 clients at once (ten dnsperf,
# for the agent each in a namespace of its own), then held at a fixed 20,000 q/s for
# latency. Server CPU per query is the server process's CPU time over its answers.
# Then the agent alone: resident memory and CPU with the 200 namespaces idle.
# Usage: sudo scripts/bench/dns.sh [SECONDS]   Last line: key=value figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
secs=${1:-5}
namespaces=200
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
  # Closing the test bed's standard input ends it; it removes its namespaces.
  [ -n "${bed_in:-}" ] && exec {bed_in}>&- || true
  [ -n "${bed_pid:-}" ] && wait "$bed_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
printf 'echo_api A\ndb A\n' > "$work/queries"

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# load NAME CLIENTS PID SERVER PORT PREFIX...: dnsperf from CLIENTS prefixes at once
# (one per client; a prefix is a command such as "ip netns exec NS", or "env"),
# together at most 1,000,000 q/s. Prints NAME_qps= NAME_lost= NAME_cpu_us=.
load() {
  local name=$1 clients=$2 pid=$3 server=$4 port=$5; shift 5
  local hz t0 t1 i c qps=0 lost=0 done=0 cpu_us out
  local -a run=() prefixes=("$@")
  hz=$(getconf CLK_TCK)
  c=$(( clients == 1 ? 4 : 1 ))
  t0=$(cpu_ticks "$pid")
  for ((i = 0; i < clients; i++)); do
    ${prefixes[$i]} dnsperf -s "$server" -p "$port" -d "$work/queries" -l "$secs" -c "$c" \
      -Q $((1000000 / clients)) > "$work/out.$i" 2>&1 &
    run+=($!)
  done
  wait "${run[@]}"
  t1=$(cpu_ticks "$pid")
  for ((i = 0; i < clients; i++)); do
    out=$(cat "$work/out.$i")
    qps=$(awk -v a="$qps" -v b="$(echo "$out" | awk '/Queries per second/ {print $4}')" 'BEGIN {printf "%.0f", a + b}')
    lost=$((lost + $(echo "$out" | awk '/Queries lost/ {print $3}')))
    done=$((done + $(echo "$out" | awk '/Queries completed/ {print $3}')))
  done
  cpu_us=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v q="$done" 'BEGIN { if (q > 0) printf "%.1f", d / hz * 1e6 / q; else print "NA" }')
  echo "$name: $qps q/s, lost $lost, server CPU $cpu_us us/query" >&2
  echo "${name}_qps=$qps ${name}_lost=$lost ${name}_cpu_us=$cpu_us"
}

# latency NAME SERVER PORT PREFIX: average and p99 at a fixed 20,000 q/s, from
# dnsperf's per-query report.
latency() {
  local name=$1 server=$2 port=$3 prefix=$4
  $prefix dnsperf -s "$server" -p "$port" -d "$work/queries" -l 3 -Q 20000 -c 4 -v 2>/dev/null \
    | awk '/^> / {print $NF}' | sort -n \
    | awk -v n="$name" '{v[NR]=$1; s+=$1} END {if (NR) printf "%s_lat_avg_ms=%.3f %s_p99_ms=%.3f\n", n, s/NR*1000, n, v[int(NR*0.99)]*1000}'
}

# The agent, with its namespaces, on the test bed; it runs until bed_in closes.
exec {bed_in}> >(exec "$bin_dir/netagent-testbed" dns-agent "$namespaces" > "$work/bed.out" 2> "$work/bed.log")
bed_pid=$!
for _ in $(seq 300); do grep -q '^ready' "$work/bed.out" 2>/dev/null && break; sleep 0.5; done
grep -q '^ready' "$work/bed.out" || { echo "the test bed did not come up:" >&2; tail -20 "$work/bed.log" >&2; exit 1; }
agent=$(sed -n 's/^ready agent_pid=\([0-9]*\) .*/\1/p' "$work/bed.out")
IFS=, read -r -a agent_ns <<< "$(sed -n 's/.* clients=//p' "$work/bed.out")"
agent_prefixes=()
for i in $(seq 0 9); do agent_prefixes+=("ip netns exec ${agent_ns[$i]}"); done

# The library alone.
"$bin_dir/netagent-testbed" dns-serve 127.0.0.1:5301 > "$work/na.log" 2>&1 {bed_in}>&- &
lib=$!; pids+=("$lib")
# dnsmasq, same names from a hosts file.
cat > "$work/hosts" <<H
100.64.1.11 db
100.64.2.10 echo_api
100.64.2.11 echo_api
100.64.3.12 echo_api
H
dnsmasq -k --no-resolv --no-hosts --addn-hosts="$work/hosts" --listen-address=127.0.0.1 \
  --bind-interfaces -p 5302 --cache-size=1000 --pid-file="$work/dnsmasq.pid" -u root 2>"$work/dnsmasq.log" {bed_in}>&- &
dm=$!; pids+=("$dm"); sleep 0.5

# Docker's embedded DNS: own dockerd, scratch image with static busybox.
have_docker=0
docker_prefixes=()
if command -v dockerd >/dev/null && [ -x /bin/busybox ]; then
  export DOCKER_HOST=unix://$work/docker.sock
  dockerd --data-root "$work/docker" --exec-root "$work/docker-exec" --pidfile "$work/docker.pid" \
    -H "$DOCKER_HOST" --bridge=none > "$work/dockerd.log" 2>&1 {bed_in}>&- &
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
    for c in nabench-db nabench-e1 nabench-e2 nabench-e3; do
      docker_prefixes+=("nsenter -n -t $(docker inspect -f '{{.State.Pid}}' $c)")
    done
    # Ten clients over the four containers' namespaces.
    docker_prefixes+=("${docker_prefixes[@]}" "${docker_prefixes[0]}" "${docker_prefixes[1]}")
    have_docker=1
  else
    echo "docker: engine did not start (see $work/dockerd.log); skipped" >&2
  fi
fi

# Servers interleaved, three rounds, medians: the machine's drift hits all alike.
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
declare -A all
names=(agent dnsmasq library)
[ "$have_docker" = 1 ] && names+=(docker)
ten() { local p=$1; local -a v=(); for _ in $(seq 10); do v+=("$p"); done; printf '%s\n' "${v[@]}"; }
for round in 1 2 3; do
  for name in "${names[@]}"; do
    for clients in 1 10; do
      case $name in
        agent) fig=$(load "agent$clients" "$clients" "$agent" 127.0.0.11 53 "${agent_prefixes[@]}") ;;
        dnsmasq) mapfile -t p < <(ten env); fig=$(load "dnsmasq$clients" "$clients" "$dm" 127.0.0.1 5302 "${p[@]}") ;;
        library) mapfile -t p < <(ten env); fig=$(load "library$clients" "$clients" "$lib" 127.0.0.1 5301 "${p[@]}") ;;
        docker) fig=$(load "docker$clients" "$clients" "$dockerd_pid" 127.0.0.11 53 "${docker_prefixes[@]}") ;;
      esac
      for kv in $fig; do all[${kv%%=*}]+="${kv#*=} "; done
    done
  done
done
for name in "${names[@]}"; do
  case $name in
    agent) fig=$(latency agent 127.0.0.11 53 "${agent_prefixes[0]}") ;;
    dnsmasq) fig=$(latency dnsmasq 127.0.0.1 5302 env) ;;
    library) fig=$(latency library 127.0.0.1 5301 env) ;;
    docker) fig=$(latency docker 127.0.0.11 53 "${docker_prefixes[0]}") ;;
  esac
  echo "$name at 20k q/s: $fig" >&2
  for kv in $fig; do all[${kv%%=*}]+="${kv#*=} "; done
done

# The agent idle: 200 namespaces attached, no queries, no changes.
sleep 2
t0=$(cpu_ticks "$agent"); sleep 20; t1=$(cpu_ticks "$agent")
idle_pct=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", d / hz / 20 * 100}')
rss_mib=$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$agent/status")
echo "agent idle with $namespaces namespaces: ${idle_pct}% of a core, RSS ${rss_mib} MiB" >&2

results=()
for key in "${!all[@]}"; do results+=("$key=$(echo ${all[$key]} | tr ' ' '\n' | median)"); done
line="${results[*]} agent_idle_cpu_pct=$idle_pct agent_rss_mib=$rss_mib"
[ "$have_docker" = 1 ] || line+=" docker1_qps=NA docker10_qps=NA"
get() { echo "$line" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'; }
ratio() { awk -v a="$(get "$1")" -v b="$(get "$2")" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "NA" }'; }
line=$(echo "$line" | tr ' ' '\n' | sort | tr '\n' ' ')
echo "$line agent1_vs_dnsmasq=$(ratio agent1_qps dnsmasq1_qps) agent10_vs_dnsmasq=$(ratio agent10_qps dnsmasq10_qps) agent1_vs_docker=$(ratio agent1_qps docker1_qps) agent10_vs_docker=$(ratio agent10_qps docker10_qps)" | tr -s ' '
