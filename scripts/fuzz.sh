#!/usr/bin/env bash
# fuzz.sh: what `make fuzz` runs. Runs every fuzz target for a bounded time:
#
#   backend/iptables FuzzParseSave  iptables-save + ipset save text -> ParseSave/ParseSets;
#                         what it reads as ours survives Render and a re-read
#   backend/iptables FuzzParseSets  ipset save text -> ParseSets -> SetRestorePayload
#   config FuzzDecode     desired-state YAML -> config.Decode; what it accepts
#                         is well formed and survives being written back
#   cmd    FuzzCLI        argument vectors -> the egress-snat app, the kernel
#                         behind fakes: every run ends, exits 0, 1 or 2, and
#                         every iptables-restore, ipset and ip -batch input is of the
#                         payload grammar (cmd/egress-snat/fuzz_cli_test.go)
#   cmd    FuzzAPI        bytes on the daemon's socket -> its connection code and
#                         dispatch, the kernel behind fakes: every connection is
#                         answered well-formed or cut, never a panic or a hang;
#                         a malformed request runs nothing (fuzz_api_test.go)
#
# Seeds are in the tests and under */testdata/fuzz/; new interesting inputs
# go to Go's fuzz cache, and a failing input is written to testdata/fuzz so
# that plain `go test` replays it from then on.
#
# Environment:
#   FUZZTIME      how long each target runs (default 30s; go test -fuzztime)
#   FUZZMINIMIZE  how long to minimize each new input (default 5s)
#   FUZZ_SUMMARY  file to append "target execs" lines to (scripts/reliability.sh)
# Needs no root and no network namespace.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH=/usr/local/go/bin:$PATH
FUZZTIME=${FUZZTIME:-30s}
FUZZMINIMIZE=${FUZZMINIMIZE:-5s}

targets=(
  "./backend/iptables FuzzParseSave"
  "./backend/iptables FuzzParseSets"
  "./config FuzzDecode"
  "./cmd/egress-snat FuzzCLI"
  "./cmd/egress-snat FuzzAPI"
)

failed=0
for t in "${targets[@]}"; do
  read -r pkg name <<<"$t"
  echo "== $name ($pkg) for $FUZZTIME =="
  log=$(mktemp)
  if go test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime "$FUZZMINIMIZE" "$pkg" 2>&1 | tee "$log"; then
    status=ok
  else
    status=FAILED
    failed=1
  fi
  # The last progress line holds the total: "fuzz: elapsed: 30s, execs: 123 (4/sec), ..."
  execs=$(grep -o 'execs: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  rm -f "$log"
  echo "fuzz summary: $name execs ${execs:-0} $status"
  if [[ -n ${FUZZ_SUMMARY:-} ]]; then
    echo "$name ${execs:-0} $status" >>"$FUZZ_SUMMARY"
  fi
done
exit "$failed"
