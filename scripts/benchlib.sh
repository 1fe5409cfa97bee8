# benchlib.sh: what the benchmark scripts (bench.sh, bench-scale.sh,
# bench-gate.sh, bench-idle.sh) share: their preamble (the checks before
# anything runs, the work directory, the exit trap that cleans up) and the
# namespaces they measure in, built one way.
#
# Source it after setting ROOT (the repository); the caller defines say and
# die (each script its own prefix and exit status). bench_host and
# bench_pair need NATURAL and SNAT_TO, and append what they create to
# NSLIST, which the exit trap deletes. Only documentation ranges:
# 192.0.2.0/24 links host and far side, 203.0.113.x are the far servers.
# shellcheck shell=bash

# bench_preflight: every benchmark needs root (it creates network
# namespaces) and Go (it builds what it measures).
bench_preflight() {
  [[ $(id -u) -eq 0 ]] || die "run as root: it creates network namespaces"
  command -v go >/dev/null || die "go not found (install Go into /usr/local/go)"
}

# bench_deps [CMD=PACKAGE...]: installs, with apt-get and only when missing,
# the commands of the demo (iptables, ipset, ip) and those named
# (scripts/lab.sh deps).
bench_deps() {
  bash "$ROOT/scripts/lab.sh" deps "$@" >&2
}

# bench_start NAME: makes WORK, a directory of this run
# (/tmp/egress-snat-NAME.XXXXXX), empties PIDS and NSLIST, and sets the exit
# trap (bench_cleanup). An interrupt exits 130 through the trap.
bench_start() {
  WORK=$(mktemp -d "/tmp/egress-snat-$1.XXXXXX")
  PIDS=()
  NSLIST=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

# bench_cleanup, the exit trap: stops the processes in PIDS and waits for
# them, deletes the namespaces in NSLIST and WORK, then calls the caller's
# bench_on_exit STATUS if it defines one, and exits with the script's
# status. It runs on every exit, so nothing is left behind on failure.
bench_cleanup() {
  local rc=$? pid ns
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "${NSLIST[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
  if declare -F bench_on_exit >/dev/null; then bench_on_exit "$rc" || true; fi
  exit "$rc"
}

# bench_stop: stops PIDS and deletes NSLIST now, as the trap would, for a
# script that goes on after them. A namespace that would not go stays in
# NSLIST for the trap.
bench_stop() {
  local pid ns left=()
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
  for ns in "${NSLIST[@]}"; do ip netns del "$ns" 2>/dev/null || left+=("$ns"); done
  NSLIST=("${left[@]}")
}

# bench_host NS: a host alone. Its eth0 is a veth whose peer stays in the
# namespace: no traffic flows; egress-snat only needs the route and the
# addresses.
bench_host() {
  local ns=$1
  NSLIST+=("$ns")
  ip netns add "$ns"
  ip -n "$ns" -batch - <<LAB
link set lo up
link add eth0 type veth peer name peer0
link set peer0 up
addr add $NATURAL/24 dev eth0
addr add $SNAT_TO/24 dev eth0
link set eth0 up
route add default via 192.0.2.1
LAB
}

# bench_pair H G SERVERS: a host and its far side, joined by a veth; the
# far side holds 203.0.113.1 to 203.0.113.SERVERS on lo.
bench_pair() {
  local h=$1 g=$2 servers=$3 i
  NSLIST+=("$h" "$g")
  ip netns add "$h"
  ip netns add "$g"
  ip -n "$h" link add eth0 type veth peer name eth0 netns "$g"
  ip -n "$h" -batch - <<LAB
link set lo up
addr add $NATURAL/24 dev eth0
addr add $SNAT_TO/24 dev eth0
link set eth0 up
route add default via 192.0.2.1
LAB
  {
    echo "link set lo up"
    echo "addr add 192.0.2.1/24 dev eth0"
    echo "link set eth0 up"
    for ((i = 1; i <= servers; i++)); do echo "addr add 203.0.113.$i/32 dev lo"; done
  } | ip -n "$g" -batch -
}
