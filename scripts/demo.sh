#!/usr/bin/env bash
# demo.sh: what `make demo` runs. As root on a fresh Debian machine it shows
# the article's problem and egress-snat's answer in a throwaway namespace lab
# (scripts/lab.sh): the host has 192.0.2.250 (primary), .22 and .23 on one
# subnet, and a probe on the far side reports the source it saw.
# The root namespace is never touched. Exits non-zero if the far side did
# not see what it should.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_SH=$ROOT/scripts/lab.sh
export LAB=${LAB:-esdemo$$}
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin
failed=0

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s ==%s\n' "$bold" "$*" "$plain"; }
# es runs egress-snat inside the lab's host namespace, echoing the command.
es() {
  printf '$ egress-snat %s\n' "$*"
  bash "$LAB_SH" exec host "$BIN" "$@"
}
seen() { bash "$LAB_SH" seen "$1" 2>/dev/null || true; }
# expect DST WANT: check the source the far side sees for a new connection.
expect() {
  local got
  got=$(seen "$1")
  if [[ $got == "$2" ]]; then
    printf '  ok    %-18s sees %s\n' "$1" "$got"
  else
    printf '  FAIL  %-18s sees %s, want %s\n' "$1" "${got:-nothing}" "$2"
    failed=1
  fi
}
# ruleset prints the host namespace's iptables, ip6tables and ipset state,
# without comments and packet counters, for before/after comparison.
ruleset() {
  {
    bash "$LAB_SH" exec host iptables-save
    bash "$LAB_SH" exec host ip6tables-save
    bash "$LAB_SH" exec host ipset list -n | sed 's/^/ipset /'
  } | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]/[0:0]/'
}

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local rc=$?
  step "7. tear the lab down"
  bash "$LAB_SH" down || rc=1
  if [[ -n ${TMP:-} ]]; then rm -rf "$TMP"; fi
  if ((rc)); then echo "demo: FAILED" >&2; else echo "demo: all checks passed"; fi
  exit "$rc"
}

[[ $(id -u) -eq 0 ]] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }

step "1. system packages"
bash "$LAB_SH" deps
command -v go >/dev/null || { echo "demo: go not found: install Go (see go.mod) into /usr/local/go" >&2; exit 1; }

# Never adopt (and so never tear down) a lab someone else brought up.
if bash "$LAB_SH" status >/dev/null; then
  echo "demo: lab $LAB already exists; pick another LAB=" >&2
  exit 1
fi
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
TMP=$(mktemp -d)
BIN=$TMP/egress-snat
step "2. build egress-snat and bring the lab up"
echo "+ go build -o $BIN ./cmd/egress-snat"
(cd "$ROOT" && go build -trimpath -o "$BIN" ./cmd/egress-snat)
bash "$LAB_SH" up
bash "$LAB_SH" exec host ip -br addr show dev eth0
# A foreign rule, standing in for Docker or libvirt: egress-snat must leave it
# alone, and clear must give back exactly this ruleset.
bash "$LAB_SH" exec host iptables -t nat -A POSTROUTING -s 10.66.0.0/16 -j MASQUERADE
bash "$LAB_SH" exec host ip6tables -t nat -A POSTROUTING -s fd00:66::/64 -j MASQUERADE
before=$(ruleset)
echo "far side before any rule:"
expect 198.51.100.4 192.0.2.250
expect 203.0.113.7 192.0.2.250
natural6=$(seen 2001:db8:ffff::4)
echo "  IPv6: 2001:db8:ffff::4 sees ${natural6:-nothing}"
[[ -n $natural6 ]] || failed=1

step "3. which source does the kernel pick, and why?"
es explain --dst 198.51.100.4

step "4. make connections to 198.51.100.4 leave from 192.0.2.23"
es set --to 192.0.2.23 --dst 198.51.100.4

step "5. what the far side sees now"
expect 198.51.100.4 192.0.2.23
echo "other destinations keep the natural source:"
expect 203.0.113.7 192.0.2.250
echo
es set --to 2001:db8::22 --dst 2001:db8:ffff::4
expect 2001:db8:ffff::4 2001:db8::22
echo
es list
echo
echo "the chains, as iptables and ip6tables show them:"
bash "$LAB_SH" exec host iptables -t nat -S EGRESS-SNAT
bash "$LAB_SH" exec host ip6tables -t nat -S EGRESS-SNAT
echo "the foreign rule is still there, after our jump:"
bash "$LAB_SH" exec host iptables -t nat -S POSTROUTING

step "6. clear: back to the kernel's natural choice"
es clear
expect 198.51.100.4 192.0.2.250
expect 2001:db8:ffff::4 "$natural6"
if [[ $(ruleset) == "$before" ]]; then
  echo "  ok    iptables-save, ip6tables-save and ipset are back to what they were"
else
  echo "  FAIL  the ruleset differs from before the demo:"
  diff <(echo "$before") <(ruleset) || true
  failed=1
fi

exit "$failed"
