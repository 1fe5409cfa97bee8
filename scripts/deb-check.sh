#!/usr/bin/env bash
# deb-check.sh DEB: install the Debian package for real and check it.
#   0. before the package is installed, the Ansible role in check mode
#      (--check --diff) reports that it would install it and shows the plan,
#      made with the binary unpacked from DEB, and leaves no trace;
#   1. dpkg -i DEB; the installed /usr/sbin/egress-snat, the man page and
#      the conffile are where they should be, the ha examples are what the
#      installed ha config writes from their ha.yaml, and nothing got
#      enabled;
#   2. a namespace lab (scripts/lab.sh, documentation addresses, a far-side
#      TCP server that answers with the peer's address): the installed binary
#      sets a source, the far side sees it, clear restores the rules exactly;
#   3. the Ansible role (deploy/ansible) installs the same .deb and applies
#      a desired state, twice: the second run reports changed=0;
#   4. dpkg --remove leaves the kernel's rules and the conffile alone;
#   5. dpkg --purge; no file the package listed (dpkg -L) remains.
# As root, on a machine where egress-snat is not installed (CI). The root
# namespace's network is never touched.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/local/go/bin:$PATH:/usr/sbin:/sbin
deb=${1:?usage: deb-check.sh DEB}
export LAB=${LAB:-debcheck}
lab() { bash "$ROOT/scripts/lab.sh" "$@"; }

die() { echo "deb-check: FAIL: $*" >&2; exit 1; }
say() { echo "deb-check: $*"; }

[[ $(id -u) -eq 0 ]] || die "run as root (it installs a package and builds namespaces)"
[[ -f $deb ]] || die "$deb: no such file"
if dpkg-query -W -f='${Status}' egress-snat 2>/dev/null | grep -q 'installed'; then
  die "egress-snat is already installed here; this check installs and purges it, so run it on a machine without it"
fi
for f in /usr/sbin/egress-snat /etc/egress-snat.yaml; do
  [[ ! -e $f ]] || die "$f exists already: refusing to install over it"
done

list=$(mktemp)
policy_rc=
cleanup_play=
cleanup() {
  local rc=$?
  ((rc == 0)) || echo "deb-check: failed (exit $rc); cleaning up" >&2
  lab down >/dev/null 2>&1 || true
  if dpkg-query -W egress-snat >/dev/null 2>&1; then dpkg --purge egress-snat >/dev/null 2>&1 || true; fi
  [[ -z $policy_rc ]] || rm -f "$policy_rc"
  rm -f "$list" /var/cache/egress-snat.deb
  [[ -z $cleanup_play ]] || rm -rf "$cleanup_play"
  exit "$rc"
}
trap cleanup EXIT

# The package starts nothing, but no package may start a daemon here.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  policy_rc=/usr/sbin/policy-rc.d
  printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
  chmod 0755 "$policy_rc"
fi

say "a namespace lab for the checks"
lab down >/dev/null 2>&1 || true
lab up

# The Ansible role, as a fleet would run it on this host: install the .deb,
# write a desired state (to a scratch path, not /etc), apply it.
have_ansible=
if command -v ansible-playbook >/dev/null; then
  have_ansible=1
  play=$(mktemp -d)
  cleanup_play=$play
  printf '[defaults]\n' >"$play/ansible.cfg"
  echo 'localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3' >"$play/inventory"
  printf -- '---\n- name: Egress\n  hosts: localhost\n  gather_facts: false\n  roles:\n    - role: egress_snat\n' >"$play/site.yml"
  cat >"$play/vars.json" <<JSON
{"egress_snat_install": "deb", "egress_snat_deb": "$(realpath "$deb")",
 "egress_snat_config": "$play/egress-snat.yaml", "egress_snat_service": false,
 "egress_snat_rules": [{"to": "192.0.2.22", "dst": ["198.51.100.4"]}]}
JSON
  # role [FLAG...] runs the role in the lab's host namespace and prints the
  # play's changed count; its output is in $play/out.
  role() {
    lab exec host env ANSIBLE_CONFIG="$play/ansible.cfg" ANSIBLE_ROLES_PATH="$ROOT/deploy/ansible/roles" \
      ANSIBLE_HOME="$play/home" ANSIBLE_LOCAL_TEMP="$play/tmp" ANSIBLE_NOCOLOR=1 \
      ansible-playbook -i "$play/inventory" "$play/site.yml" -e "@$play/vars.json" "$@" >"$play/out" 2>&1 ||
      { cat "$play/out" >&2; die "ansible-playbook $* failed"; }
    sed -n 's/^localhost *: .* changed=\([0-9]*\) .*/\1/p' "$play/out"
  }
  say "the Ansible role in check mode, before the package is installed"
  changed=$(role --check --diff)
  ((changed > 0)) || { cat "$play/out" >&2; die "role --check on a host without egress-snat: changed=$changed, want the install reported"; }
  for want in "would install egress-snat (deb)" "198.51.100.4/32" "1 added"; do
    grep -qF "$want" "$play/out" || { cat "$play/out" >&2; die "role --check --diff on a host without egress-snat does not say \"$want\""; }
  done
  for f in /usr/sbin/egress-snat /var/cache/egress-snat.deb "$play/egress-snat.yaml"; do
    [[ ! -e $f ]] || die "role --check created $f"
  done
  say "role --check: would install the package, plan shown (made with the binary unpacked from the .deb), nothing changed"
else
  say "ansible-playbook not installed: skipping the role checks"
  [[ ${CI:-} != true ]] || die "CI must have ansible-core (.ci/run installs it)"
fi

say "+ dpkg -i $deb"
dpkg -i "$deb"
dpkg-query -L egress-snat >"$list"
for f in /usr/sbin/egress-snat /usr/share/man/man8/egress-snat.8.gz /etc/egress-snat.yaml \
  /lib/systemd/system/egress-snat.service /usr/share/bash-completion/completions/egress-snat; do
  grep -qx "$f" "$list" || die "the package does not list $f"
  [[ -e $f ]] || die "$f is missing after dpkg -i"
done
grep -qx /etc/egress-snat.yaml /var/lib/dpkg/info/egress-snat.conffiles || die "/etc/egress-snat.yaml is not a conffile"
/usr/sbin/egress-snat --version
man -l /usr/share/man/man8/egress-snat.8.gz 2>/dev/null | grep -q "choose the source address" ||
  zcat /usr/share/man/man8/egress-snat.8.gz | grep -q "choose the source address" || die "the man page does not read"
# The example gateway pair: the installed binary's ha config writes, from
# each node's shipped ha.yaml, exactly the files shipped beside it.
examples=/usr/share/doc/egress-snat/examples/ha
for node in gw-a gw-b; do
  grep -qx "$examples/$node/keepalived.conf" "$list" || die "the package does not list $examples/$node/keepalived.conf"
  haroot=$(mktemp -d)
  /usr/sbin/egress-snat ha config -f "$examples/$node/ha.yaml" --root "$haroot" >/dev/null ||
    { rm -rf "$haroot"; die "ha config -f $examples/$node/ha.yaml failed"; }
  for f in etc/keepalived/keepalived.conf etc/conntrackd/conntrackd.conf etc/keepalived/egress-snat-notify.sh \
    etc/sysctl.d/60-egress-snat-ha.conf; do
    cmp -s "$haroot/$f" "$examples/$node/$(basename "$f")" ||
      { rm -rf "$haroot"; die "$examples/$node/$(basename "$f") is not what ha config writes from $node's ha.yaml"; }
  done
  rm -rf "$haroot"
done
say "the ha examples are what the installed ha config writes from their ha.yaml"
if [[ -d /run/systemd/system ]] && systemctl is-enabled egress-snat.service >/dev/null 2>&1; then
  die "installing enabled egress-snat.service; it must be left to the operator"
fi

say "namespace check with the installed binary"
# The host's rules without comments, with zeroed counters, and without
# tables that hold nothing but built-in chains: iptables-legacy cannot
# unload a nat table from a namespace, so after clear it stays listed, empty
# (README, Safety).
save() {
  lab exec host sh -c 'iptables-save; ip6tables-save' | sed '/^#/d; s/\[[0-9]*:[0-9]*\]/[0:0]/' | awk '
    /^\*/ { buf = $0 "\n"; keep = 0; next }
    buf != "" {
      buf = buf $0 "\n"
      if ($0 == "COMMIT") { if (keep) printf "%s", buf; buf = "" }
      else if ($0 !~ /^:[A-Z]+ (ACCEPT|DROP) /) keep = 1
      next
    }
    { print }'
}
before=$(save)
natural=$(lab seen 198.51.100.4)
[[ $natural == 192.0.2.250 ]] || die "before set, the far side saw $natural, want the natural 192.0.2.250"
lab exec host /usr/sbin/egress-snat apply --dry-run -f /etc/egress-snat.yaml >/dev/null ||
  die "the shipped /etc/egress-snat.yaml does not pass apply --dry-run"
lab exec host /usr/sbin/egress-snat set --to 192.0.2.22 --dst 198.51.100.4
seen=$(lab seen 198.51.100.4)
[[ $seen == 192.0.2.22 ]] || die "after set, the far side saw $seen, want 192.0.2.22"
say "far side sees 192.0.2.22"
lab exec host /usr/sbin/egress-snat clear
after=$(save)
if [[ $after != "$before" ]]; then
  diff <(echo "$before") <(echo "$after") >&2 || true
  die "after clear the rules differ from before set"
fi
seen=$(lab seen 198.51.100.4)
[[ $seen == 192.0.2.250 ]] || die "after clear, the far side saw $seen, want 192.0.2.250"
say "clear restored the rules; far side sees 192.0.2.250 again"

# The role for real, with the package installed (no change there): it
# writes and applies the desired state; twice, the second run changing
# nothing, and then check mode has nothing to report either.
if [[ -n $have_ansible ]]; then
  say "the Ansible role with the package, twice"
  changed=$(role)
  ((changed > 0)) || { cat "$play/out" >&2; die "first run of the role: changed=$changed, want changes"; }
  seen=$(lab seen 198.51.100.4)
  [[ $seen == 192.0.2.22 ]] || die "after the role, the far side saw $seen, want 192.0.2.22"
  changed=$(role)
  ((changed == 0)) || { cat "$play/out" >&2; die "second run of the role: changed=$changed, want 0"; }
  changed=$(role --check)
  ((changed == 0)) || { cat "$play/out" >&2; die "role --check after it ran: changed=$changed, want 0"; }
  say "role: first run changed the host (far side sees 192.0.2.22), second run and --check changed=0"
fi

# Removing the package must leave the kernel's state alone.
lab exec host /usr/sbin/egress-snat set --to 192.0.2.23 --dst 198.51.100.4 >/dev/null
say "+ dpkg --remove egress-snat"
dpkg --remove egress-snat
[[ ! -e /usr/sbin/egress-snat ]] || die "/usr/sbin/egress-snat remains after dpkg --remove"
[[ -e /etc/egress-snat.yaml ]] || die "dpkg --remove deleted the conffile /etc/egress-snat.yaml (only purge may)"
seen=$(lab seen 198.51.100.4)
[[ $seen == 192.0.2.23 ]] || die "after dpkg --remove, the far side saw $seen, want 192.0.2.23 (removal must leave the rules)"
say "after removal the rule is still in place (far side sees 192.0.2.23)"
lab down

say "+ dpkg --purge egress-snat"
dpkg --purge egress-snat
left=()
while IFS= read -r f; do
  # Directories are shared (/usr, /etc ...); only the package's own must go.
  if [[ -d $f ]]; then
    [[ $f == *egress-snat* ]] && left+=("$f")
    continue
  fi
  if [[ -e $f || -L $f ]]; then left+=("$f"); fi
done <"$list"
((${#left[@]} == 0)) || die "after purge these remain: ${left[*]}"
say "purge removed all $(wc -l <"$list") paths the package listed"
say "OK"
