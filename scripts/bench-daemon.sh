#!/usr/bin/env bash
# bench-daemon.sh: the rows of issue 21 (make bench-daemon): at MID destinations, each command run on its
# own and then sent to a running `watch`, which serves them on its socket.
# For each backend of BENCH_BACKENDS (nft: iptables-nft, legacy:
# iptables-legacy, nftables: the native one) it builds a host namespace of
# its own (esdaemon-PID-..., deleted on exit; the root namespace is never
# touched) and times, as the client sees it (wall time of the process):
#
#   set of one more destination beside MID;
#   apply -f with one destination changed (and changed back);
#   the no-op apply -f of the file in place;
#   list, and check against the permanent file (--config).
#
# With the daemon, watch follows the permanent file (the systemd unit's
# --config), and the commands are sent to it. A command that changes the
# kernel alone (set, apply -f of another file) is undone by watch's next
# canary, as when a one-shot run makes it: each is followed by a pause of
# DAEMON_PAUSE seconds so that the undo is not timed with the next command.
# It prints a markdown table (medians of DAEMON_RUNS runs, and each run) on
# stdout, the watch's RSS after the runs, and where the daemon's CPU went
# (its profile, start-up apply included). A missed goal is reported,
# never an error; the script fails only when something does not work.
#
# Knobs (environment), defaults in brackets:
#   BENCH_BACKENDS  [nft nftables]   DAEMON_RUNS [5]   DAEMON_PAUSE [1.5]
#   SCALE_MID       [100000]: destinations (benchconn gen: unique /24../32s)
set -euo pipefail
export LC_ALL=C
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
# shellcheck source=scripts/benchlib.sh
source "$ROOT/scripts/benchlib.sh"

BACKENDS=${BENCH_BACKENDS:-nft nftables}
RUNS=${DAEMON_RUNS:-5}
PAUSE=${DAEMON_PAUSE:-1.5}
MID=${SCALE_MID:-100000}
NATURAL=192.0.2.250 # bench_host's addresses (benchlib.sh)
SNAT_TO=192.0.2.22

say() { echo "bench-daemon: $*" >&2; }
die() { echo "bench-daemon: $*" >&2; exit 1; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "NA"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# ---------------------------------------------------------------------------
# Inside the host namespace: `bash bench-daemon.sh __inner BACKEND WORK`.
# Results go to WORK/res.tsv as "backend how kind microseconds", how being
# alone or daemon; the watch's RSS to WORK/rss.tsv.
inner() {
  local b=$1 W=$2
  local es=("$W/egress-snat" --backend "$b" --config "$W/apply.yaml")
  cd "$W"
  tm() { # tm HOW KIND CMD...: wall time of CMD, recorded
    local how=$1 kind=$2 t0 t1
    shift 2
    t0=$EPOCHREALTIME
    "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; die "$b $how $kind failed: $*"; }
    t1=$EPOCHREALTIME
    echo "$b $how $kind $((${t1/./} - ${t0/./}))" >>"$W/res.tsv"
    say "$b $how $kind: $(((${t1/./} - ${t0/./}) / 1000)) ms"
  }
  rows() { # rows HOW: every row once, with pauses after the writes
    local how=$1
    tm "$how" set "${es[@]}" set --to "$SNAT_TO" --dst 203.0.113.200
    sleep "$PAUSE"
    "${es[@]}" unset --dst 203.0.113.200 >/dev/null # a no-op with the daemon: it undid the set
    sleep "$PAUSE"
    tm "$how" change "${es[@]}" apply -f change.yaml
    sleep "$PAUSE"
    tm "$how" change "${es[@]}" apply -f apply.yaml
    sleep "$PAUSE"
    tm "$how" noop "${es[@]}" apply -f apply.yaml
    tm "$how" list "${es[@]}" list
    tm "$how" check "${es[@]}" check
  }
  local r
  "${es[@]}" apply -f apply.yaml >/dev/null
  for ((r = 1; r <= RUNS; r++)); do EGRESS_SNAT_NO_DAEMON=1 rows alone; done

  : >"$W/watch-$b.log"
  # Its CPU profile: the commands it serves, after its start-up apply.
  EGRESS_SNAT_CPUPROFILE=$W/daemon-$b.prof "${es[@]}" watch --log-format json 2>"$W/watch-$b.log" &
  local wpid=$!
  # Serving, and its first reconcile done (a request waits for it).
  for ((r = 0; r < 600; r++)); do
    grep -q '"serving commands"' "$W/watch-$b.log" && break
    kill -0 "$wpid" 2>/dev/null || die "$b: watch exited: $(cat "$W/watch-$b.log")"
    sleep 0.1
  done
  grep -q '"serving commands"' "$W/watch-$b.log" || die "$b: watch does not serve after 60 s"
  "${es[@]}" list >/dev/null
  for ((r = 1; r <= RUNS; r++)); do rows daemon; done
  local served
  served=$(grep -c '"command served"' "$W/watch-$b.log" || true)
  ((served == 7 * RUNS + 1)) || die "$b: watch served $served commands, want $((7 * RUNS + 1)): some ran on their own"
  echo "$b $(awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$wpid/status")" >>"$W/rss.tsv"
  kill "$wpid"
  wait "$wpid" 2>/dev/null || true
  "${es[@]}" clear >/dev/null
}

case ${1:-} in
__inner) inner "$2" "$3"; exit 0 ;;
esac

# ---------------------------------------------------------------------------
# The main run.

bench_preflight
bench_deps nft=nftables
bench_start daemon
say "building egress-snat and benchconn into $WORK"
(cd "$ROOT" && go build -o "$WORK/egress-snat" ./cmd/egress-snat && go build -o "$WORK/benchconn" ./scripts/benchconn)
"$WORK/benchconn" gen -n "$MID" >"$WORK/dst.txt"
printf 'rules:\n  - to: %s\n    dst-file: dst.txt\n' "$SNAT_TO" >"$WORK/apply.yaml"
awk 'NR == 1 { print "203.0.113.100/32"; next } { print }' "$WORK/dst.txt" >"$WORK/dst-change.txt"
printf 'rules:\n  - to: %s\n    dst-file: dst-change.txt\n' "$SNAT_TO" >"$WORK/change.yaml"
: >"$WORK/res.tsv"
: >"$WORK/rss.tsv"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for b in $BACKENDS; do
  h=esdaemon-$$-$b
  bench_host "$h"
  say "backend $b in $h, $MID destinations"
  ip netns exec "$h" bash "$SELF" __inner "$b" "$WORK"
  bench_stop
done

ms() { awk -v b="$1" -v h="$2" -v k="$3" '$1 == b && $2 == h && $3 == k { print $4 / 1000 }' "$WORK/res.tsv" | median | awk '{ if ($1 == "NA") print "NA"; else printf "%.0f", $1 }'; }
runs() { awk -v b="$1" -v h="$2" -v k="$3" '$1 == b && $2 == h && $3 == k { printf "%s%.0f", sep, $4 / 1000; sep = ", " }' "$WORK/res.tsv"; }
verdict() { awk -v a="$1" -v g="$2" 'BEGIN { if (a == "NA") print "not measured"; else if (a <= g) print "**met**"; else printf "**missed**, %.1f× the goal\n", a / g }'; }
echo "At commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown), kernel $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC'),"
echo "load average $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end, on $(nproc) CPUs; medians of $RUNS runs, ms."
echo
echo "| what, $MID destinations | backend | on its own | with the daemon | goal (daemon) | result |"
echo "|---|---|---|---|---|---|"
for b in $BACKENDS; do
  for kg in "set:30:set of one more" "change:50:apply -f, one destination changed" "noop:30:no-op apply -f" "list:150:list" "check:150:check (the permanent file)"; do
    IFS=: read -r k g what <<<"$kg"
    d=$(ms "$b" daemon "$k")
    echo "| $what | $b | $(ms "$b" alone "$k") | $d | < $g | $(verdict "$d" "$g") |"
  done
  echo "| watch's RSS after the runs | $b | | $(awk -v b="$b" '$1 == b { print $2 }' "$WORK/rss.tsv") MB | < 40 MB | |"
done
echo
for b in $BACKENDS; do
  for k in set change noop list check; do
    echo "- $b $k: alone $(runs "$b" alone "$k"); daemon $(runs "$b" daemon "$k")"
  done
done
for b in $BACKENDS; do
  echo
  echo "### Where the daemon's CPU goes, $b (its whole run: start-up apply, then the commands)"
  echo
  echo '```'
  (cd "$ROOT" && go tool pprof -top -cum -nodecount=25 "$WORK/egress-snat" "$WORK/daemon-$b.prof" 2>/dev/null | sed -n '4,32p' | cut -c1-120)
  echo '```'
done
