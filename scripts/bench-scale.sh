#!/usr/bin/env bash
# bench-scale.sh: the measurements of issue 13, performance at internet
# scale (make bench-scale; make bench runs it after bench.sh). For the host's
# default iptables backend (nft), for iptables-legacy and for the native
# nftables backend (BENCH_BACKENDS="nft legacy nftables") it measures, in
# network namespaces of its own (esscale-PID-..., deleted on exit; the root
# namespace is never touched):
#
#  1. apply time and peak memory against N (100 to 1,000,000 destinations),
#     next to the two floors: `ipset restore` of the same members (what the
#     kernel costs for the set egress-snat builds) and a raw
#     `iptables-restore --noflush` of the same destinations as a linear
#     chain (what a script without egress-snat does; up to SCALE_RAW_MAX;
#     for the nftables backend a raw `nft -f` of the same linear chain);
#  2. at 100,000 destinations: the no-op apply, an apply with one
#     destination changed, `set` of one more destination beside them and
#     its `unset`, and a CPU profile of the change (where the time goes);
#  3. processes and system calls per apply (strace), at 100 and 100,000;
#  4. an idle `watch -f` at 100,000: its CPU over SCALE_IDLE_SECS, its RSS,
#     and the time to repair a flushed POSTROUTING, seen from outside (the
#     jump back first, then `check -f` in sync);
#  5. the new-connection rate with 1,000,000 destinations installed against
#     one destination, round by round (two host/far namespace pairs);
#
# and writes the section between the scale markers of docs/BENCHMARKS.md,
# with a log-log plot of apply time and peak memory against N
# (docs/bench-scale.svg, gnuplot). Timing runs inside the namespaces, so
# `ip netns exec` is not counted. Every figure is the median of SCALE_RUNS
# runs; the single runs are in the report. A missed goal is reported, never
# an error; the script fails only when something does not work.
#
# The destinations: N unique random /24../32 blocks in 10.0.0.0/8
# (benchconn gen) up to 100,000; the million is 900,000 random /32s in
# 10.0.0.0/8 and 100,000 wider prefixes (86,784 /24s of the private and
# benchmark ranges, then /25s), as a feed of hosts and networks is
# (benchconn gen -wide).
#
# Knobs (environment), defaults in brackets:
#   BENCH_BACKENDS     [nft legacy nftables]
#   SCALE_N            [100 1000 10000 100000 1000000]
#   SCALE_RUNS         runs per measurement [3]
#   SCALE_RAW_MAX      largest N of the raw linear restore [100000]
#   SCALE_IDLE_SECS    [30]   SCALE_CONN_ROUNDS [5]   SCALE_CONN_SECS [2]
#   SCALE_MID          [100000]   SCALE_BIG [1000000]: the N of the rows that name them
#   SCALE_OUT          [docs/BENCHMARKS.md]   SCALE_PLOT [docs/bench-scale.svg]
set -euo pipefail
export LC_ALL=C
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
# shellcheck source=scripts/benchlib.sh
source "$ROOT/scripts/benchlib.sh"

BACKENDS=${BENCH_BACKENDS:-nft legacy nftables}
SCALE_N=${SCALE_N:-100 1000 10000 100000 1000000}
RUNS=${SCALE_RUNS:-3}
RAW_MAX=${SCALE_RAW_MAX:-100000}
IDLE_SECS=${SCALE_IDLE_SECS:-30}
CONN_ROUNDS=${SCALE_CONN_ROUNDS:-5}
CONN_SECS=${SCALE_CONN_SECS:-2}
OUT=${SCALE_OUT:-$ROOT/docs/BENCHMARKS.md}
PLOT=${SCALE_PLOT:-$ROOT/docs/bench-scale.svg}
# The commit measured: dirty only for changes other than this report's own
# files, which `make bench` has bench.sh rewrite just before.
COMMIT=$(git -C "$ROOT" describe --always 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- . ':!docs/BENCHMARKS.md' ':!docs/bench-scale.svg' 2>/dev/null) ]]; then
  COMMIT+=-dirty
fi

NATURAL=192.0.2.250
SNAT_TO=192.0.2.22
SERVERS=203.0.113.1,203.0.113.2,203.0.113.3,203.0.113.4
PORTS=7100-7115
MID=${SCALE_MID:-100000} # the N of the incremental rows and the idle watch
BIG=${SCALE_BIG:-1000000} # the N of the million rows

say() { echo "bench-scale: $*" >&2; }
die() { echo "bench-scale: $*" >&2; exit 1; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "NA"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# ---------------------------------------------------------------------------
# Inside the host namespace: `bash bench-scale.sh __prog BACKEND WORK`.
# Results go to WORK/res/prog.tsv as "backend kind N microseconds maxrss_kB".
prog_inner() {
  local b=$1 W=$2
  local tsv=$W/res/prog.tsv es=("$W/egress-snat" --backend "$b")
  cd "$W"
  tm() { # tm KIND N CMD...: wall time and peak RSS of CMD (GNU time), recorded
    local kind=$1 n=$2 t0 t1 rss
    shift 2
    t0=$EPOCHREALTIME
    if ! /usr/bin/time -f '%M' -o "$W/rss" "$@" >/dev/null 2>"$W/err"; then
      cat "$W/err" >&2
      die "$b: $kind N=$n failed: $*"
    fi
    t1=$EPOCHREALTIME
    rss=$(tail -n1 "$W/rss")
    echo "$b $kind $n $((${t1/./} - ${t0/./})) $rss" >>"$tsv"
    printf 'bench-scale: %-6s N=%-7s %-8s %8.3f s %7d MB\n' "$b" "$n" "$kind" \
      "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" $((rss / 1024)) >&2
  }
  drop_linear() {
    if [[ $b == nftables ]]; then
      nft delete table ip bench-linear 2>/dev/null || true
      return
    fi
    printf '*nat\n-D POSTROUTING -j BENCH-LINEAR\n-F BENCH-LINEAR\n-X BENCH-LINEAR\nCOMMIT\n' | "iptables-$b-restore" --noflush 2>/dev/null || true
  }
  syscalls() { # syscalls KIND N CMD...: processes started and system calls made, by strace
    local kind=$1 n=$2
    shift 2
    rm -f "$W/strace.txt"
    strace -f -c -q -o "$W/strace.txt" "$@" >/dev/null
    local calls procs
    calls=$(awk '$NF == "total" { print $4 }' "$W/strace.txt")
    procs=$(awk '$NF == "execve" { print $4 }' "$W/strace.txt")
    echo "$b $kind $n ${calls:-NA} $((${procs:-1} - 1))" >>"$W/res/syscalls.tsv"
    say "$b N=$n $kind: $((${procs:-1} - 1)) processes, ${calls:-NA} system calls"
  }

  local n r
  for n in $SCALE_N; do
    for ((r = 1; r <= RUNS; r++)); do
      "${es[@]}" clear >/dev/null
      tm apply "$n" "${es[@]}" apply -f "apply-$n.yaml"
      "${es[@]}" clear >/dev/null
      tm floor "$n" ipset restore -f "ipset-$n.txt"
      ipset destroy bench-floor
      if ((n <= RAW_MAX)); then
        # The raw reference: the same destinations as a linear chain.
        if [[ $b == nftables ]]; then
          tm raw "$n" nft -f "linear-$n.nft"
        else
          tm raw "$n" "iptables-$b-restore" --noflush "linear-$n.rules"
        fi
        drop_linear
      fi
    done
  done

  # The incremental rows at MID: the file, the same with one destination
  # replaced (changed back and forth), and set/unset of one more.
  "${es[@]}" clear >/dev/null
  "${es[@]}" apply -f "apply-$MID.yaml" >/dev/null
  for ((r = 1; r <= RUNS; r++)); do
    tm noop "$MID" "${es[@]}" apply -f "apply-$MID.yaml"
    tm change "$MID" "${es[@]}" apply -f "change-$MID.yaml"
    tm change "$MID" "${es[@]}" apply -f "apply-$MID.yaml"
    tm set "$MID" "${es[@]}" set --to "$SNAT_TO" --dst 203.0.113.200
    tm unset "$MID" "${es[@]}" unset --dst 203.0.113.200
  done
  EGRESS_SNAT_CPUPROFILE=$W/res/change.prof "${es[@]}" apply -f "change-$MID.yaml" >/dev/null
  EGRESS_SNAT_CPUPROFILE=$W/res/noop.prof "${es[@]}" apply -f "change-$MID.yaml" >/dev/null
  "${es[@]}" apply -f "apply-$MID.yaml" >/dev/null
  syscalls change "$MID" "${es[@]}" apply -f "change-$MID.yaml"
  syscalls noop "$MID" "${es[@]}" apply -f "change-$MID.yaml"
  "${es[@]}" clear >/dev/null
  syscalls apply "$MID" "${es[@]}" apply -f "apply-$MID.yaml"
  "${es[@]}" clear >/dev/null
  syscalls apply 100 "${es[@]}" apply -f apply-100.yaml
  syscalls noop 100 "${es[@]}" apply -f apply-100.yaml
  "${es[@]}" clear >/dev/null
}

# Inside the host namespace: `bash bench-scale.sh __idle BACKEND WORK`: an
# idle watch at MID. Writes "backend cpu_percent rss_MB repair_ms checked"
# to WORK/res/idle.tsv.
idle_inner() {
  local b=$1 W=$2
  local es=("$W/egress-snat" --backend "$b") hz
  cd "$W"
  hz=$(getconf CLK_TCK)
  "${es[@]}" apply -f "apply-$MID.yaml" >/dev/null
  "${es[@]}" watch -f "apply-$MID.yaml" 2>"$W/res/watch-$b.log" &
  local wpid=$!
  sleep 5 # its start-up read and apply
  local t0 t1
  t0=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$wpid/stat")
  sleep "$IDLE_SECS"
  t1=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$wpid/stat")
  local cpu rss
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v s="$IDLE_SECS" 'BEGIN { printf "%.3f", 100 * d / hz / s }')
  rss=$(awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$wpid/status")
  # The repair: POSTROUTING flushed (a firewall reload; on the nftables
  # backend our own chain flushed), until the jump (our rules) is back,
  # polled from outside every 10 ms; then check -f must agree.
  # On nftables, nft(8) fetches every set element for any listing (over a
  # second at 100,000, longer than the repair), so the repair is seen in
  # watch's log: its next "converged".
  local start end before
  before=$(grep -c 'msg=converged' "$W/res/watch-$b.log" || true)
  repaired() {
    if [[ $b == nftables ]]; then
      (($(grep -c 'msg=converged' "$W/res/watch-$b.log" || true) > before))
    else
      "iptables-$b" -t nat -S POSTROUTING 2>/dev/null | sed -n 2p | grep -q -- '-j EGRESS-SNAT'
    fi
  }
  if [[ $b == nftables ]]; then
    nft flush chain inet egress-snat postrouting
  else
    "iptables-$b" -t nat -F POSTROUTING
  fi
  start=$EPOCHREALTIME
  until repaired; do
    sleep 0.01
    if (($(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print (b - a > 20) }'))); then break; fi
  done
  end=$EPOCHREALTIME
  local checked=no
  if "${es[@]}" check -f "apply-$MID.yaml" >/dev/null 2>&1; then checked=yes; fi
  kill "$wpid"
  wait "$wpid" 2>/dev/null || true
  "${es[@]}" clear >/dev/null
  echo "$b $cpu $rss $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", (b - a) * 1000 }') $checked" >>"$W/res/idle.tsv"
  say "$b idle watch at N=$MID: $cpu % of a core, RSS $rss MB, repair $(tail -n1 "$W/res/idle.tsv" | cut -d' ' -f4) ms (check in sync: $checked)"
}

case ${1:-} in
__prog) prog_inner "$2" "$3"; exit 0 ;;
__idle) idle_inner "$2" "$3"; exit 0 ;;
esac

# ---------------------------------------------------------------------------
# The main run.

bench_preflight
bench_deps strace=strace iptables-legacy=iptables conntrack=conntrack gnuplot=gnuplot-nox /usr/bin/time=time
for b in $BACKENDS; do
  if [[ $b == nftables ]]; then
    command -v nft >/dev/null || die "nft not found: install nftables for the nftables backend"
    continue
  fi
  command -v "iptables-$b-restore" >/dev/null || die "iptables-$b-restore not found: the $b backend is not installed"
done

START=$EPOCHREALTIME
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TAG=esscale-$$
bench_on_exit() { if (($1)); then say "failed (exit $1); namespaces deleted, nothing written"; fi; }
bench_start scale
mkdir -p "$WORK/res"
: >"$WORK/res/prog.tsv"
: >"$WORK/res/syscalls.tsv"
: >"$WORK/res/idle.tsv"
: >"$WORK/res/conn.tsv"

say "building egress-snat and benchconn into $WORK"
(cd "$ROOT" && go build -o "$WORK/egress-snat" ./cmd/egress-snat && go build -o "$WORK/benchconn" ./scripts/benchconn)

hashsize() {
  local h=1024
  while ((h < $1 / 2)); do h=$((h * 2)); done
  echo "$h"
}
say "generating destination lists"
for n in $SCALE_N $MID; do
  [[ -f $WORK/dst-$n.txt ]] && continue
  if ((n >= BIG)); then
    "$WORK/benchconn" gen -n "$n" -wide $((n / 10)) >"$WORK/dst-$n.txt"
  else
    "$WORK/benchconn" gen -n "$n" >"$WORK/dst-$n.txt"
  fi
  printf 'rules:\n  - to: %s\n    dst-file: dst-%s.txt\n' "$SNAT_TO" "$n" >"$WORK/apply-$n.yaml"
  {
    echo "create bench-floor hash:net family inet hashsize $(hashsize "$n") maxelem $((2 * n > 65536 ? 2 * n : 65536))"
    sed 's/^/add bench-floor /' "$WORK/dst-$n.txt"
  } >"$WORK/ipset-$n.txt"
  if ((n <= RAW_MAX)); then
    awk -v nat="$NATURAL" -v to="$SNAT_TO" 'BEGIN { print "*nat"; print ":BENCH-LINEAR - [0:0]"; print "-I POSTROUTING 1 -j BENCH-LINEAR" }
      { printf "-A BENCH-LINEAR -s %s/32 -d %s -o eth0 -j SNAT --to-source %s\n", nat, $1, to }
      END { print "COMMIT" }' "$WORK/dst-$n.txt" >"$WORK/linear-$n.rules"
    awk -v nat="$NATURAL" -v to="$SNAT_TO" 'BEGIN { print "table ip bench-linear {"; print " chain postrouting {"; print "  type nat hook postrouting priority srcnat;" }
      { printf "  ip saddr %s ip daddr %s oifname \"eth0\" snat to %s\n", nat, $1, to }
      END { print " }"; print "}" }' "$WORK/dst-$n.txt" >"$WORK/linear-$n.nft"
  fi
done
for n in 100 10000 "$BIG"; do
  [[ " $SCALE_N " == *" $n "* ]] || die "SCALE_N must hold $n (a row of the report needs it)"
done
# One destination of the MID list replaced by another.
awk 'NR == 1 { print "203.0.113.100/32"; next } { print }' "$WORK/dst-$MID.txt" >"$WORK/dst-change-$MID.txt"
printf 'rules:\n  - to: %s\n    dst-file: dst-change-%s.txt\n' "$SNAT_TO" "$MID" >"$WORK/change-$MID.yaml"
# The connection-rate files: the servers' prefix alone, and the million with it.
printf 'rules:\n  - to: %s\n    dst: [203.0.113.0/28]\n' "$SNAT_TO" >"$WORK/conn-1.yaml"
"$WORK/benchconn" gen -n "$BIG" -wide $((BIG / 10)) -last 203.0.113.0/28 >"$WORK/cdst-$BIG.txt"
printf 'rules:\n  - to: %s\n    dst-file: cdst-%s.txt\n' "$SNAT_TO" "$BIG" >"$WORK/conn-$BIG.yaml"


for b in $BACKENDS; do
  h=$TAG-$b-h
  g=$TAG-$b-g
  bench_pair "$h" "$g" 4
  say "programming time and memory, backend $b, in $h"
  ip netns exec "$h" bash "$SELF" __prog "$b" "$WORK"
  say "idle watch, backend $b"
  ip netns exec "$h" bash "$SELF" __idle "$b" "$WORK"

  say "connection rate, backend $b: 1 destination against $BIG"
  h1=$TAG-$b-h1
  g1=$TAG-$b-g1
  bench_pair "$h1" "$g1" 4
  for far in "$g" "$g1"; do
    ip netns exec "$far" "$WORK/benchconn" serve -ports "$PORTS" -max-time 30m >"$WORK/serve-$far.log" 2>&1 &
    PIDS+=($!)
  done
  ip netns exec "$h" "$WORK/egress-snat" --backend "$b" apply -f "$WORK/conn-$BIG.yaml" >/dev/null
  ip netns exec "$h1" "$WORK/egress-snat" --backend "$b" apply -f "$WORK/conn-1.yaml" >/dev/null
  for far in "$g" "$g1"; do
    for _ in $(seq 50); do grep -q ready "$WORK/serve-$far.log" && break; sleep 0.1; done
  done
  for ((r = 1; r <= CONN_ROUNDS; r++)); do
    for setup in "1 $h1" "$BIG $h"; do
      read -r n host <<<"$setup"
      ip netns exec "$host" conntrack -F >/dev/null 2>&1 || true
      json=$(ip netns exec "$host" "$WORK/benchconn" load -addrs "$SERVERS" -ports "$PORTS" -duration "${CONN_SECS}s" -conc 4 -want "$SNAT_TO") ||
        die "$b N=$n: load failed: $json"
      rate=$(sed -E 's/.*"rate":([0-9.e+]+).*/\1/' <<<"$json")
      echo "$b $n $r $rate" >>"$WORK/res/conn.tsv"
      say "$b round $r N=$n: $rate conn/s"
    done
  done
  bench_stop # the servers, and this backend's four namespaces
done

# ---------------------------------------------------------------------------
# The report.

END=$EPOCHREALTIME
TOTAL=$(((${END/./} - ${START/./}) / 1000000))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
R=$WORK/res

# med KIND BACKEND N [FIELD]: median of prog.tsv (field 4: seconds; 5: MB).
med() {
  local f=${4:-4}
  awk -v k="$1" -v b="$2" -v n="$3" -v f="$f" '$1 == b && $2 == k && $3 == n { print (f == 4 ? $4 / 1e6 : $5 / 1024) }' "$R/prog.tsv" | median
}
runs_ms() { awk -v k="$1" -v b="$2" -v n="$3" '$1 == b && $2 == k && $3 == n { printf "%s%d", sep, $4 / 1000 + 0.5; sep = ", " }' "$R/prog.tsv"; }
fmt_s() {
  awk -v x="$1" 'BEGIN { if (x == "NA" || x == "") { print "–"; exit }
    if (x < 1) printf "%.0f ms", x * 1000; else printf "%.2f s", x }'
}
fmt_mb() { awk -v x="$1" 'BEGIN { if (x == "NA" || x == "") print "–"; else printf "%.0f MB", x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA" || b == 0) print "NA"; else print a / b }'; }
fmt_x() { awk -v x="$1" 'BEGIN { if (x == "NA") print "–"; else printf "%.2f×", x }'; }
# verdict VALUE GOAL: met, or missed by how much (VALUE and GOAL in one unit).
verdict() { awk -v a="$1" -v g="$2" 'BEGIN { if (a == "NA") print "not measured"; else if (a <= g) print "**met**"; else printf "**missed**, %.1f× the goal\n", a / g }'; }
# verdict_ge VALUE GOAL: for a floor.
verdict_ge() { awk -v a="$1" -v g="$2" 'BEGIN { if (a == "NA") print "not measured"; else if (a >= g) print "**met**"; else printf "**missed** by %.0f points\n", (g - a) * 100 }'; }
idle() { awk -v b="$1" -v f="$2" '$1 == b { print $f }' "$R/idle.tsv"; }
sysc() { awk -v b="$1" -v k="$2" -v n="$3" -v f="$4" '$1 == b && $2 == k && $3 == n { print $f }' "$R/syscalls.tsv"; }
# conn ratio: median over rounds of rate(BIG) / rate(1) in the same round.
cratio() {
  awk -v b="$1" -v big="$BIG" '$1 == b && $2 == 1 { one[$3] = $4 } $1 == b && $2 == big { many[$3] = $4 }
    END { for (r in many) if ((r in one) && one[r] > 0) print many[r] / one[r] }' "$R/conn.tsv" | median
}
crate() { awk -v b="$1" -v n="$2" '$1 == b && $2 == n { print $4 }' "$R/conn.tsv" | median; }

section() {
  local b
  echo "<!-- scale:begin (written by scripts/bench-scale.sh; do not edit by hand) -->"
  echo "## Scale: issue 13"
  echo
  echo "Written by \`make bench-scale\` (\`scripts/bench-scale.sh\`) at commit **$COMMIT**, kernel $(uname -r),"
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $TOTAL s in all, backends: $BACKENDS. Load average $LOAD_START at the start,"
  echo "$LOAD_END at the end, on $(nproc) CPUs. Medians of $RUNS runs (single runs below); memory is the"
  echo "peak RSS of the process GNU time reports (egress-snat's own, or its largest child's)."
  echo
  echo "| what | backend | measured | goal | result |"
  echo "|---|---|---|---|---|"
  for b in $BACKENDS; do
    local fresh chg set noop cpu rss rep big bigfl bigmem ch10 raw10 a100 r100 cr
    fresh=$(med apply "$b" "$MID"); chg=$(med change "$b" "$MID"); set=$(med set "$b" "$MID"); noop=$(med noop "$b" "$MID")
    big=$(med apply "$b" "$BIG"); bigfl=$(med floor "$b" "$BIG"); bigmem=$(med apply "$b" "$BIG" 5)
    ch10=$(med apply "$b" 10000); raw10=$(med raw "$b" 10000); a100=$(med apply "$b" 100); r100=$(med raw "$b" 100)
    cpu=$(idle "$b" 2); rss=$(idle "$b" 3); rep=$(idle "$b" 4); cr=$(cratio "$b")
    echo "| fresh apply, $MID destinations | $b | $(fmt_s "$fresh") | (the reference) | |"
    echo "| one destination changed, applied | $b | $(fmt_s "$chg") ($(fmt_x "$(ratio "$chg" "$fresh")") fresh) | < 50 ms, ≤ 0.05× fresh | $(verdict "$chg" 0.05) |"
    echo "| \`set\` of one more beside $MID | $b | $(fmt_s "$set") | < 30 ms | $(verdict "$set" 0.03) |"
    echo "| no-op apply, $MID | $b | $(fmt_s "$noop") | < 100 ms | $(verdict "$noop" 0.1) |"
    echo "| idle \`watch -f\`, $MID: CPU | $b | ${cpu:-NA} % of a core | < 0.5 % | $(verdict "${cpu:-NA}" 0.5) |"
    echo "| idle \`watch -f\`, $MID: repair of a flushed POSTROUTING, seen from outside | $b | ${rep:-NA} ms (check -f in sync after: $(idle "$b" 5)) | ≤ 1 s | $(verdict "${rep:-NA}" 1000) |"
    echo "| idle \`watch -f\`, $MID: RSS | $b | ${rss:-NA} MB | < 40 MB | $(verdict "${rss:-NA}" 40) |"
    # The nftables backend's goals are its own (one netlink transaction,
    # no set text to parse): the floor itself, and less memory.
    local gf=1.5 gm=300 gr=2
    if [[ $b == nftables ]]; then gf=1.0 gm=250 gr=1.0; fi
    echo "| $BIG destinations, fresh apply | $b | $(fmt_s "$big"); ipset floor $(fmt_s "$bigfl"): $(fmt_x "$(ratio "$big" "$bigfl")") | ≤ ${gf}× the floor | $(verdict "$(ratio "$big" "$bigfl")" "$gf") |"
    echo "| peak memory of that apply | $b | $(fmt_mb "$bigmem") | < $gm MB | $(verdict "$bigmem" "$gm") |"
    echo "| new-connection rate, $BIG destinations vs 1 | $b | $(awk -v x="$cr" 'BEGIN { if (x == "NA") print "–"; else printf "%.0f %%", x * 100 }') ($(crate "$b" "$BIG" | awk '{ printf "%.0f", $1 }')/s vs $(crate "$b" 1 | awk '{ printf "%.0f", $1 }')/s) | ≥ 90 % | $(verdict_ge "$cr" 0.9) |"
    if [[ $b == legacy ]]; then
      echo "| apply 10,000 vs raw linear restore | $b | $(fmt_s "$ch10") vs $(fmt_s "$raw10"): $(fmt_x "$(ratio "$ch10" "$raw10")") | ≤ 1.0× | $(verdict "$(ratio "$ch10" "$raw10")" 1.0) |"
    fi
    echo "| apply of 100 vs raw restore (fixed cost; nftables: raw \`nft -f\`) | $b | $(fmt_s "$a100") vs $(fmt_s "$r100"): $(fmt_x "$(ratio "$a100" "$r100")") | ≤ ${gr}× | $(verdict "$(ratio "$a100" "$r100")" "$gr") |"
  done
  echo
  b=${BACKENDS%% *}
  local fresh chg noop fl big bigfl per
  fresh=$(med apply "$b" "$MID"); chg=$(med change "$b" "$MID"); noop=$(med noop "$b" "$MID"); fl=$(med floor "$b" "$MID")
  big=$(med apply "$b" "$BIG"); bigfl=$(med floor "$b" "$BIG")
  per=$(awk -v a="$big" -v f="$bigfl" -v n="$BIG" 'BEGIN { if (a == "NA" || f == "NA") print "–"; else printf "%.1f", (a - f) / n * 1e6 }')
  echo "**Reading the misses** ($b figures). The kernel's part of a change is now what changed: one"
  echo "destination changed among $MID is one ipset step of one add and one delete, in place"
  echo "($(sysc "$b" change "$MID" 5) processes and $(sysc "$b" change "$MID" 4) system calls, against $(sysc "$b" apply "$MID" 5) and"
  echo "$(sysc "$b" apply "$MID" 4) for a fresh apply), and the chain is not written. What is left is the same for"
  echo "the change ($(fmt_s "$chg")), the no-op ($(fmt_s "$noop")) and \`set\` beside the list: every run reads"
  echo "the whole file, resolves every destination against the routing table, reads every member"
  echo "back from the kernel (\`ipset save\`) and compares entry by entry, because the kernel is the"
  echo "only state. That is about ${per} µs a destination in Go at $BIG (apply less its ipset floor),"
  echo "so a run over $MID destinations cannot take 50 ms; the profile below shows it spread over"
  echo "reading, resolving, rendering and comparing, with no single part to remove. Meeting those"
  echo "goals needs a run that does not rebuild the whole desired state: a daemon that keeps it, or"
  echo "a compact form of destination lists through the whole pipeline. The idle daemon already"
  echo "keeps it, which is why its CPU and repair time meet their goals. The fresh apply at"
  echo "$MID costs $(fmt_s "$fresh") against an ipset floor of $(fmt_s "$fl"). Peak memory at $BIG is one"
  echo "200-byte entry a destination plus the file's prefixes, the set's members and the restore"
  echo "input, held at once, under a 256 MiB heap limit that keeps the collector's slack out of it."
  echo "On iptables-legacy the raw linear restore of 10,000 rules is cheap, and the ipset floor"
  echo "alone is most of it, so apply cannot reach 1.0× while it loads a set; at 100 destinations"
  echo "the reads before a write (three saves, in parallel) and the two writes are processes the"
  echo "raw restore's one does not have."
  echo
  echo "![apply time and peak memory against N, log-log](bench-scale.svg)"
  echo
  echo "### Apply time and peak memory against N"
  echo
  echo "| backend | N | apply | ipset floor | raw linear restore | apply peak RSS | floor peak RSS |"
  echo "|---|---|---|---|---|---|---|"
  for b in $BACKENDS; do
    for n in $SCALE_N; do
      echo "| $b | $n | $(fmt_s "$(med apply "$b" "$n")") | $(fmt_s "$(med floor "$b" "$n")") | $(fmt_s "$(med raw "$b" "$n")") | $(fmt_mb "$(med apply "$b" "$n" 5)") | $(fmt_mb "$(med floor "$b" "$n" 5)") |"
    done
  done
  echo
  echo "### Processes and system calls per apply (strace -f -c)"
  echo
  echo "| backend | what | N | processes started | system calls (all processes) |"
  echo "|---|---|---|---|---|"
  for b in $BACKENDS; do
    for kn in "apply 100" "noop 100" "apply $MID" "change $MID" "noop $MID"; do
      read -r k n <<<"$kn"
      echo "| $b | $k | $n | $(sysc "$b" "$k" "$n" 5) | $(sysc "$b" "$k" "$n" 4) |"
    done
  done
  echo
  echo "### Where the time goes: CPU profile of one changed destination at $MID (last backend, $b)"
  echo
  echo '```'
  (cd "$ROOT" && go tool pprof -top -cum -nodecount=22 "$WORK/egress-snat" "$R/change.prof" 2>/dev/null | sed -n '4,30p' | cut -c1-120)
  echo '```'
  echo
  echo "### Single runs (ms)"
  echo
  for b in $BACKENDS; do
    for kn in $(for n in $SCALE_N; do echo "apply:$n floor:$n raw:$n"; done) noop:$MID change:$MID set:$MID unset:$MID; do
      local k=${kn%%:*} n=${kn#*:} runs
      runs=$(runs_ms "$k" "$b" "$n")
      [[ -n $runs ]] && echo "- $b $k N=$n: $runs"
    done
  done
  echo
  echo "Connection-rate rounds (conn/s): $(awk '{ printf "%s%s N=%s round %s: %.0f", sep, $1, $2, $3, $4; sep = "; " }' "$R/conn.tsv")."
  echo "<!-- scale:end -->"
}

section >"$WORK/section.md"

# The plot: apply time and peak memory against N, log-log, with the floors.
for b in $BACKENDS; do
  for n in $SCALE_N; do
    echo "$n $(med apply "$b" "$n") $(med floor "$b" "$n") $(med raw "$b" "$n") $(med apply "$b" "$n" 5) $(med floor "$b" "$n" 5)"
  done | sed 's/NA/NaN/g' >"$WORK/plot-$b.dat"
done
{
  echo "set terminal svg size 1000,560 dynamic font 'sans,11'"
  echo "set output '$PLOT'"
  echo "set multiplot layout 1,2 title 'egress-snat apply against N ($COMMIT)'"
  echo "set logscale xy; set grid; set key below maxcols 2; set xlabel 'destinations'"
  echo "set datafile missing 'NaN'"
  echo "set ylabel 'seconds'"
  sep="plot "
  for b in $BACKENDS; do
    printf "%s'%s' using 1:2 with linespoints title 'apply ($b)', '%s' using 1:3 with linespoints dashtype 2 title 'ipset restore floor ($b)', '%s' using 1:4 with linespoints dashtype 3 title 'raw linear restore ($b)'" "$sep" "$WORK/plot-$b.dat" "$WORK/plot-$b.dat" "$WORK/plot-$b.dat"
    sep=", "
  done
  echo
  echo "set ylabel 'peak RSS, MB'"
  sep="plot "
  for b in $BACKENDS; do
    printf "%s'%s' using 1:5 with linespoints title 'apply ($b)', '%s' using 1:6 with linespoints dashtype 2 title 'ipset restore floor ($b)'" "$sep" "$WORK/plot-$b.dat" "$WORK/plot-$b.dat"
    sep=", "
  done
  echo
  echo "unset multiplot"
} >"$WORK/plot.gp"
gnuplot "$WORK/plot.gp"

# Replace the section between the markers, or append it.
if [[ -f $OUT ]] && grep -q '<!-- scale:begin' "$OUT"; then
  awk -v sec="$WORK/section.md" '/<!-- scale:begin/ { while ((getline l < sec) > 0) print l; skip = 1; next }
    /<!-- scale:end -->/ { skip = 0; next } !skip' "$OUT" >"$WORK/out.md"
else
  { [[ -f $OUT ]] && cat "$OUT" && echo; cat "$WORK/section.md"; } >"$WORK/out.md"
fi
cp "$WORK/out.md" "$OUT"
say "wrote $OUT and $PLOT in $TOTAL s"
