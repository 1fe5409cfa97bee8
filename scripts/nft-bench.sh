#!/usr/bin/env bash
# nft-bench.sh: figures of the native nftables backend (backend/nft), each
# against its floor measured in the same run, in namespaces of its own:
#
#  1. a fresh table of N destinations (N in NFTB_N), written three ways:
#     from a slice of entries (Render), from the prefixes through one
#     reused entry (RenderSeq), and through google/nftables' own Conn
#     (-lib); beside `ipset restore` of the same members (the floor the
#     iptables backend stands on) and, up to NFTB_NFT_MAX, `nft -f` of the
#     same table (Program.Show). Wall time of the process, timed inside
#     the namespace, its peak RSS (GNU time), and the backend's own time
#     (render, plan, run);
#  2. one destination moved between two addresses' sets at NFTB_CHANGE_N:
#     in process (Patch+Run, Plan+Run, and Render+Plan+Run), and as a
#     one-shot process that reads the table without elements and runs the
#     change;
#  3. reading the table back: without elements, and whole;
#  4. the new-connection rate with NFTB_CONN_N destinations installed
#     against one (benchconn load, two host/far namespace pairs).
#
# Destinations: benchconn gen: N unique random /24../32 blocks in
# 10.0.0.0/8, and at a million 900,000 /32s and 100,000 /24s and /25s.
# Medians of NFTB_RUNS runs; every run is in $OUT/runs.tsv.
#
# Usage (root): bash scripts/nft-bench.sh [OUT_DIR]
# Knobs: NFTB_N [100 10000 100000 1000000]  NFTB_RUNS [3]
#        NFTB_CHANGE_N [100000 1000000]  NFTB_CONN_N [1000000]
#        NFTB_CONN_ROUNDS [5]  NFTB_CONN_SECS [2]  NFTB_NFT_MAX [100000]
set -euo pipefail
export LC_ALL=C
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
NATURAL=192.0.2.250
SNAT_TO=192.0.2.22
OTHER=192.0.2.23
SERVERS=203.0.113.1,203.0.113.2,203.0.113.3,203.0.113.4
PORTS=7100-7115
# shellcheck source=scripts/benchlib.sh
source "$ROOT/scripts/benchlib.sh"

NS_N=${NFTB_N:-100 10000 100000 1000000}
RUNS=${NFTB_RUNS:-3}
CHANGE_N=${NFTB_CHANGE_N:-100000 1000000}
CONN_N=${NFTB_CONN_N:-1000000}
CONN_ROUNDS=${NFTB_CONN_ROUNDS:-5}
CONN_SECS=${NFTB_CONN_SECS:-2}
NFT_MAX=${NFTB_NFT_MAX:-100000}

say() { echo "nft-bench: $*" >&2; }
die() { say "$*"; exit 1; }

# rec KIND N RUN WALL_S RSS_KB [key=value...]
rec() { echo "$*" | tr ' ' '\t' >>"$OUT/runs.tsv"; }
# timed KIND N RUN CMD...: wall time (taken here, inside the namespace),
# GNU time's peak RSS, and the command's own key=value line.
timed() {
  local kind=$1 n=$2 r=$3 line t0 t1 rss
  shift 3
  t0=$EPOCHREALTIME
  line=$(/usr/bin/time -f "rss %M" "$@" 2>"$WORK/time.err") || { cat "$WORK/time.err" >&2; die "$kind $n failed"; }
  t1=$EPOCHREALTIME
  rss=$(sed -n 's/^rss //p' "$WORK/time.err")
  rec "$kind" "$n" "$r" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')" "$rss" "$line"
}

# Inside the host namespace: bash nft-bench.sh __fresh WORK OUT
fresh_inner() {
  local n r
  for n in $NS_N; do
    if ((n <= NFT_MAX)); then "$WORK/nftbench" script -f "$WORK/dst-$n.txt" >"$WORK/script-$n.nft"; fi
    for ((r = 1; r <= RUNS; r++)); do
      timed own "$n" "$r" "$WORK/nftbench" apply -f "$WORK/dst-$n.txt"
      timed stream "$n" "$r" "$WORK/nftbench" apply -stream -f "$WORK/dst-$n.txt"
      timed lib "$n" "$r" "$WORK/nftbench" apply -stream -lib -f "$WORK/dst-$n.txt"
      nft delete table inet egress-snat
      timed floor "$n" "$r" ipset restore -f "$WORK/ipset-$n.txt"
      ipset destroy bench-floor
      if ((n <= NFT_MAX)); then
        timed nft "$n" "$r" nft -f "$WORK/script-$n.nft"
        nft delete table inet egress-snat
      fi
      say "N=$n run $r: $(grep -P "\t$n\t$r\t" "$OUT/runs.tsv" | awk -F'\t' '{ printf "%s %ss %dMB; ", $1, $4, $5 / 1024 }')"
    done
  done
}

# Inside the host namespace: bash nft-bench.sh __change WORK OUT
change_inner() {
  local n r line moved pair from to t0 t1
  for n in $CHANGE_N; do
    for ((r = 1; r <= RUNS; r++)); do
      line=$("$WORK/nftbench" change -rounds 5 -f "$WORK/dst-$n.txt")
      rec change "$n" "$r" - - "$line"
      moved=$(sed -E 's/.*moved=([^ ]+).*/\1/' <<<"$line")
      for pair in "$SNAT_TO $OTHER" "$OTHER $SNAT_TO"; do
        read -r from to <<<"$pair"
        t0=$EPOCHREALTIME
        line=$("$WORK/nftbench" oneshot -dst "$moved" -from "$from" -to "$to")
        t1=$EPOCHREALTIME
        rec oneshot "$n" "$r" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')" - "$line"
      done
      line=$("$WORK/nftbench" read)
      rec read "$n" "$r" - - "$line"
      say "N=$n run $r: $(grep -P "^(change|oneshot|read)\t$n\t$r\t" "$OUT/runs.tsv" | cut -f1,4,6- | tr '\n' ';')"
    done
  done
  nft delete table inet egress-snat 2>/dev/null || true
}

case ${1:-} in
__fresh | __change)
  WORK=$2 OUT=$3
  "${1#__}_inner"
  exit 0
  ;;
esac

OUT=${1:-$(mktemp -d /tmp/nft-bench.XXXXXX)}
mkdir -p "$OUT"
[[ $(id -u) -eq 0 ]] || die "run as root: it creates network namespaces"

TAG=nftb-$$
WORK=$(mktemp -d /tmp/nft-bench-work.XXXXXX)
NSLIST=()
PIDS=()
cleanup() {
  local rc=$? pid ns
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "${NSLIST[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "building nftbench and benchconn"
(cd "$ROOT" && go build -o "$WORK/nftbench" ./backend/nft/internal/nftbench && go build -o "$WORK/benchconn" ./scripts/benchconn)
for n in $NS_N $CHANGE_N; do
  [[ -f $WORK/dst-$n.txt ]] && continue
  if ((n >= 1000000)); then
    "$WORK/benchconn" gen -n "$n" -wide $((n / 10)) >"$WORK/dst-$n.txt"
  else
    "$WORK/benchconn" gen -n "$n" >"$WORK/dst-$n.txt"
  fi
  hs=1024
  while ((hs < n / 2)); do hs=$((hs * 2)); done
  {
    echo "create bench-floor hash:net family inet hashsize $hs maxelem $((2 * n > 65536 ? 2 * n : 65536))"
    sed 's/^/add bench-floor /' "$WORK/dst-$n.txt"
  } >"$WORK/ipset-$n.txt"
done

: >"$OUT/runs.tsv"
h=$TAG-h
bench_host "$h"
say "fresh tables in $h"
ip netns exec "$h" bash "$SELF" __fresh "$WORK" "$OUT"
say "one destination moved"
ip netns exec "$h" bash "$SELF" __change "$WORK" "$OUT"

say "connection rate: 1 destination against $CONN_N"
"$WORK/benchconn" gen -n "$CONN_N" -wide $((CONN_N / 10)) -last 203.0.113.0/28 >"$WORK/cdst.txt"
echo 203.0.113.0/28 >"$WORK/cdst-1.txt"
h0=$TAG-ch
g0=$TAG-cg
h1=$TAG-ch1
g1=$TAG-cg1
bench_pair "$h0" "$g0" 4
bench_pair "$h1" "$g1" 4
for far in "$g0" "$g1"; do
  ip netns exec "$far" "$WORK/benchconn" serve -ports "$PORTS" -max-time 30m >"$WORK/serve-$far.log" 2>&1 &
  PIDS+=($!)
done
ip netns exec "$h0" "$WORK/nftbench" apply -stream -f "$WORK/cdst.txt" -natural "$NATURAL" -to "$SNAT_TO" >/dev/null
ip netns exec "$h1" "$WORK/nftbench" apply -stream -f "$WORK/cdst-1.txt" -natural "$NATURAL" -to "$SNAT_TO" >/dev/null
for far in "$g0" "$g1"; do
  for _ in $(seq 50); do grep -q ready "$WORK/serve-$far.log" && break; sleep 0.1; done
done
for ((r = 1; r <= CONN_ROUNDS; r++)); do
  for setup in "1 $h1" "$CONN_N $h0"; do
    read -r n host <<<"$setup"
    ip netns exec "$host" conntrack -F >/dev/null 2>&1 || true
    json=$(ip netns exec "$host" "$WORK/benchconn" load -addrs "$SERVERS" -ports "$PORTS" -duration "${CONN_SECS}s" -conc 4 -want "$SNAT_TO") ||
      die "N=$n: load failed: $json"
    rate=$(sed -E 's/.*"rate":([0-9.e+]+).*/\1/' <<<"$json")
    rec conn "$n" "$r" - - "rate=$rate"
    say "round $r N=$n: $rate conn/s"
  done
done

# ---------------------------------------------------------------------------
# Summary: medians.
med() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "NA"; else print a[int((NR + 1) / 2)] }'; }
# col KIND N FIELD: the medians of a positional column (4 wall, 5 rss_kb)
col() { awk -F'\t' -v k="$1" -v n="$2" -v f="$3" '$1 == k && $2 == n { print $f }' "$OUT/runs.tsv" | med; }
# kv KIND N KEY: the median of a key=value figure
kv() { awk -F'\t' -v k="$1" -v n="$2" -v key="$3" '$1 == k && $2 == n { for (i = 6; i <= NF; i++) { split($i, p, "="); if (p[1] == key) print p[2] } }' "$OUT/runs.tsv" | med; }
{
  echo "## nft-bench, $(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg) at the end"
  echo
  echo "Medians of $RUNS runs. Times: process wall (GNU time); backend = Render+Plan+Run in the process; MB: peak RSS."
  echo
  echo "| N | ipset restore (floor) | nft -f | entries: wall / backend / MB | RenderSeq: wall / backend / MB | google/nftables Conn: wall / run / MB | RenderSeq wall ÷ ipset floor |"
  echo "|---|---|---|---|---|---|---|"
  for n in $NS_N; do
    fl=$(col floor "$n" 4)
    st=$(col stream "$n" 4)
    nf="–"
    if ((n <= NFT_MAX)); then nf="$(col nft "$n" 4) s, $(($(col nft "$n" 5) / 1024)) MB"; fi
    printf "| %s | %s s, %s MB | %s | %s s / %s ms / %s MB | %s s / %s ms / %s MB | %s s / %s ms / %s MB | %s |\n" "$n" \
      "$fl" "$(($(col floor "$n" 5) / 1024))" "$nf" \
      "$(col own "$n" 4)" "$(kv own "$n" backend)" "$(($(col own "$n" 5) / 1024))" \
      "$st" "$(kv stream "$n" backend)" "$(($(col stream "$n" 5) / 1024))" \
      "$(col lib "$n" 4)" "$(kv lib "$n" run)" "$(($(col lib "$n" 5) / 1024))" \
      "$(awk -v a="$st" -v b="$fl" 'BEGIN { printf "%.2f×", a / b }')"
  done
  echo
  echo "| N | steps | Patch+Run in process | Plan+Run in process | Render+Plan+Run in process | one-shot process (ReadShape + Run) | ReadShape | Read (whole) |"
  echo "|---|---|---|---|---|---|---|---|"
  for n in $CHANGE_N; do
    printf "| %s | %s | %s ms | %s ms | %s ms | %s s | %s ms | %s ms |\n" "$n" "$(kv change "$n" steps)" "$(kv change "$n" patch_run)" "$(kv change "$n" plan_run)" \
      "$(kv change "$n" render_plan_run)" "$(col oneshot "$n" 4)" "$(kv read "$n" readshape)" "$(kv read "$n" read)"
  done
  echo
  one=$(kv conn 1 rate)
  big=$(kv conn "$CONN_N" rate)
  echo "New connections: $one/s with 1 destination, $big/s with $CONN_N: $(awk -v a="$big" -v b="$one" 'BEGIN { printf "%.0f%%", 100 * a / b }') (medians of $CONN_ROUNDS rounds of ${CONN_SECS}s)."
} | tee "$OUT/summary.md"
say "runs in $OUT/runs.tsv, summary in $OUT/summary.md"
