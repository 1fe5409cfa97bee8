#!/usr/bin/env bash
# bench-pools.sh: issue 24's rows of make bench, on the wire. For each
# backend (iptables-nft, iptables-legacy, the nftables one) it measures:
#
#  1. the spread of a pool (--to 2001:db8:1::/64): how many distinct
#     sources the far side saw over N connections from the host's own
#     traffic to 8 far addresses, for each stickiness (connection,
#     destination, sender);
#  2. the accuracy of weights: 4,000 connections over --to
#     192.0.2.22=3,192.0.2.23=1 --spread, each address's share against
#     3/4 and 1/4 (the issue's goal: within ±2%);
#  3. a port range running out: connections held open to one far address
#     and port through --to-ports 40000-40007, past the range, without
#     spill (one address: the ones past the range fail) and with it (a
#     rule of two addresses with spill: true followed by watch, which
#     spills the far port to the second address at 80% of the range).
#
# It writes its section of docs/BENCHMARKS.md between the pools markers
# (appended when there are none), leaving the rest of the file as it is.
# Everything runs in network namespaces it creates (esbp-PID-...) and
# deletes on exit; the root namespace is never touched. Only documentation
# ranges: 192.0.2.0/24 and 2001:db8::/64 link host and far side, the far
# servers are 203.0.113.1-4 and 2001:db8:ffff::1-8, the pool is
# 2001:db8:1::/64, routed to the host by the far side. A missed goal is
# reported, never an error; the script fails only when something does not
# work.
#
# Knobs (environment), defaults in brackets:
#   BENCH_BACKENDS     [nft legacy nftables]
#   BENCH_POOL_N       connections per stickiness [2000]
#   BENCH_WEIGHT_N     connections over the weighted list [4000]
#   BENCH_SPILL_N      connections held past a range of 8 ports [12]
#   BENCH_SPILL_GAP    pause between them, for watch's tick [1s]
#   BENCH_POOLS_OUT    report file [docs/BENCHMARKS.md]
set -euo pipefail
export LC_ALL=C
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/benchlib.sh
source "$ROOT/scripts/benchlib.sh"

BACKENDS=${BENCH_BACKENDS:-nft legacy nftables}
POOL_N=${BENCH_POOL_N:-2000}
WEIGHT_N=${BENCH_WEIGHT_N:-4000}
SPILL_PORTS=40000-40007
SPILL_N=${BENCH_SPILL_N:-12}
SPILL_GAP=${BENCH_SPILL_GAP:-1s}
OUT=${BENCH_POOLS_OUT:-$ROOT/docs/BENCHMARKS.md}
COMMIT=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)

POOL=2001:db8:1::/64
PORTS=7100-7103
V4_DSTS=203.0.113.1,203.0.113.2,203.0.113.3,203.0.113.4
V6_DSTS=2001:db8:ffff::1,2001:db8:ffff::2,2001:db8:ffff::3,2001:db8:ffff::4,2001:db8:ffff::5,2001:db8:ffff::6,2001:db8:ffff::7,2001:db8:ffff::8

say() { echo "bench-pools: $*" >&2; }
die() { echo "bench-pools: $*" >&2; exit 1; }

bench_preflight
bench_deps iptables-legacy=iptables nft=nftables jq=jq
for b in $BACKENDS; do
  if [[ $b == nftables ]]; then
    command -v nft >/dev/null || die "nft not found: install nftables for the nftables backend"
  fi
done
bench_start pools
# No run may read or write the machine's permanent file.
export EGRESS_SNAT_CONFIG=$WORK/no-permanent-file.yaml
START=$SECONDS

say "building egress-snat and benchconn"
go -C "$ROOT" build -o "$WORK/egress-snat" ./cmd/egress-snat
go -C "$ROOT" build -o "$WORK/benchconn" ./scripts/benchconn
mkdir -p "$WORK/res"

# pair H G: the host and the far side, joined by a veth, with both
# families; G holds the far servers on lo and routes the pool to H.
pair() {
  local h=$1 g=$2 i
  NSLIST+=("$h" "$g")
  ip netns add "$h"
  ip netns add "$g"
  for ns in "$h" "$g"; do
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
  done
  ip -n "$h" link add eth0 type veth peer name eth0 netns "$g"
  ip -n "$h" -batch - <<LAB
link set lo up
addr add 192.0.2.250/24 dev eth0
addr add 192.0.2.22/24 dev eth0
addr add 192.0.2.23/24 dev eth0
addr add 2001:db8::250/64 dev eth0 nodad
link set eth0 up
route add default via 192.0.2.1
LAB
  ip -n "$h" -6 route add default via 2001:db8::1 dev eth0
  {
    echo "link set lo up"
    echo "addr add 192.0.2.1/24 dev eth0"
    echo "addr add 2001:db8::1/64 dev eth0 nodad"
    echo "link set eth0 up"
    for i in 1 2 3 4; do echo "addr add 203.0.113.$i/32 dev lo"; done
    for i in 1 2 3 4 5 6 7 8; do echo "addr add 2001:db8:ffff::$i/128 dev lo"; done
  } | ip -n "$g" -batch -
  ip -n "$g" -6 route add "$POOL" via 2001:db8::250 dev eth0
  # Neighbours fixed, so that no first connection waits for a
  # resolution (IPv6's can lose a SYN and cost a second).
  local hmac gmac
  hmac=$(ip -n "$h" -j link show eth0 | jq -r '.[0].address')
  gmac=$(ip -n "$g" -j link show eth0 | jq -r '.[0].address')
  ip -n "$h" neigh replace 192.0.2.1 lladdr "$gmac" dev eth0 nud permanent
  ip -n "$h" neigh replace 2001:db8::1 lladdr "$gmac" dev eth0 nud permanent
  for i in 250 22 23; do ip -n "$g" neigh replace "192.0.2.$i" lladdr "$hmac" dev eth0 nud permanent; done
  ip -n "$g" neigh replace 2001:db8::250 lladdr "$hmac" dev eth0 nud permanent
}

# load H ARGS...: benchconn load from H, one JSON line; a connection that
# failed is counted in it (errors), not fatal.
load() {
  local h=$1
  shift
  ip netns exec "$h" "$WORK/benchconn" load -ports "$PORTS" -conc 2 -duration 300s "$@"
}

for b in $BACKENDS; do
  h=esbp-$$-h-$b g=esbp-$$-g-$b
  pair "$h" "$g"
  es=(ip netns exec "$h" "$WORK/egress-snat" --backend "$b")
  ip netns exec "$g" "$WORK/benchconn" serve -net tcp -ports "$PORTS" -max-time 30m >"$WORK/serve-$b.log" 2>&1 &
  PIDS+=($!)
  for i in $(seq 50); do
    grep -q ready "$WORK/serve-$b.log" && break
    ((i < 50)) || die "benchconn serve in $g did not start"
    sleep 0.1
  done

  for sticky in connection destination sender period; do
    "${es[@]}" clear >/dev/null
    "${es[@]}" set --to "$POOL" --sticky "$sticky" --dst 2001:db8:ffff::/48 >/dev/null
    load "$h" -net tcp6 -addrs "$V6_DSTS" -max "$POOL_N" >"$WORK/res/pool-$b-$sticky.json"
    say "$b pool per $sticky: $(jq -c '{conns, errors, distinct: (.seen | length)}' "$WORK/res/pool-$b-$sticky.json")"
    outside=$(jq -r '.seen | keys | map(select(startswith("2001:db8:1:") | not)) | join(" ")' "$WORK/res/pool-$b-$sticky.json")
    [[ -z $outside ]] || die "$b pool per $sticky: the far side saw sources outside $POOL: $outside"
  done
  # Per period: a rotate starts another period, from another address.
  "${es[@]}" rotate --pool "$POOL" >/dev/null
  load "$h" -net tcp6 -addrs "$V6_DSTS" -max "$POOL_N" >"$WORK/res/pool-$b-period-rotated.json"
  say "$b pool per period, rotated: $(jq -c '{conns, errors, seen}' "$WORK/res/pool-$b-period-rotated.json")"

  "${es[@]}" clear >/dev/null
  "${es[@]}" set --to 192.0.2.22=3,192.0.2.23=1 --spread --dst 203.0.113.0/28 >/dev/null
  load "$h" -net tcp4 -addrs "$V4_DSTS" -max "$WEIGHT_N" >"$WORK/res/weight-$b.json"
  say "$b weights: $(jq -c '{conns, errors, seen}' "$WORK/res/weight-$b.json")"
  # A small port range runs out: held connections to one far address and
  # port, past the range.
  "${es[@]}" clear >/dev/null
  "${es[@]}" set --to 192.0.2.22 --dst 203.0.113.1 --to-ports "$SPILL_PORTS" >/dev/null
  ip netns exec "$h" "$WORK/benchconn" hold -addr 203.0.113.1:7100 -n "$SPILL_N" -gap "$SPILL_GAP" >"$WORK/res/ports-$b.json"
  say "$b --to-ports $SPILL_PORTS: $(jq -c '{tried, connected, failed, seen}' "$WORK/res/ports-$b.json")"
  # With spill, under watch: the rest leave from .23. Another far
  # address, whose ports the closed connections above do not hold.
  "${es[@]}" clear >/dev/null
  printf 'rules:\n  - to: [192.0.2.22, 192.0.2.23]\n    dst: [203.0.113.2]\n    to-ports: %s\n    spill: true\n' "$SPILL_PORTS" >"$WORK/spill-$b.yaml"
  ip netns exec "$h" "$WORK/egress-snat" --backend "$b" watch -f "$WORK/spill-$b.yaml" --log-format json >"$WORK/watch-$b.log" 2>&1 &
  watch_pid=$!
  PIDS+=("$watch_pid")
  for i in $(seq 50); do
    "${es[@]}" check -f "$WORK/spill-$b.yaml" >/dev/null 2>&1 && break
    ((i < 50)) || die "watch in $h did not apply $WORK/spill-$b.yaml: $(cat "$WORK/watch-$b.log")"
    sleep 0.1
  done
  ip netns exec "$h" "$WORK/benchconn" hold -addr 203.0.113.2:7100 -n "$SPILL_N" -gap "$SPILL_GAP" >"$WORK/res/spill-$b.json"
  say "$b --to-ports $SPILL_PORTS with spill: $(jq -c '{tried, connected, failed, seen}' "$WORK/res/spill-$b.json")"
  grep -c '"msg":"spill started"' "$WORK/watch-$b.log" >"$WORK/res/spill-$b.started" || true
  kill "$watch_pid"
  wait "$watch_pid" || true
  "${es[@]}" clear >/dev/null
  bench_stop
done
TOTAL=$((SECONDS - START))

section() {
  local b s f
  echo "<!-- pools:begin (written by scripts/bench-pools.sh; do not edit by hand) -->"
  echo "## Pools and weights (issue 24)"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, $TOTAL s in all, $(nproc) CPUs, kernel $(uname -r)."
  echo
  echo "### Spread of a pool's sources"
  echo
  echo "\`set --to $POOL --sticky S --dst 2001:db8:ffff::/48\`, then $POOL_N connections from the"
  echo "host's own traffic (one sender) to 8 far addresses, 4 ports each, in turn. Distinct: the"
  echo "sources the far side saw, all inside the pool. Per destination, at most one source per"
  echo "far address (8); per sender, one in all. Per connection, the nftables backend gives"
  echo "every connection its own address (numgen); the iptables backends take 16 slices of the"
  echo "pool by turns (backend/iptables/pool.go: the kernel hashes only a connection's addresses"
  echo "into an SNAT range), 16 addresses per destination at most. Here the 16 turns and the 8"
  echo "destinations, both taken in order, line up, so each destination meets only some slices."
  echo "Per period, one source in all; after \`rotate --pool $POOL\`, another one."
  echo
  echo "| backend | sticky | connections | failed | distinct sources | most connections on one source |"
  echo "|---|---|---:|---:|---:|---:|"
  for b in $BACKENDS; do
    for s in connection destination sender period period-rotated; do
      f=$WORK/res/pool-$b-$s.json
      printf '| %s | %s | %s | %s | %s | %s |\n' "$b" "$s" "$(jq .conns "$f")" "$(jq .errors "$f")" \
        "$(jq '.seen | length' "$f")" "$(jq '[.seen[]] | max' "$f")"
    done
  done
  echo
  echo "### Weight accuracy"
  echo
  echo "\`set --to 192.0.2.22=3,192.0.2.23=1 --spread --dst 203.0.113.0/28\`, then $WEIGHT_N"
  echo "connections to 203.0.113.1-4. Goal: each address within ±2% of its share (3/4, 1/4)."
  echo
  echo "| backend | connections | failed | on .22 | on .23 | .22 off its share | .23 off its share | goal |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|"
  for b in $BACKENDS; do
    f=$WORK/res/weight-$b.json
    jq -r --arg b "$b" '
      def off(n; share): if .conns == 0 then 0 else ((n - .conns * share) / (.conns * share) * 100) end;
      (.seen["192.0.2.22"] // 0) as $a | (.seen["192.0.2.23"] // 0) as $c
      | off($a; 0.75) as $oa | off($c; 0.25) as $oc
      | "| \($b) | \(.conns) | \(.errors) | \($a) | \($c) | \($oa * 100 | round / 100)% | \($oc * 100 | round / 100)% | "
        + (if ($oa | fabs) <= 2 and ($oc | fabs) <= 2 and .conns > 0 and ($a + $c) == .conns then "met" else "MISSED" end) + " |"' "$f"
  done
  echo
  echo "### Source ports running out"
  echo
  echo "Without spill: \`set --to 192.0.2.22 --dst 203.0.113.1 --to-ports $SPILL_PORTS\` (8 ports),"
  echo "then $SPILL_N connections to 203.0.113.1:7100, one every $SPILL_GAP, each held open: the kernel"
  echo "needs a free source port per address, destination, destination port and protocol. With"
  echo "spill: \`watch -f\` a rule \`to: [192.0.2.22, 192.0.2.23]\`, \`dst: [203.0.113.2]\`,"
  echo "\`to-ports: $SPILL_PORTS\`, \`spill: true\`, and the same connections to 203.0.113.2:7100: once"
  echo "7 of the 8 ports (80%) are in use, watch spills the far port to .23. Spills: the spill"
  echo "starts watch logged."
  echo
  echo "| backend | spill | tried | connected | failed | sources | spills |"
  echo "|---|---|---:|---:|---:|---|---:|"
  for b in $BACKENDS; do
    for kind in ports spill; do
      f=$WORK/res/$kind-$b.json
      spills=-
      with=without
      if [[ $kind == spill ]]; then
        with=with
        spills=$(cat "$WORK/res/spill-$b.started")
      fi
      printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$b" "$with" "$(jq .tried "$f")" "$(jq .connected "$f")" "$(jq .failed "$f")" \
        "$(jq -r '.seen | to_entries | map("\(.key): \(.value)") | join(", ")' "$f")" "$spills"
    done
  done
  echo
  echo "Reproduce: \`bash scripts/bench-pools.sh\` (part of \`make bench\`; knobs BENCH_BACKENDS,"
  echo "BENCH_POOL_N, BENCH_WEIGHT_N, BENCH_SPILL_N, BENCH_SPILL_GAP). This run: BACKENDS=\"$BACKENDS\","
  echo "POOL_N=$POOL_N, WEIGHT_N=$WEIGHT_N, SPILL_N=$SPILL_N, SPILL_GAP=$SPILL_GAP."
  echo "<!-- pools:end -->"
}
section >"$WORK/section.md"

mkdir -p "$(dirname "$OUT")"
if [[ -f $OUT ]] && grep -q '<!-- pools:begin' "$OUT"; then
  awk -v sec="$WORK/section.md" '/<!-- pools:begin/ { while ((getline l < sec) > 0) print l; skip = 1; next }
    /<!-- pools:end -->/ { skip = 0; next } !skip' "$OUT" >"$WORK/out.md"
else
  { [[ -f $OUT ]] && cat "$OUT" && echo; cat "$WORK/section.md"; } >"$WORK/out.md"
fi
cp "$WORK/out.md" "$OUT"
say "wrote $OUT in $TOTAL s"
