#!/usr/bin/env bash
# bench.sh: the benchmark of issue 3 (make bench). It measures, for the
# host's default iptables backend (nft) and for iptables-legacy:
#
#  1. programming time for N destinations of one source: `egress-snat apply`
#     (an ipset hash:net and one rule) against a raw iptables-restore of the
#     same destinations as a linear chain, and against a go-iptables loop of
#     one Append (one iptables process) per rule; the no-op re-apply; and the
#     number of processes one apply starts (strace);
#  2. the new-connection rate with N destinations installed, as a set and as
#     a linear chain whose matching rule is last;
#
# and writes docs/BENCHMARKS.md. Everything runs in network namespaces this
# script creates (names esbench-PID-...) and deletes on exit; the root
# namespace is never touched. Only documentation and private ranges are
# used: 192.0.2.0/24 links the host to the far side, 203.0.113.1-8 are the
# far servers, the generated destinations lie in 10.0.0.0/8 and never carry
# traffic. A missed target is reported, never an error; the script fails
# only when something does not work.
#
# Knobs (environment), defaults in brackets:
#   BENCH_PROG_N    destination counts for programming [100 1000 10000 100000]
#   BENCH_CONN_N    destination counts for the connection rate [1 10000 100000]
#   BENCH_BACKENDS  [nft legacy]
#   BENCH_RUNS      runs per measurement [5]; BENCH_RUNS_SLOW for N >= 100000 [3]
#   BENCH_LOOP_N    N of the go-iptables loop [100 1000]; BENCH_LOOP_RUNS_SLOW
#                   runs for N >= 1000 [3]
#   BENCH_ROUNDS    connection-rate rounds [7]; BENCH_SECS seconds each [2];
#                   BENCH_CONC concurrent connecting workers [4]
#   BENCH_OUT       report file [docs/BENCHMARKS.md]
set -euo pipefail
export LC_ALL=C
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
# shellcheck source=scripts/benchlib.sh
source "$ROOT/scripts/benchlib.sh"

PROG_N=${BENCH_PROG_N:-100 1000 10000 100000}
CONN_N=${BENCH_CONN_N:-1 10000 100000}
BACKENDS=${BENCH_BACKENDS:-nft legacy}
RUNS=${BENCH_RUNS:-5}
RUNS_SLOW=${BENCH_RUNS_SLOW:-3}
LOOP_N=${BENCH_LOOP_N:-100 1000}
LOOP_RUNS_SLOW=${BENCH_LOOP_RUNS_SLOW:-3}
ROUNDS=${BENCH_ROUNDS:-7}
SECS=${BENCH_SECS:-2}
CONC=${BENCH_CONC:-4}
OUT=${BENCH_OUT:-$ROOT/docs/BENCHMARKS.md}
# The commit measured, read before the report is written (which would make
# the tree dirty).
COMMIT=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)

NATURAL=192.0.2.250
SNAT_TO=192.0.2.22
SERVER_NET=203.0.113.0/28
SERVERS=203.0.113.1,203.0.113.2,203.0.113.3,203.0.113.4,203.0.113.5,203.0.113.6,203.0.113.7,203.0.113.8
PORTS=7100-7115

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

runs_for() { if (($1 >= 100000)); then echo "$RUNS_SLOW"; else echo "$RUNS"; fi; }

# ---------------------------------------------------------------------------
# Inside the programming namespace: `bash bench.sh __prog BACKEND WORK`.
# Timing happens here, so `ip netns exec` is not part of any number.
# Results go to WORK/res/prog.tsv as "backend kind N microseconds".
prog_inner() {
  local b=$1 W=$2
  local tsv=$W/res/prog.tsv es=("$W/egress-snat" --iptables-backend "$b")
  local restore=iptables-$b-restore save=iptables-$b-save
  cd "$W"

  tm() { # tm KIND N CMD...: time CMD (wall, and CPU of CMD and its children), record it
    local kind=$1 n=$2
    shift 2
    local TIMEFORMAT='%3U %3S' t0 t1 cpu
    t0=$EPOCHREALTIME
    if ! cpu=$({ time "$@" >/dev/null 2>"$W/err"; } 2>&1); then
      cat "$W/err" >&2
      die "$b: $kind N=$n failed: $*"
    fi
    t1=$EPOCHREALTIME
    local us=$((${t1/./} - ${t0/./}))
    cpu=$(awk '{ printf "%d", ($1 + $2) * 1e6 }' <<<"$cpu")
    echo "$b $kind $n $us $cpu" >>"$tsv"
    printf 'bench: %-6s N=%-6s %-7s %8.3f s (CPU %.3f s)\n' "$b" "$n" "$kind" \
      "$(awk -v u="$us" 'BEGIN { print u / 1e6 }')" "$(awk -v u="$cpu" 'BEGIN { print u / 1e6 }')" >&2
  }
  drop_chain() { # drop_chain NAME: remove a raw chain and its jump, untimed
    # No save first (iptables-nft-save of 100,000 rules takes seconds): when
    # the chain is not there the transaction fails as a whole and changes nothing.
    printf '*nat\n-D POSTROUTING -j %s\n-F %s\n-X %s\nCOMMIT\n' "$1" "$1" "$1" | "$restore" --noflush 2>/dev/null || true
  }
  procs() { # procs KIND N CMD...: successful execve calls below CMD, by strace
    local kind=$1 n=$2
    shift 2
    rm -rf "$W/strace" && mkdir "$W/strace"
    strace -f -ff -qq -e trace=execve -e signal=none -o "$W/strace/t" "$@" >/dev/null
    local progs
    progs=$(cat "$W/strace/t".* | grep 'execve(' | grep ' = 0$' | sed -E 's/^execve\("([^"]*)".*/\1/' | xargs -n1 basename | grep -vx egress-snat | sort | uniq -c |
      awk 'NR > 0 { printf "%s%s%s", sep, $2, ($1 > 1 ? "×" $1 : ""); sep = ", " }')
    local count
    count=$(cat "$W/strace/t".* | grep 'execve(' | grep -c ' = 0$')
    # The first execve is egress-snat itself; the rest are the processes it starts.
    echo "$b $kind $n $((count - 1)) $progs" >>"$W/res/procs.tsv"
    say "$b N=$n $kind: $((count - 1)) processes started ($progs)"
  }

  local n r
  # What starting a process costs here: the floor under every run.
  for ((r = 1; r <= RUNS; r++)); do
    tm exec 0 "iptables-$b" --version
    tm gostart 0 "$W/egress-snat" --version
  done
  for n in $PROG_N; do
    local runs lruns=0
    runs=$(runs_for "$n")
    if [[ " $LOOP_N " == *" $n "* ]]; then
      lruns=$RUNS
      ((n >= 1000)) && lruns=$LOOP_RUNS_SLOW
    fi
    # The kinds take turns run by run, so that a burst of background load
    # hits them alike. Each starts from a clean state, untimed.
    for ((r = 1; r <= runs || r <= lruns; r++)); do
      if ((r <= runs)); then
        # (a) egress-snat apply, fresh (after clear), then the no-op re-apply.
        "${es[@]}" clear >/dev/null
        tm apply "$n" "${es[@]}" apply -f "apply-$n.yaml"
        tm noop "$n" "${es[@]}" apply -f "apply-$n.yaml"
        if ((r == 1)); then
          # What the kernel holds: the set's size and the chain's rule count.
          local members rules
          members=$(ipset list -t | awk '/^Number of entries/ { s += $4 } END { print s + 0 }')
          rules=$("$save" -t nat | grep -c '^-A EGRESS-SNAT' || true)
          echo "$b $n $members $rules" >>"$W/res/installed.tsv"
        fi
        "${es[@]}" clear >/dev/null
        # (b) raw iptables-restore --noflush of the linear chain, fresh chain.
        tm raw "$n" "$restore" --noflush "linear-$n.rules"
        drop_chain BENCH-LINEAR
        # The floor of the set approach: loading the same N members with
        # ipset restore alone.
        tm ipset "$n" ipset restore -f "ipset-$n.txt"
        ipset destroy bench-floor
      fi
      if ((r <= lruns)); then
        # (c) go-iptables, one Append (one iptables process) per rule.
        tm loop "$n" "$W/benchconn" loop "/usr/sbin/iptables-$b" "loop-$n.txt"
        drop_chain BENCH-LOOP
      fi
    done
    # Processes per apply, fresh and no-op.
    "${es[@]}" clear >/dev/null
    procs apply "$n" "${es[@]}" apply -f "apply-$n.yaml"
    procs noop "$n" "${es[@]}" apply -f "apply-$n.yaml"
    "${es[@]}" clear >/dev/null
  done
}

if [[ ${1:-} == __prog ]]; then
  prog_inner "$2" "$3"
  exit 0
fi

# ---------------------------------------------------------------------------
# The main run.

bench_preflight
bench_deps strace=strace iptables-legacy=iptables conntrack=conntrack
for b in $BACKENDS; do
  for c in "iptables-$b" "iptables-$b-restore" "iptables-$b-save"; do
    command -v "$c" >/dev/null || die "$c not found: the $b backend is not installed"
  done
done

START=$EPOCHREALTIME
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TAG=esbench-$$
bench_on_exit() { if (($1)); then say "failed (exit $1); namespaces deleted, nothing written"; fi; }
bench_start bench

mkdir -p "$WORK/res"
: >"$WORK/res/prog.tsv"
: >"$WORK/res/procs.tsv"
: >"$WORK/res/installed.tsv"
: >"$WORK/res/conn.tsv"
: >"$WORK/res/setup.tsv"

say "building egress-snat and the helpers into $WORK"
(cd "$ROOT" && go build -o "$WORK/egress-snat" ./cmd/egress-snat)
(cd "$ROOT" && go build -o "$WORK/benchconn" ./scripts/benchconn)
# hashsize N: the ipset hashsize egress-snat picks for N members.
hashsize() {
  local h=1024
  while ((h < $1 / 2)); do h=$((h * 2)); done
  echo "$h"
}

say "generating destination lists"
for n in $PROG_N; do
  "$WORK/benchconn" gen -n "$n" >"$WORK/dst-$n.txt"
  printf 'rules:\n  - to: %s\n    dst-file: dst-%s.txt\n' "$SNAT_TO" "$n" >"$WORK/apply-$n.yaml"
  {
    echo '*nat'
    echo ':BENCH-LINEAR - [0:0]'
    echo '-I POSTROUTING 1 -j BENCH-LINEAR'
    "$WORK/benchconn" gen -n "$n" -format linear -chain BENCH-LINEAR -natural "$NATURAL" -to "$SNAT_TO"
    echo 'COMMIT'
  } >"$WORK/linear-$n.rules"
  {
    echo "create bench-floor hash:net family inet hashsize $(hashsize "$n") maxelem $((2 * n > 65536 ? 2 * n : 65536))"
    sed 's/^/add bench-floor /' "$WORK/dst-$n.txt"
  } >"$WORK/ipset-$n.txt"
  if [[ " $LOOP_N " == *" $n "* ]]; then
    "$WORK/benchconn" gen -n "$n" -format linear -chain BENCH-LOOP -natural "$NATURAL" -to "$SNAT_TO" >"$WORK/loop-$n.txt"
  fi
done
# Connection-rate lists: N-1 generated destinations, then the servers' prefix.
for n in $CONN_N; do
  "$WORK/benchconn" gen -n "$n" -last "$SERVER_NET" >"$WORK/cdst-$n.txt"
  printf 'rules:\n  - to: %s\n    dst-file: cdst-%s.txt\n' "$SNAT_TO" "$n" >"$WORK/capply-$n.yaml"
  {
    echo '*nat'
    echo ':BENCH-LINEAR - [0:0]'
    echo '-I POSTROUTING 1 -j BENCH-LINEAR'
    "$WORK/benchconn" gen -n "$n" -last "$SERVER_NET" -format linear -chain BENCH-LINEAR -natural "$NATURAL" -to "$SNAT_TO"
    echo 'COMMIT'
  } >"$WORK/clinear-$n.rules"
done

# ---------------------------------------------------------------------------
# 1. Programming time: one namespace per backend, its eth0 a veth whose peer
# stays in the same namespace (no traffic flows; the tool only needs the
# route and the addresses).

for b in $BACKENDS; do
  ns=$TAG-prog-$b
  bench_host "$ns"
  say "programming time, backend $b, in namespace $ns"
  ip netns exec "$ns" bash "$SELF" __prog "$b" "$WORK"
  ip netns del "$ns"
done

# ---------------------------------------------------------------------------
# 2. New-connection rate. One host/far namespace pair per (backend, setup),
# all built first, so the runs of every setup can be interleaved round by
# round: background load from other work on the machine then hits all
# setups alike.

setups=()
for b in $BACKENDS; do
  for n in $CONN_N; do
    setups+=("$b set $n" "$b linear $n")
  done
done


i=0
for s in "${setups[@]}"; do
  read -r b kind n <<<"$s"
  i=$((i + 1))
  h=$TAG-c$i-h
  g=$TAG-c$i-g
  bench_pair "$h" "$g" 8
  ip netns exec "$g" "$WORK/benchconn" serve -ports "$PORTS" -max-time 30m >"$WORK/serve-$i.log" 2>&1 &
  PIDS+=($!)
  t0=$EPOCHREALTIME
  if [[ $kind == set ]]; then
    ip netns exec "$h" "$WORK/egress-snat" --iptables-backend "$b" apply -f "$WORK/capply-$n.yaml" >/dev/null
    detail="$(ip netns exec "$h" "iptables-$b-save" -t nat | grep -c '^-A EGRESS-SNAT') rule(s), set members: $(ip netns exec "$h" ipset list -t | awk '/^Number of entries/ { s += $4 } END { print s + 0 }')"
  else
    ip netns exec "$h" "iptables-$b-restore" --noflush "$WORK/clinear-$n.rules"
    detail="$(grep -c '^-A BENCH-LINEAR' "$WORK/clinear-$n.rules") rules, the servers' prefix last"
  fi
  t1=$EPOCHREALTIME
  echo "$b|$kind|$n|$(((${t1/./} - ${t0/./}) / 1000))|$detail" >>"$WORK/res/setup.tsv"
  say "connection setup $i: $b $kind N=$n in $h ($detail)"
done

# Wait for the servers, then check every setup once: a short load that must
# complete and must be seen by the far side as coming from $SNAT_TO.
i=0
for s in "${setups[@]}"; do
  i=$((i + 1))
  for _ in $(seq 50); do grep -q ready "$WORK/serve-$i.log" && break; sleep 0.1; done
  grep -q ready "$WORK/serve-$i.log" || { cat "$WORK/serve-$i.log" >&2; die "server $i did not start"; }
  ip netns exec "$TAG-c$i-h" "$WORK/benchconn" load -addrs "$SERVERS" -ports "$PORTS" -duration 0.3s -conc 2 -want "$SNAT_TO" >/dev/null ||
    die "setup $i ($s): connections fail or do not arrive from $SNAT_TO"
done
# A sample of the host's conntrack entries, for the report: original source
# the natural address, reply destination the SNAT address.
ip netns exec "$TAG-c1-h" conntrack -L -p tcp 2>/dev/null | head -3 >"$WORK/res/conntrack-sample.txt" || true

nsetups=${#setups[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < nsetups; k++)); do
    j=$(((k + r - 1) % nsetups)) # rotate the order each round
    read -r b kind n <<<"${setups[$j]}"
    h=$TAG-c$((j + 1))-h
    ip netns exec "$h" conntrack -F >/dev/null 2>&1 || true
    json=$(ip netns exec "$h" "$WORK/benchconn" load -addrs "$SERVERS" -ports "$PORTS" -duration "${SECS}s" -conc "$CONC" -want "$SNAT_TO") ||
      die "round $r, $b $kind N=$n: load failed: $json"
    rate=$(sed -E 's/.*"rate":([0-9.e+]+).*/\1/' <<<"$json")
    conns=$(sed -E 's/.*"conns":([0-9]+).*/\1/' <<<"$json")
    errs=$(sed -E 's/.*"errors":([0-9]+).*/\1/' <<<"$json")
    seen=$(sed -E 's/.*"seen":\{([^}]*)\}.*/\1/; s/"//g' <<<"$json")
    echo "$b $kind $n $r $rate $conns $errs $seen" >>"$WORK/res/conn.tsv"
    printf 'bench: round %d/%d  %-6s %-6s N=%-6s %9.0f conn/s (%s conns, %s errors, far side saw %s)\n' \
      "$r" "$ROUNDS" "$b" "$kind" "$n" "$rate" "$conns" "$errs" "$seen" >&2
  done
done

# Stop the servers and delete the namespaces now.
bench_stop

# ---------------------------------------------------------------------------
# The report.

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
END=$EPOCHREALTIME
TOTAL=$(((${END/./} - ${START/./}) / 1000000))

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "NA"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# med KIND BACKEND N: median in seconds of prog.tsv, or NA.
med() { awk -v k="$1" -v b="$2" -v n="$3" '$1 == b && $2 == k && $3 == n { print $4 / 1e6 }' "$WORK/res/prog.tsv" | median; }
# cmedian KIND BACKEND N: median CPU seconds (user+sys of the command and its children).
cpumed() { awk -v k="$1" -v b="$2" -v n="$3" '$1 == b && $2 == k && $3 == n { print $5 / 1e6 }' "$WORK/res/prog.tsv" | median; }
# over VALUE BOUND: "x% over the bound" text for a missed target.
over() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "NA" && b > 0 && a > b) printf "; %.0f %% over the bound", (a / b - 1) * 100 }'; }
under() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "NA" && b > 0 && a < b) printf "; %.0f %% short of the bound", (1 - a / b) * 100 }'; }
count() { awk -v k="$1" -v b="$2" -v n="$3" '$1 == b && $2 == k && $3 == n' "$WORK/res/prog.tsv" | wc -l; }
runs_list() { # the single runs in ms, in order
  awk -v k="$1" -v b="$2" -v n="$3" '$1 == b && $2 == k && $3 == n { printf "%s%d", sep, $4 / 1000 + 0.5; sep = ", " }' "$WORK/res/prog.tsv"
}
# cmed BACKEND KIND N: median connection rate.
cmed() { awk -v b="$1" -v k="$2" -v n="$3" '$1 == b && $2 == k && $3 == n { print $5 }' "$WORK/res/conn.tsv" | median; }
crange() {
  awk -v b="$1" -v k="$2" -v n="$3" '$1 == b && $2 == k && $3 == n { print $5 }' "$WORK/res/conn.tsv" | sort -g |
    awk '{ a[NR] = $1 } END { if (NR) printf "%.0f–%.0f", a[1], a[NR] }'
}
# pmed BACKEND KIND N KIND0 N0: median over the rounds of rate(KIND N) / rate(KIND0 N0)
# in the same round.
pmed() {
  awk -v b="$1" -v k="$2" -v n="$3" -v k0="$4" -v n0="$5" '
    $1 == b && $2 == k && $3 == n { x[$4] = $5 }
    $1 == b && $2 == k0 && $3 == n0 { y[$4] = $5 }
    END { for (r in x) if ((r in y) && y[r] > 0) print x[r] / y[r] }' "$WORK/res/conn.tsv" | median
}
# fmt_s SECONDS: for people.
fmt_s() {
  awk -v x="$1" 'BEGIN {
    if (x == "NA" || x == "") { print "–"; exit }
    if (x < 0.01) printf "%.1f ms", x * 1000
    else if (x < 1) printf "%.0f ms", x * 1000
    else if (x < 100) printf "%.2f s", x
    else printf "%.0f s", x }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA" || b == 0) print "NA"; else print a / b }'; }
fmt_x() { awk -v x="$1" 'BEGIN { if (x == "NA") print "–"; else if (x >= 10) printf "%.0f×", x; else printf "%.2f×", x }'; }
fmt_pct() { awk -v x="$1" 'BEGIN { if (x == "NA") print "–"; else printf "%.0f %%", x * 100 }'; }
fmt_rate() { awk -v x="$1" 'BEGIN { if (x == "NA") print "–"; else printf "%.0f/s", x }'; }
fmt_n() { awk -v x="$1" 'BEGIN { s = sprintf("%d", x); while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]($|,)/, ",&", s); print s }'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "NA" && b != "NA" && a <= b) }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "NA" && b != "NA" && a >= b) }'; }
mark() { if "$@"; then echo "**met**"; else echo "**missed**"; fi; }
commas() { awk '{ $1 = $1; gsub(/ /, ", "); print }' <<<"$1"; }
has_n() { [[ " $1 " == *" $2 "* ]]; }

# The go-iptables loop beyond the largest measured N: t = t_max * (N/N_max)^k,
# k fitted on the smallest and largest measured N (at least 1).
loop_fit() { # loop_fit BACKEND -> "N_lo N_hi k", or nothing
  local ns=() x
  for x in $LOOP_N; do [[ $(med loop "$1" "$x") != NA ]] && ns+=("$x"); done
  ((${#ns[@]})) || return 0
  awk -v thi="$(med loop "$1" "${ns[-1]}")" -v tlo="$(med loop "$1" "${ns[0]}")" -v hi="${ns[-1]}" -v lo="${ns[0]}" 'BEGIN {
    k = 1
    if (hi != lo && tlo > 0) { k = log(thi / tlo) / log(hi / lo); if (k < 1) k = 1 }
    printf "%s %s %.3f\n", lo, hi, k }'
}
loop_time() { # loop_time BACKEND N -> "seconds measured|extrapolated|none"
  local m hi k
  m=$(med loop "$1" "$2")
  if [[ $m != NA ]]; then
    echo "$m measured"
    return
  fi
  read -r _ hi k <<<"$(loop_fit "$1")"
  if [[ -z ${hi:-} ]]; then
    echo "NA none"
    return
  fi
  awk -v t="$(med loop "$1" "$hi")" -v hi="$hi" -v n="$2" -v k="$k" 'BEGIN { printf "%g extrapolated\n", t * (n / hi) ^ k }'
}

cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
mem=$(free -h | awk '/^Mem:/ { print $2 }')
default_ipt=$(iptables --version)
case $default_ipt in *nf_tables*) default_backend=nft ;; *) default_backend=legacy ;; esac
legacy_ipt=$(iptables-legacy --version 2>/dev/null || echo "not installed")
ipset_v=$(ipset --version 2>/dev/null | head -1)
go_v=$(go version)
cbig=$(for n in $CONN_N; do echo "$n"; done | sort -n | tail -1)
csmall=$(for n in $CONN_N; do echo "$n"; done | sort -n | head -1)
pbig=$(for n in $PROG_N; do echo "$n"; done | sort -n | tail -1)

tmp=$(mktemp "$WORK/report.XXXXXX")
{
  cat <<EOF
# Benchmarks

Written by \`make bench\` (\`scripts/bench.sh\`); do not edit by hand, run it
again.

Measured at commit **$COMMIT**, Linux $(uname -r),
backends $BACKENDS, on $(date -u '+%Y-%m-%d %H:%M UTC'), ${TOTAL} s in all.

Every number is the **median** of several runs (run counts and single runs
are below the tables). The machine was **shared**: other agents ran test
suites on it at the same time (load average $LOAD_START at the start,
$LOAD_END at the end, on $(nproc) CPUs), so single runs vary by tens of
percent. The kinds of measurement take turns run by run, and the
connection-rate setups round by round, so that background load hits them
alike; still, read ratios near a target's threshold as "about there".

## Machine

| | |
|---|---|
| CPUs (nproc) | $(nproc) ($cpu) |
| memory | $mem |
| kernel | $(uname -r) |
| iptables (host default) | $default_ipt — default backend: **$default_backend** |
| iptables-legacy | $legacy_ipt |
| ipset | $ipset_v |
| Go | $go_v |
| egress-snat | the working tree at $COMMIT, built with \`go build -o\` |

## Targets

EOF
  echo "| target | backend | measured | result |"
  echo "|---|---|---|---|"
  for b in $BACKENDS; do
    if has_n "$PROG_N" 10000; then
      a=$(med apply "$b" 10000) w=$(med raw "$b" 10000)
      q=$(ratio "$a" "$w")
      echo "| apply of 10,000 destinations ≤ 1.5× a raw iptables-restore of the linear chain | $b | $(fmt_s "$a") vs $(fmt_s "$w"): $(fmt_x "$q")$(over "$q" 1.5) | $(mark le "$q" 1.5) |"
    fi
    if has_n "$PROG_N" 1000; then
      a=$(med apply "$b" 1000)
      read -r l how <<<"$(loop_time "$b" 1000)"
      q=$(ratio "$l" "$a")
      echo "| apply ≥ 100× faster than the go-iptables loop, at N = 1,000 (loop $how) | $b | $(fmt_s "$a") vs $(fmt_s "$l"): $(fmt_x "$q") faster$(under "$q" 100) | $(mark ge "$q" 100) |"
    fi
    if has_n "$PROG_N" 10000; then
      a=$(med apply "$b" 10000)
      read -r l how <<<"$(loop_time "$b" 10000)"
      q=$(ratio "$l" "$a")
      echo "| the same at N = 10,000 (loop $how) | $b | $(fmt_s "$a") vs $(fmt_s "$l"): $(fmt_x "$q") faster$(under "$q" 100) | $(mark ge "$q" 100) |"
    fi
    pa=$(awk -v b="$b" '$1 == b && $2 == "apply" { print $4 }' "$WORK/res/procs.tsv" | sort -u | paste -sd/)
    pn=$(awk -v b="$b" '$1 == b && $2 == "noop" { print $4 }' "$WORK/res/procs.tsv" | sort -u | paste -sd/)
    const=false
    [[ -n $pa && $pa != */* && $pn != */* ]] && const=true
    echo "| processes per apply constant for N = $(commas "$PROG_N") | $b | $pa per apply, $pn per no-op apply | $(mark $const) |"
    if [[ $cbig != "$csmall" ]]; then
      r1=$(cmed "$b" set "$csmall") rb=$(cmed "$b" set "$cbig") q=$(pmed "$b" set "$cbig" set "$csmall")
      echo "| new-connection rate with $(fmt_n "$cbig") destinations ≥ 90 % of the $(fmt_n "$csmall")-destination rate (median of the per-round ratios) | $b | $(fmt_pct "$q") (medians $(fmt_rate "$rb") and $(fmt_rate "$r1"))$(under "$q" 0.9) | $(mark ge "$q" 0.9) |"
    fi
    if has_n "$PROG_N" 10000; then
      a=$(med noop "$b" 10000)
      echo "| no-op apply of 10,000 destinations < 0.2 s | $b | $(fmt_s "$a") (CPU time $(fmt_s "$(cpumed noop "$b" 10000)"))$(over "$a" 0.2) | $(mark le "$a" 0.2) |"
    fi
  done
  if has_n "$PROG_N" 10000 && has_n "$LOOP_N" 1000; then
    echo
    printf '%s' "Read literally (\"applying 10,000 destinations takes at least 100× less than the per-rule loop at N = 1,000\"), the loop target compares apply at 10,000 with the measured loop at 1,000:"
    for b in $BACKENDS; do
      a=$(med apply "$b" 10000) l=$(med loop "$b" 1000)
      q=$(ratio "$l" "$a")
      printf ' %s %s vs %s, %s faster (%s);' "$b" "$(fmt_s "$a")" "$(fmt_s "$l")" "$(fmt_x "$q")" "$(mark ge "$q" 100 | tr -d '*')"
    done | sed 's/;$/./'
    echo
  fi

  cat <<EOF

## 1. Programming time

One source address, N destinations: unique, non-overlapping prefixes of a
random length from /24 to /32 in 10.0.0.0/8, in random order, generated
deterministically (\`benchconn gen -n N\`, seed 1). The namespace holds
\`$NATURAL/24\` (primary, the natural source) and \`$SNAT_TO/24\` on \`eth0\`
(a veth) with a default route via 192.0.2.1. Every timing runs inside the
namespace (\`ip netns exec\` is not counted) and starts from a clean state;
the tables give wall-clock time, and CPU time follows them:

- **apply**: \`egress-snat --iptables-backend B apply -f apply-N.yaml\`
  right after \`egress-snat clear\`; the file is
  \`rules: [{to: $SNAT_TO, dst-file: dst-N.txt}]\`. It loads an ipset
  hash:net with the N destinations and writes a one-rule chain.
- **raw**: \`iptables-B-restore --noflush linear-N.rules\` into a fresh chain
  (deleted after each run): the jump \`-I POSTROUTING 1 -j BENCH-LINEAR\`
  and N rules
  \`-A BENCH-LINEAR -s $NATURAL/32 -d PREFIX -o eth0 -j SNAT --to-source $SNAT_TO\`.
- **loop**: \`benchconn loop /usr/sbin/iptables-B loop-N.txt\`, one
  go-iptables v0.8.0 \`Append\` (one \`iptables-B\` process) per rule, plus
  \`NewChain\` and the jump, into a fresh chain. Measured for
  N = $(commas "$LOOP_N"); larger N (marked \*) are extrapolated as
  t(N) = t(N_max)·(N/N_max)^k, k fitted on the measured N (at least 1):
  $(for b in $BACKENDS; do read -r _ _ k <<<"$(loop_fit "$b")"; printf 'k = %s for %s; ' "${k:-–}" "$b"; done | sed 's/; $/./')
- **no-op**: the same apply again right after it, with the state already
  in the kernel.
- **ipset alone**: \`ipset restore\` of one hash:net set with the same N
  members (egress-snat's hashsize and maxelem): the kernel's floor for
  loading the set, whatever the tool around it does.

Runs: $RUNS per N ($RUNS_SLOW for N ≥ 100,000); the loop $RUNS below
N = 1,000 and $LOOP_RUNS_SLOW from 1,000 on.

EOF
  for b in $BACKENDS; do
    echo "### Backend: $b"
    echo
    echo "| N | apply | raw restore | apply / raw | ipset alone | go-iptables loop | loop / apply | no-op apply | processes: apply (no-op) |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for n in $PROG_N; do
      a=$(med apply "$b" "$n") w=$(med raw "$b" "$n") o=$(med noop "$b" "$n") f=$(med ipset "$b" "$n")
      read -r l how <<<"$(loop_time "$b" "$n")"
      star=""
      [[ $how == extrapolated ]] && star="*"
      pa=$(awk -v b="$b" -v n="$n" '$1 == b && $2 == "apply" && $3 == n { print $4 }' "$WORK/res/procs.tsv")
      pn=$(awk -v b="$b" -v n="$n" '$1 == b && $2 == "noop" && $3 == n { print $4 }' "$WORK/res/procs.tsv")
      printf '| %s | %s | %s | %s | %s | %s%s | %s | %s | %s (%s) |\n' "$(fmt_n "$n")" "$(fmt_s "$a")" "$(fmt_s "$w")" \
        "$(fmt_x "$(ratio "$a" "$w")")" "$(fmt_s "$f")" "$(fmt_s "$l")" "$star" "$(fmt_x "$(ratio "$l" "$a")")" "$(fmt_s "$o")" "$pa" "$pn"
    done
    echo
    echo "Single runs, ms, in order:"
    echo
    for n in $PROG_N; do
      line="- N = $(fmt_n "$n"): apply $(runs_list apply "$b" "$n"); raw $(runs_list raw "$b" "$n"); ipset $(runs_list ipset "$b" "$n"); no-op $(runs_list noop "$b" "$n")"
      [[ $(count loop "$b" "$n") -gt 0 ]] && line+="; loop $(runs_list loop "$b" "$n")"
      echo "$line"
    done
    echo
    echo "CPU time (user + sys of the command and all its children; less sensitive than wall time to waiting for a busy CPU), medians:"
    echo
    echo "| N | apply | raw restore | ipset alone | no-op apply |"
    echo "|---:|---:|---:|---:|---:|"
    for n in $PROG_N; do
      printf '| %s | %s | %s | %s | %s |\n' "$(fmt_n "$n")" "$(fmt_s "$(cpumed apply "$b" "$n")")" "$(fmt_s "$(cpumed raw "$b" "$n")")" \
        "$(fmt_s "$(cpumed ipset "$b" "$n")")" "$(fmt_s "$(cpumed noop "$b" "$n")")"
    done
    echo
    printf '%s' "The kernel after the first apply of each N:"
    awk -v b="$b" '$1 == b { printf " N = %s: %s set members and %s rule(s) in EGRESS-SNAT;", $2, $3, $4 }' "$WORK/res/installed.tsv" | sed 's/;$/./'
    echo
    echo
  done

  cat <<EOF
### Processes per apply

Counted with \`strace -f -ff -e trace=execve\` around one fresh and one
no-op apply: successful execve calls, minus egress-snat's own. (Go's
os/exec also forks once, without exec, to probe for pidfd support; that is
not counted.)

EOF
  echo "| backend | N | apply | processes | programs |"
  echo "|---|---:|---|---:|---|"
  awk '{ p = ""; for (i = 5; i <= NF; i++) p = p (i > 5 ? " " : "") $i; printf "| %s | %s | %s | %s | %s |\n", $1, $3, ($2 == "apply" ? "fresh" : "no-op"), $4, p }' "$WORK/res/procs.tsv"

  cat <<EOF

### Reading the numbers

EOF
  for b in $BACKENDS; do
    a=$(med apply "$b" 10000) w=$(med raw "$b" 10000) f=$(med ipset "$b" 10000) o=$(med noop "$b" 10000)
    [[ $a == NA ]] && continue
    # shellcheck disable=SC2016 # the backquotes are Markdown
    printf -- '- **%s, N = 10,000.** apply %s (CPU %s). Loading the same members with `ipset restore` alone takes %s, %s of the raw linear restore (%s).' \
      "$b" "$(fmt_s "$a")" "$(fmt_s "$(cpumed apply "$b" 10000)")" "$(fmt_s "$f")" "$(fmt_x "$(ratio "$f" "$w")")" "$(fmt_s "$w")"
    if ge "$(ratio "$f" "$w")" 1.5; then
      printf ' With this backend the 1.5× target cannot be met by a tool that loads the destinations with ipset restore: the kernel work of the set alone is over the bound.'
    fi
    # shellcheck disable=SC2016 # the backquotes are Markdown
    printf ' The rest is the fixed cost of a run, %s processes besides egress-snat itself (starting one here: `iptables-%s --version` %s, `egress-snat --version` %s, medians), and egress-snat'"'"'s own work in Go: the no-op apply, which writes nothing, takes %s (CPU %s).\n' \
      "$(awk -v b="$b" '$1 == b && $2 == "apply" && $3 == 10000 { print $4 }' "$WORK/res/procs.tsv")" "$b" \
      "$(fmt_s "$(med exec "$b" 0)")" "$(fmt_s "$(med gostart "$b" 0)")" "$(fmt_s "$o")" "$(fmt_s "$(cpumed noop "$b" 10000)")"
  done
  if ((pbig > 10000)); then
    for b in $BACKENDS; do
      a=$(med apply "$b" "$pbig") o=$(med noop "$b" "$pbig") f=$(med ipset "$b" "$pbig")
      # shellcheck disable=SC2016 # the backquotes are Markdown
      printf -- '- **%s, N = %s.** apply %s (ipset alone %s); the no-op apply takes %s, %s of a fresh one: it reads the whole set back (`ipset save`) and recomputes the whole plan, so it grows with N like an apply does.\n' \
        "$b" "$(fmt_n "$pbig")" "$(fmt_s "$a")" "$(fmt_s "$f")" "$(fmt_s "$o")" "$(fmt_pct "$(ratio "$o" "$a")")"
    done
  fi

  cat <<EOF

## 2. New-connection rate

Each setup is its own pair of namespaces joined by a veth: the host
(\`$NATURAL/24\` primary, \`$SNAT_TO/24\`, default via 192.0.2.1) and the far
side (192.0.2.1; servers on 203.0.113.1–8, TCP ports $PORTS, \`benchconn
serve\`). The far side answers every connection with the source address it
saw, and every connection of every run must come from \`$SNAT_TO\` or the
run fails, so each number also proves the SNAT happened. The load is
\`benchconn load\` in the host namespace: $CONC workers open short TCP
connections for ${SECS} s, round-robin over the 8 × 16 server address:port
pairs (so one SNAT address never runs short of 5-tuples), read the one-line
answer and close with SO_LINGER 0 (no TIME_WAIT piles up). The host's
conntrack table is flushed (\`conntrack -F\`) before every run.

- **set N**: \`egress-snat apply\` of N destinations: N−1 generated ones as
  in section 1, plus the servers' prefix \`$SERVER_NET\`. With N = 1 that is
  one plain rule; from 8 destinations on, one rule with an ipset match.
- **linear N**: a raw \`iptables-restore\` of the same N destinations as N
  rules, the servers' prefix **last**, so every new connection walks the
  whole chain. With N = 1 it is the same single rule as set 1 (without the
  comment match), so set 1 against linear 1 shows the noise.

All setups of both backends exist at once. Each of the $ROUNDS rounds runs
every setup once, in an order rotated from round to round. "vs N = $(fmt_n "$csmall")"
is the median over the rounds of the rate divided by the same round's
N = $(fmt_n "$csmall") rate of the same kind, which cancels slow drifts of
the background load.

EOF
  echo "| backend | setup | N | median rate | range | vs N = $(fmt_n "$csmall") | set / linear |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  for b in $BACKENDS; do
    for kind in set linear; do
      for n in $CONN_N; do
        m=$(cmed "$b" "$kind" "$n")
        sl=""
        [[ $kind == set ]] && sl=$(fmt_x "$(pmed "$b" set "$n" linear "$n")")
        printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$b" "$kind" "$(fmt_n "$n")" "$(fmt_rate "$m")" "$(crange "$b" "$kind" "$n")" \
          "$(fmt_pct "$(pmed "$b" "$kind" "$n" "$kind" "$csmall")")" "$sl"
      done
    done
  done
  echo
  echo "Installing each setup (one \`egress-snat apply\` or \`iptables-restore\`, timed with \`ip netns exec\`):"
  echo
  awk -F'|' '{ printf "- %s %s N = %s: %s ms (%s)\n", $1, $2, $3, $4, $5 }' "$WORK/res/setup.tsv"
  echo
  echo "Host conntrack entries from the check runs (setup 1): original source the natural address, reply to the SNAT address:"
  echo
  echo '```'
  cat "$WORK/res/conntrack-sample.txt"
  echo '```'
  echo
  echo "Every run (rate; connections; errors; the sources the far side saw, with counts):"
  echo
  echo '```'
  awk '{ printf "round %s  %-6s %-6s N=%-6s %8.0f/s  %6s conns  %s errors  %s\n", $4, $1, $2, $3, $5, $6, $7, $8 }' "$WORK/res/conn.tsv" | sort -s -k2,2n
  echo '```'

  cat <<EOF

## Commands

\`make bench\` runs \`bash scripts/bench.sh\`. With W a temporary work
directory (deleted afterwards) and B each backend of: $BACKENDS:

    go build -o W/egress-snat ./cmd/egress-snat
    go build -o W/benchconn ./scripts/benchconn
    benchconn gen -n N > dst-N.txt            # -format linear: the rules of linear-N.rules
    ip netns exec PROG bash scripts/bench.sh __prog B W    # the timed part, in the namespace:
      egress-snat --iptables-backend B clear                       # untimed
      egress-snat --iptables-backend B apply -f apply-N.yaml       # apply
      egress-snat --iptables-backend B apply -f apply-N.yaml       # no-op
      iptables-B-restore --noflush linear-N.rules                  # raw
      ipset restore -f ipset-N.txt                                 # ipset alone
      benchconn loop /usr/sbin/iptables-B loop-N.txt               # go-iptables loop
      strace -f -ff -qq -e trace=execve -e signal=none -o W/strace/t egress-snat --iptables-backend B apply -f apply-N.yaml
    ip netns exec FAR benchconn serve -ports $PORTS
    ip netns exec HOST egress-snat --iptables-backend B apply -f capply-N.yaml   # or: iptables-B-restore --noflush clinear-N.rules
    ip netns exec HOST conntrack -F
    ip netns exec HOST benchconn load -addrs $SERVERS -ports $PORTS -duration ${SECS}s -conc $CONC -want $SNAT_TO

Knobs (environment; see the head of \`scripts/bench.sh\`): BENCH_PROG_N,
BENCH_CONN_N, BENCH_BACKENDS, BENCH_RUNS, BENCH_RUNS_SLOW, BENCH_LOOP_N,
BENCH_LOOP_RUNS_SLOW, BENCH_ROUNDS, BENCH_SECS, BENCH_CONC. This run:
PROG_N="$PROG_N", CONN_N="$CONN_N", BACKENDS="$BACKENDS", RUNS=$RUNS,
RUNS_SLOW=$RUNS_SLOW, LOOP_N="$LOOP_N", LOOP_RUNS_SLOW=$LOOP_RUNS_SLOW,
ROUNDS=$ROUNDS, SECS=$SECS, CONC=$CONC.
EOF
} >"$tmp"

mkdir -p "$(dirname "$OUT")"
cp "$tmp" "$OUT"
say "wrote $OUT (${TOTAL} s)"
