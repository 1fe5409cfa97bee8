#!/usr/bin/env bash
# lab.sh: a throwaway two-namespace network mirroring the article's scenario
# (one host with several addresses on one subnet, a gateway, remote hosts),
# in documentation ranges. The root namespace is never touched: the veth pair
# is created directly inside the lab namespaces.
#
#   "$LAB-host" eth0                      "$LAB-gw" eth0
#     192.0.2.250/24 (primary)              192.0.2.1/24
#     192.0.2.22/24, 192.0.2.23/24          198.18.0.1/15
#     198.18.0.10/15 (a second subnet)      2001:db8::1/64
#     2001:db8::250/64, ::22, ::23        "$LAB-gw" lo: the remote hosts
#     default via 192.0.2.1                 198.51.100.4/32, 203.0.113.7/32
#     default via 2001:db8::1               2001:db8:ffff::4/128
#
# The remote hosts live on the gateway itself, so the address its probe
# server (TCP port 7000, scripts/probe) reports is exactly the source that
# left the host, after any SNAT.
#
# Usage (as root):
#   scripts/lab.sh up                  build the probe, create the lab, start the probe
#   scripts/lab.sh down                stop the probe, delete the lab (idempotent)
#   scripts/lab.sh exec host|gw CMD... run CMD inside the host or gateway namespace
#   scripts/lab.sh seen ADDR           print the source the far side sees from the host
#   scripts/lab.sh status              show the lab's namespaces; exit 0 if any exists
#   scripts/lab.sh deps [CMD=PKG...]   apt-get install what the lab and the demo need, if missing
#   scripts/lab.sh test-deps [CMD=PKG...]  the same for everything the tests use (make test, CI)
#   scripts/lab.sh deps|test-deps --list   print the CMD=PKG pairs checked, install nothing
#
# Environment: LAB (default esdemo) prefixes every name, so labs never collide;
# LAB_STATE (default /run/$LAB-lab) holds the probe binary, its pid and log.
set -euo pipefail

LAB=${LAB:-esdemo}
[[ $LAB =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$ ]] || { echo "lab: LAB=$LAB is not a usable name" >&2; exit 2; }
HOST=$LAB-host
GW=$LAB-gw
STATE=${LAB_STATE:-/run/$LAB-lab}
PORT=7000
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin

die() { echo "lab: $*" >&2; exit 1; }
say() { echo "lab: $*"; }
exists() { [[ -e /run/netns/$1 ]]; }
need_root() { [[ $(id -u) -eq 0 ]] || die "run as root (it creates network namespaces)"; }

# hostport ADDR prints ADDR:PORT, bracketing IPv6.
hostport() { if [[ $1 == *:* ]]; then echo "[$1]:$PORT"; else echo "$1:$PORT"; fi; }

seen() { ip netns exec "$HOST" "$STATE/probe" -dial "$(hostport "$1")"; }

up() {
  need_root
  if exists "$HOST" || exists "$GW"; then
    die "lab $LAB is already up (scripts/lab.sh down first, or pick another LAB=)"
  fi
  command -v go >/dev/null || die "go not found (install Go into /usr/local/go)"
  # From here on, a failure removes whatever was built.
  trap 'rc=$?; if ((rc)); then echo "lab: up failed, tearing down" >&2; down >/dev/null 2>&1 || true; fi' EXIT

  mkdir -p "$STATE"
  say "building the probe into $STATE/probe"
  (cd "$ROOT" && go build -o "$STATE/probe" ./scripts/probe)

  say "creating namespaces $HOST and $GW"
  ip netns add "$HOST"
  ip netns add "$GW"
  for ns in "$HOST" "$GW"; do
    # New interfaces in the namespace skip IPv6 duplicate address detection,
    # so link-local addresses are usable at once too.
    ip netns exec "$ns" sh -c 'echo 0 >/proc/sys/net/ipv6/conf/default/accept_dad'
  done
  ip -n "$HOST" link add eth0 type veth peer name eth0 netns "$GW"
  for ns in "$HOST" "$GW"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done

  local a
  for a in 192.0.2.250/24 192.0.2.22/24 192.0.2.23/24 198.18.0.10/15; do
    ip -n "$HOST" addr add "$a" dev eth0
  done
  # Added in reverse: when IPv6 source selection ties, Linux prefers the
  # address added last, and ::250 should be the natural one, like .250.
  for a in 2001:db8::23/64 2001:db8::22/64 2001:db8::250/64; do
    ip -n "$HOST" -6 addr add "$a" dev eth0 nodad
  done
  ip -n "$HOST" route add default via 192.0.2.1
  ip -n "$HOST" -6 route add default via 2001:db8::1

  ip -n "$GW" addr add 192.0.2.1/24 dev eth0
  ip -n "$GW" addr add 198.18.0.1/15 dev eth0
  ip -n "$GW" -6 addr add 2001:db8::1/64 dev eth0 nodad
  for a in 198.51.100.4/32 203.0.113.7/32; do ip -n "$GW" addr add "$a" dev lo; done
  ip -n "$GW" -6 addr add 2001:db8:ffff::4/128 dev lo

  say "starting the probe in $GW on TCP port $PORT"
  ip netns exec "$GW" "$STATE/probe" -listen-port "$PORT" </dev/null >"$STATE/probe.log" 2>&1 &
  echo $! >"$STATE/probe.pid"
  local _
  for _ in $(seq 50); do
    if seen 198.51.100.4 >/dev/null 2>&1 && seen 2001:db8:ffff::4 >/dev/null 2>&1; then
      trap - EXIT
      say "lab $LAB is up: namespaces $HOST and $GW"
      return 0
    fi
    sleep 0.1
  done
  cat "$STATE/probe.log" >&2 || true
  die "the probe did not answer on 198.51.100.4 and 2001:db8:ffff::4 port $PORT"
}

# is_probe PID: does PID still run this lab's probe binary? (A pid can be
# reused; an exited process has no exe link.)
is_probe() { [[ $(readlink "/proc/$1/exe" 2>/dev/null) == "$STATE/probe"* ]]; }

# kill_probe stops the probe of this lab by pid, and any other copy of our
# binary left in the gateway namespace, and waits until they are gone.
kill_probe() {
  local pids=() pid _
  [[ -f $STATE/probe.pid ]] && pids+=("$(cat "$STATE/probe.pid")")
  exists "$GW" && mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$GW" 2>/dev/null || true)
  for pid in "${pids[@]}"; do
    if ! [[ $pid =~ ^[0-9]+$ ]] || ! is_probe "$pid"; then continue; fi
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do is_probe "$pid" || break; sleep 0.05; done
    if is_probe "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}

down() {
  need_root
  kill_probe
  local ns
  for ns in "$HOST" "$GW"; do
    if exists "$ns"; then
      ip netns del "$ns"
      say "deleted namespace $ns"
    fi
  done
  rm -rf "$STATE"
}

status() {
  local ns any=1
  for ns in "$HOST" "$GW"; do
    if exists "$ns"; then echo "$ns: present"; any=0; else echo "$ns: absent"; fi
  done
  return "$any"
}

# The commands the lab and the demo run, each with the Debian package that
# has it: iptables and ip6tables, ipset, and ip (netns, link, addr, route).
# Nothing else: the demo needs no daemon, so it installs none.
DEMO_DEPS=(iptables=iptables ip6tables=iptables ipset=ipset ip=iproute2)
# What the tests use besides: nft and conntrack (drift and stats tests),
# nsenter and setpriv (cgroup and uid tests), tcpdump (lab.Arrivals);
# dockerd, docker and a static busybox for the Docker tests; firewalld and
# dbus-daemon for the firewalld tests, which run both inside a lab namespace
# on a private bus (internal/lab/firewalld.go); zsh and fish, whose
# completion scripts the tests run; wg-quick and wireguard-go for
# the test of a real wg-quick's ip rules (the kernel here has no wireguard
# module, so wg-quick runs wireguard-go); keepalived and conntrackd for the
# gateway pair's tests (internal/lab/ha.go runs them in the pair's
# namespaces).
TEST_DEPS=("${DEMO_DEPS[@]}" nft=nftables conntrack=conntrack nsenter=util-linux setpriv=util-linux
  dockerd=docker.io docker=docker.io busybox=busybox-static tcpdump=tcpdump
  firewalld=firewalld firewall-cmd=firewalld dbus-daemon=dbus zsh=zsh fish=fish
  wg-quick=wireguard-tools wireguard-go=wireguard-go keepalived=keepalived conntrackd=conntrackd)

# deps demo|test [--list] [CMD=PKG...] installs, with apt-get, the package of
# every command of DEMO_DEPS or TEST_DEPS that is missing, plus any CMD=PKG
# pairs given. apt-get update runs once, and only if needed. --list prints
# the pairs it would check and installs nothing.
deps() {
  local set=$1 pair pkg missing=() pairs=()
  shift
  case $set in
    demo) pairs=("${DEMO_DEPS[@]}") ;;
    test) pairs=("${TEST_DEPS[@]}") ;;
  esac
  if [[ ${1:-} == --list ]]; then
    shift
    printf '%s\n' "${pairs[@]}" "$@"
    return 0
  fi
  for pair in "${pairs[@]}" "$@"; do
    pkg=${pair#*=}
    command -v "${pair%%=*}" >/dev/null || [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
  done
  # The Docker tests' image is /bin/busybox alone, so it must be the static
  # one; Debian's busybox package is dynamically linked.
  if [[ $set == test ]] && command -v dpkg-query >/dev/null && [[ " ${missing[*]} " != *" busybox-static "* ]] &&
    [[ $(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null) != *" installed" ]]; then
    missing+=(busybox-static)
  fi
  if ((${#missing[@]} == 0)); then
    say "system packages: every needed command is present"
    return 0
  fi
  need_root
  command -v apt-get >/dev/null || die "missing packages ${missing[*]}, and there is no apt-get: install them by hand"
  export DEBIAN_FRONTEND=noninteractive
  no_daemons
  say "+ apt-get update"
  apt-get update -qq
  say "+ apt-get install ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [[ " ${missing[*]} " == *" docker.io "* ]]; then
    # Installed with its units enabled for the next boot; the tests start
    # their own dockerd inside a namespace and want none in the root one.
    if command -v systemctl >/dev/null; then
      systemctl disable docker.service docker.socket containerd.service >/dev/null 2>&1 || true
    fi
    if pgrep -x dockerd >/dev/null || pgrep -x containerd >/dev/null; then
      die "a dockerd or containerd runs in the root namespace after installing docker.io (policy-rc.d did not hold)"
    fi
  fi
  if [[ " ${missing[*]} " == *" firewalld "* ]]; then
    # Likewise: the firewalld tests start their own, in a lab namespace.
    if command -v systemctl >/dev/null; then
      systemctl disable firewalld.service >/dev/null 2>&1 || true
    fi
    if pgrep -x firewalld >/dev/null; then
      die "a firewalld runs in the root namespace after installing firewalld (policy-rc.d did not hold)"
    fi
  fi
  local d
  for d in keepalived conntrackd; do
    [[ " ${missing[*]} " == *" $d "* ]] || continue
    # Likewise: the HA tests start their own, in the gateways' namespaces.
    if command -v systemctl >/dev/null; then
      systemctl disable "$d.service" >/dev/null 2>&1 || true
    fi
    if pgrep -x "$d" >/dev/null; then
      die "a $d runs in the root namespace after installing $d (policy-rc.d did not hold)"
    fi
  done
}

# no_daemons makes invoke-rc.d refuse to start any service until the script
# exits, so that packages shipping daemons (docker.io, containerd) do not
# start one in the root namespace, whose firewall Docker would rewrite. An
# existing policy-rc.d is put back afterwards.
no_daemons() {
  local p=/usr/sbin/policy-rc.d saved=/usr/sbin/policy-rc.d.lab-saved
  if [[ -e $p ]]; then mv "$p" "$saved"; fi
  trap 'rm -f '"$p"'; if [[ -e '"$saved"' ]]; then mv '"$saved"' '"$p"'; fi' EXIT
  printf '#!/bin/sh\n# scripts/lab.sh deps: no service starts while packages are installed\nexit 101\n' >"$p"
  chmod 755 "$p"
}

cmd=${1:-}
(($#)) && shift
case $cmd in
  up) up ;;
  down) down ;;
  status) status ;;
  deps) deps demo "$@" ;;
  test-deps) deps test "$@" ;;
  seen)
    (($# == 1)) || die "usage: lab.sh seen ADDR"
    seen "$1"
    ;;
  exec)
    (($# >= 2)) || die "usage: lab.sh exec host|gw CMD [ARG...]"
    case $1 in
      host) ns=$HOST ;;
      gw) ns=$GW ;;
      *) die "exec: want host or gw, not $1" ;;
    esac
    shift
    exists "$ns" || die "lab $LAB is not up (scripts/lab.sh up)"
    exec ip netns exec "$ns" "$@"
    ;;
  *)
    sed -n '/^# Usage/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ $cmd == help || $cmd == -h || $cmd == --help ]] || exit 2
    ;;
esac
