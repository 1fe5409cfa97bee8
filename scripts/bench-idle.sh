#!/usr/bin/env bash
# bench-idle.sh: what an idle `egress-snat watch -f` costs at N destinations
# (make bench-idle). For each backend and N it applies a file of N /32s in
# 198.18.0.0/15 inside a namespace lab (scripts/lab.sh, never the root
# namespace), starts watch, waits for it to settle, then reads its CPU time
# (its own and its children's, from /proc/PID/stat) over BENCH_IDLE_SECS and
# its RSS, and repairs a flushed POSTROUTING to measure the time to repair
# as `check` sees it. Output: a Markdown table on stdout, stamped with the
# commit and kernel.
#
#   BENCH_IDLE_N [10000 100000]  BENCH_IDLE_SECS [30]  BENCH_BACKENDS [nft legacy]
set -euo pipefail
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/benchlib.sh
source "$ROOT/scripts/benchlib.sh"
NS=${BENCH_IDLE_N:-10000 100000}
SECS=${BENCH_IDLE_SECS:-30}
BACKENDS=${BENCH_BACKENDS:-nft legacy}

say() { echo "bench-idle: $*" >&2; }
die() { echo "bench-idle: $*" >&2; exit 1; }

bench_preflight
export LAB=esidle$$
# The lab's namespaces are lab.sh's, so lab.sh deletes them, after the
# trap has stopped watch (PIDS).
bench_on_exit() { bash "$ROOT/scripts/lab.sh" down >/dev/null 2>&1; }
bench_start idle
BIN=$WORK/egress-snat
H=$LAB-host
(cd "$ROOT" && go build -o "$BIN" ./cmd/egress-snat)
bash "$ROOT/scripts/lab.sh" up >/dev/null
hz=$(getconf CLK_TCK)
ticks() { awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat"; }

echo "# Idle watch, $(git -C "$ROOT" describe --always --dirty), kernel $(uname -r), $(date -u +%FT%TZ)"
echo
echo "| backend | N | CPU while idle | RSS | repair of a flushed POSTROUTING (check sees in sync) |"
echo "|---|---|---|---|---|"
for b in $BACKENDS; do
  for n in $NS; do
    python3 - "$n" >"$WORK/dst.txt" <<'PY'
import ipaddress, sys
base = int(ipaddress.ip_address("198.18.1.0"))
for i in range(int(sys.argv[1])):
    print(ipaddress.ip_address(base + i))
PY
    printf 'rules:\n  - to: 192.0.2.22\n    dst-file: %s\n' "$WORK/dst.txt" >"$WORK/w.yaml"
    es() { ip netns exec "$H" "$BIN" --iptables-backend "$b" "$@"; }
    es apply -f "$WORK/w.yaml" >/dev/null
    ip netns exec "$H" "$BIN" --iptables-backend "$b" watch -f "$WORK/w.yaml" 2>"$WORK/watch.log" &
    WPID=$!
    PIDS=("$WPID")
    sleep 5 # the start-up apply; ip netns exec execs in place: WPID is watch
    t0=$(ticks "$WPID"); sleep "$SECS"; t1=$(ticks "$WPID")
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v s="$SECS" 'BEGIN { printf "%.2f %% of a core", 100 * d / hz / s }')
    rss=$(awk '/VmRSS/ { printf "%.0f MB", $2 / 1024 }' "/proc/$WPID/status")
    ip netns exec "$H" "iptables-$b" -t nat -F POSTROUTING
    start=$(date +%s.%N)
    until es check -f "$WORK/w.yaml" >/dev/null 2>&1; do sleep 0.05; done
    repair=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f s", b - a }')
    kill "$WPID"; wait "$WPID" 2>/dev/null || true; PIDS=()
    es clear >/dev/null
    echo "| $b | $n | $cpu | $rss | $repair |"
  done
done
