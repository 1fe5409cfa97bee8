#!/usr/bin/env bash
# reliability.sh: the full-size reliability runs (issue 5) and their report.
#
# Runs, on each backend (both iptables flavours and nftables), the namespace tests of the reliability
# proofs at full size (1000 random sequences with foreign rules, 100 kills
# during apply, 20 rounds of drift under watch, 10 rounds of 20 concurrent
# writers, the bad-input corpus), then every fuzz target (scripts/fuzz.sh),
# and writes the figures into docs/RELIABILITY.md, between the
# "figures:begin" and "figures:end" markers (the prose around them is kept).
#
# As root (the tests build network namespaces; the root namespace is never
# touched). Takes about 30 minutes. Environment:
#   BACKENDS   backends to run on (default "auto legacy nftables"; auto is
#              what the host's iptables uses, nftables the native backend)
#   SEQUENCES KILLS DRIFT_ROUNDS CONCURRENCY_ROUNDS MODEL_SEQUENCES
#   NEIGHBOUR_ROUNDS
#              sizes (1000 100 20 10 200 10)
#   FUZZTIME   per fuzz target (default 2m)
#   REPORT     the report to update (default docs/RELIABILITY.md)
#   LOGDIR     where the full test and fuzz logs are kept (default
#              /tmp/egress-snat-reliability)
# Exits non-zero if any run failed; the report then says which.
# The report's cell functions (seqs, kills, ... and fig, ms under them) are
# called indirectly, through row "$@", which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin
BACKENDS=${BACKENDS:-auto legacy nftables}
SEQUENCES=${SEQUENCES:-1000}
KILLS=${KILLS:-100}
DRIFT_ROUNDS=${DRIFT_ROUNDS:-20}
CONCURRENCY_ROUNDS=${CONCURRENCY_ROUNDS:-10}
FUZZTIME=${FUZZTIME:-2m}
REPORT=${REPORT:-docs/RELIABILITY.md}
LOGDIR=${LOGDIR:-/tmp/egress-snat-reliability}
MODEL_SEQUENCES=${MODEL_SEQUENCES:-200}
NEIGHBOUR_ROUNDS=${NEIGHBOUR_ROUNDS:-10}
TESTS='^Test(DriftWatchRepairs|CrashDuringApply|CrashDuringInPlaceChange|ConcurrentWriters|Reliability.*|ForeignRulesRandomSequences|RandomSequencesAgainstAModel|BadInputCorpus)$'
# The commit measured, read before the report is written (which would make
# the tree dirty).
COMMIT=$(git describe --always --dirty 2>/dev/null || echo unknown)

[[ $(id -u) -eq 0 ]] || { echo "reliability: run as root (the tests build network namespaces)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$LOGDIR"
figures=$work/figures
fuzz=$work/fuzz
: >"$figures"
: >"$fuzz"
failed=0
declare -A status took

for b in $BACKENDS; do
  env=(EGRESS_SNAT_SEQUENCES="$SEQUENCES" EGRESS_SNAT_KILLS="$KILLS"
       EGRESS_SNAT_DRIFT_ROUNDS="$DRIFT_ROUNDS" EGRESS_SNAT_CONCURRENCY_ROUNDS="$CONCURRENCY_ROUNDS"
       EGRESS_SNAT_MODEL_SEQUENCES="$MODEL_SEQUENCES" EGRESS_SNAT_NEIGHBOUR_ROUNDS="$NEIGHBOUR_ROUNDS"
       EGRESS_SNAT_FIGURES="$figures")
  case $b in
  auto) ;;
  nftables) env+=(EGRESS_SNAT_BACKEND=nftables) ;;
  *) env+=(EGRESS_SNAT_IPTABLES="$b") ;;
  esac
  echo "== reliability tests, backend $b =="
  start=$SECONDS
  if env "${env[@]}" go test -count=1 -timeout 120m ./cmd/egress-snat -run "$TESTS" -v >"$LOGDIR/test-$b.log" 2>&1; then
    status[$b]=passed
  else
    status[$b]=FAILED
    failed=1
    grep -E -- '--- FAIL|_test.go:[0-9]+:' "$LOGDIR/test-$b.log" | grep -v 'figure \|random seed' | tail -40
  fi
  took[$b]=$(( SECONDS - start ))
  grep -E '^(--- |ok|FAIL)|random seed' "$LOGDIR/test-$b.log"
  echo "backend $b: ${status[$b]} in ${took[$b]}s (log: $LOGDIR/test-$b.log)"
done

echo "== fuzz, $FUZZTIME per target =="
fuzzstart=$SECONDS
FUZZTIME=$FUZZTIME FUZZ_SUMMARY=$fuzz bash scripts/fuzz.sh >"$LOGDIR/fuzz.log" 2>&1 || failed=1
fuzztook=$(( SECONDS - fuzzstart ))
grep 'fuzz summary' "$LOGDIR/fuzz.log"

# fig BACKEND NAME: a figure the tests recorded ("-" if none).
fig() { awk -v k="$1.$2" '$1 == k { v = $2 } END { print (v == "" ? "-" : v) }' "$figures"; }
ms() {
  local v
  v=$(fig "$1" "$2")
  if [[ $v == - ]]; then echo -; else awk -v v="$v" 'BEGIN { printf "%.2f s", v / 1000 }'; fi
}

block=$work/block
{
  echo "<!-- figures:begin (written by scripts/reliability.sh; do not edit by hand) -->"
  echo
  echo "Measured at commit **$COMMIT**, backends $BACKENDS, on $(date -u '+%Y-%m-%d %H:%M UTC'): Linux $(uname -r), $(iptables --version 2>/dev/null), $(ipset --version 2>/dev/null | head -1), $(go version | awk '{print $3}')."
  echo
  echo "A figure is \"-\" when its test failed before recording it; counts are of runs that passed unless a row says otherwise."
  echo
  cols="| figure |"
  sep="|---|"
  for b in $BACKENDS; do
    name=$b
    [[ $b == auto ]] && name="$(iptables --version | grep -q nf_tables && echo nft || echo legacy) (host default)"
    cols+=" $name |"
    sep+="---:|"
  done
  echo "$cols"
  echo "$sep"
  row() { # row LABEL CMD...: one cell per backend from "CMD key"
    local label=$1; shift
    local line="| $label |"
    for b in $BACKENDS; do
      local k=$b
      [[ $b == auto ]] && k=$(iptables --version | grep -q nf_tables && echo nft || echo legacy)
      line+=" $("$@" "$k") |"
    done
    echo "$line"
  }
  seqs() { echo "$(fig "$1" sequences) ($(fig "$1" sequence_steps) steps)"; }
  model() { echo "$(fig "$1" model_sequences) ($(fig "$1" model_steps) steps, $(fig "$1" model_probes) far-side probes)"; }
  kills() { echo "$(fig "$1" kills_during_run) of $(fig "$1" kills); during an iptables-restore/ipset/ip child: $(fig "$1" kills_during_write)"; }
  apart() { echo "old $(fig "$1" kills_left_old), new $(fig "$1" kills_left_new), families apart $(fig "$1" kills_families_apart)"; }
  inplace() { echo "$(fig "$1" inplace_kills_during_ipset) of $(fig "$1" inplace_kills) during the ipset child; $(fig "$1" inplace_kills_left_between) left the set between the two, no destination of both ever missing"; }
  events() { echo "$(fig "$1" drift_events) ($(fig "$1" watch_applies) applies)"; }
  recon() { echo "$(ms "$1" reconverge_median_ms) / $(ms "$1" reconverge_max_ms)"; }
  seen() { echo "$(ms "$1" reconverge_seen_median_ms) / $(ms "$1" reconverge_seen_max_ms)"; }
  writers() { echo "$(fig "$1" concurrent_writers_checked) of $(fig "$1" concurrent_writers); $(fig "$1" concurrent_lock_timeouts) timed out on the lock (exit 1, not in the order)"; }
  bad() { echo "$(fig "$1" bad_inputs_passed) passed of $(fig "$1" bad_inputs) runs, $(fig "$1" bad_inputs_failed) failed"; }
  row "random sequences with foreign rules, all ended by clear" seqs
  row "random sequences against an independent model, far side probed every step" model
  row "kill -9 during apply: landed while it ran" kills
  row "state after a kill: each family old or new, never a mixture" apart
  row "kill -9 during a change in place (one set of 20,000, 8,000 changed)" inplace
  row "drift events handled by watch" events
  row "time to reconverge, median / max (drift to logged repair)" recon
  row "... until check -f saw it, median / max" seen
  row "concurrent writers in a linearizable order" writers
  row "bad-input runs: exit 2 naming the value, ruleset unchanged" bad
  line="| result |"
  for b in $BACKENDS; do line+=" ${status[$b]} in ${took[$b]} s |"; done
  echo "$line"
  echo
  echo "### Neighbours"
  echo
  echo "TestReliabilityNeighbours, $NEIGHBOUR_ROUNDS rounds per backend: live TCP connections and UDP flows (IPv4 and IPv6) through a rule that goes by unset, clear, rotate back to the natural source and apply of a file without it, asked 0.2 to 1 s later; clear once they ended; foreign ip rules at random priorities (ours among them, and none) through random writes; a foreign ip rule ahead of a route of ours."
  echo
  echo "$cols"
  echo "$sep"
  flowsk() { echo "$(fig "$1" neighbour_flows_kept) of $(fig "$1" neighbour_flows)"; }
  exactc() { echo "$(fig "$1" neighbour_clear_exact) of $(fig "$1" neighbour_clears)"; }
  foreignk() { echo "$(fig "$1" neighbour_foreign_kept) of $(fig "$1" neighbour_foreign_runs) writes"; }
  aheads() { echo "$(fig "$1" neighbour_ahead_seen) of $(fig "$1" neighbour_ahead)"; }
  row "live flows kept, with their source, after their rule went" flowsk
  row "clear after they ended: iptables, ipsets, nft, ip rules and routes as before" exactc
  row "foreign ip rules kept byte for byte, every write exiting 0" foreignk
  row "a foreign ip rule ahead reported by check (ip-rule-ahead) and verify (DIFFER, naming it)" aheads
  echo
  echo "Fuzzing, $FUZZTIME per target ($fuzztook s in all):"
  echo
  echo "| target | inputs tried | result |"
  echo "|---|---:|---|"
  while read -r name execs res; do
    echo "| \`$name\` | $execs | $res |"
  done <"$fuzz"
  echo
  echo "Produced by:"
  echo
  echo '    sudo bash scripts/reliability.sh'
  echo
  echo "which runs, for each backend (\`EGRESS_SNAT_IPTABLES=legacy\` for legacy, \`EGRESS_SNAT_BACKEND=nftables\` for nftables):"
  echo
  echo "    EGRESS_SNAT_SEQUENCES=$SEQUENCES EGRESS_SNAT_KILLS=$KILLS EGRESS_SNAT_DRIFT_ROUNDS=$DRIFT_ROUNDS \\"
  echo "    EGRESS_SNAT_CONCURRENCY_ROUNDS=$CONCURRENCY_ROUNDS EGRESS_SNAT_MODEL_SEQUENCES=$MODEL_SEQUENCES EGRESS_SNAT_NEIGHBOUR_ROUNDS=$NEIGHBOUR_ROUNDS \\"
  echo "    go test -count=1 -timeout 120m \\"
  echo "        ./cmd/egress-snat -run '$TESTS' -v"
  echo "    FUZZTIME=$FUZZTIME bash scripts/fuzz.sh"
  echo
  echo "<!-- figures:end -->"
} >"$block"

mkdir -p "$(dirname "$REPORT")"
if [[ -f $REPORT ]] && grep -q '<!-- figures:begin' "$REPORT" && grep -q '<!-- figures:end' "$REPORT"; then
  awk -v block="$block" '
    /<!-- figures:begin/ { while ((getline line < block) > 0) print line; skip = 1; next }
    /<!-- figures:end/   { skip = 0; next }
    !skip { print }
  ' "$REPORT" >"$work/report" && cp "$work/report" "$REPORT"
else
  { echo "# Reliability"; echo; cat "$block"; } >"$REPORT"
fi
echo "== wrote $REPORT =="
exit "$failed"
