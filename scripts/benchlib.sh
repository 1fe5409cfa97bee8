# benchlib.sh: the namespaces the benchmark scripts (bench.sh, bench-scale.sh,
# bench-gate.sh) measure in, built one way. Source it after setting NATURAL
# and SNAT_TO; each function appends what it creates to the caller's NSLIST
# array, which the caller's exit trap deletes. Only documentation ranges:
# 192.0.2.0/24 links host and far side, 203.0.113.x are the far servers.
# shellcheck shell=bash

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
