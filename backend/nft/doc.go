// Package nft is egress-snat's native nftables backend: it renders the
// domain's normalized entries ([]snat.Entry) into one nftables table of
// our own, plans the change from what is installed to what is wanted as a
// list of typed steps, writes a plan as one netlink transaction (no
// processes), reads the table back, and deletes it. It owns everything
// about nftables; policy stays in package snat.
//
// Layout (one table, both families):
//
//	table inet egress-snat
//	  set d4-32-<id>  { type ipv4_addr }    destinations of one group at one prefix
//	  set d4-24-<id>  { type ipv4_addr }    length, masked to it (hash sets: no
//	  set d6-64-<id>  { type ipv6_addr }    intervals, no overlaps to refuse)
//	  set m4-32-<id>  ...                   the same for the mark chains
//
//	  chain postrouting   type nat hook postrouting priority srcnat - 10 (90)
//	    for each sender, in snat's precedence order (a --from prefix, the
//	    longer first; a cgroup, the deeper first; a uid; the host):
//	      for each destination prefix length, longest first:
//	        for each group (interface, natural source, action):
//	          meta nfproto ipv4 oifname OUT <sender> ip daddr & MASK @d4-LEN-<id> counter ACTION
//	          (a group of fewer than snat.SetThreshold destinations has one
//	           rule each, `ip daddr DST`, instead of a set: readable)
//	    ct state new counter                      (the keeper, last; see below)
//	    <sender>  host:    ip saddr NATURAL
//	              uid:     ip saddr NATURAL meta skuid UID
//	              cgroup:  ip saddr NATURAL xt match cgroup --path PATH
//	              from:    fib saddr type != local ip saddr PREFIX
//	    ACTION    snat ip to TO
//	              snat ip to numgen inc mod N map { 0 : TO1, 1 : TO2, ... }   (spread)
//	              accept                                  (keep the natural source)
//
//	  chain mark-output   type route hook output priority mangle (-150)     only with
//	    ct mark & 0x7f000000 == V meta mark set meta mark & ~0x7f000000 | V  marked senders
//	    meta mark & 0x7f000000 == 0 ip saddr NATURAL <sender> ip daddr ... meta mark set ... | V
//	    ip saddr NATURAL <sender> ip daddr ... return    (an earlier entry that stays)
//	    meta mark & 0x7f000000 == V ct mark set ct mark & ~0x7f000000 | V
//
//	  chain mark-prerouting  type filter hook prerouting priority mangle (-150)
//	    the same for --from senders, without the ct mark rules
//
//	  chain hold-forward  type filter hook forward priority filter (0)    only with
//	    meta nfproto ipv4 ct state invalid,new oifname OUT <sender>          a rule standing
//	      ip daddr ... counter drop                                          by (snat/standby.go)
//
// Why the hold drops in forward and not in the nat chain: NAT sees only a
// connection's first packet and none that conntrack calls invalid, and a
// drop in any base chain is final, so its priority does not matter.
//
// Why one inet table rather than an ip and an ip6 pair: both families are
// one transaction, one generation to watch, and one message to delete; the
// rules that match no address (the ct mark rules) are written once; and
// inet nat has been in the kernel since 5.2. Docker and kube-proxy keep
// pairs for kernels older than that, which egress-snat does not support.
//
// Why priority srcnat - 10: NAT is decided on a connection's first packet
// by the first nat chain, in priority order, that binds it; a chain that
// accepts without binding lets the next one decide. At 90 we come before
// iptables-nft's and iptables-legacy's nat POSTROUTING (100, where Docker's
// and libvirt's MASQUERADE live), Docker's and kube-proxy's own tables
// (srcnat, 100) and firewalld's (110). Nobody inserts ahead of a jump,
// because there is none; nobody flushes our table. Traffic no rule of ours
// binds (and traffic we keep, by accept) goes on to them as before, which
// is the iptables backend's RETURN.
//
// Why a hash set per prefix length, longest first, instead of one interval
// set: the kernel refuses overlapping intervals (and auto-merge takes their
// union, which is not longest-prefix-wins), so intervals would have to be
// flattened here, and one wide change could then split many intervals.
// With one set per length, a lookup that misses falls through to the next
// shorter length, which is routing's semantics, and changing a destination
// is one element added or deleted whatever the size of the set.
//
// Why sets per group rather than maps from destination to address: a
// group is one rule, so the rule's counter is what stats reports for its
// address, and the rule says what it does when read.
//
// Why the cgroup match is xt's: the kernel refuses `socket cgroupv2` in
// postrouting (EOPNOTSUPP since 6.x), and the xt cgroup match, the one
// iptables-nft writes for -m cgroup, is allowed there. The kernel resolves
// its path when the rule is loaded, as with iptables, and the path reads
// back from the rule.
//
// Why the nat chain ends with `ct state new counter` (the keeper), and
// stays when the last rule goes: the connections our rules NATed need two
// things of the kernel to stay translated, its NAT hooks, which it keeps
// while any nat chain of their family exists, and conntrack, which it
// turns off when its last user goes (a nat statement is one). Without
// either, their packets leave with the untranslated source and the far side
// resets them (TestWireConnectionsOutliveTheRules, TestWireKeeperIsNeeded).
// The keeper's conntrack expression is such a user, and its counter says
// how many new connections went on untranslated by us. Render with no
// entries therefore gives the nat chain with the keeper alone; Delete
// removes everything.
//
// The table's, chains' and sets' names are this tool's identity on every
// host it has run on. Never rename them: a renamed table would strand the
// rules of hosts that upgrade.
package nft

import "github.com/egress-snat/egress-snat/routes"

// Identity constants. Never change these; see the package comment.
const (
	// TableName is our table, of family inet.
	TableName = "egress-snat"
	// ChainNAT is the nat chain on postrouting.
	ChainNAT = "postrouting"
	// ChainMarkOut marks local senders' traffic for another NIC, on output.
	ChainMarkOut = "mark-output"
	// ChainMarkFwd marks forwarded senders' traffic, on prerouting.
	ChainMarkFwd = "mark-prerouting"
	// ChainHold drops what a rule standing by must not let through, on
	// forward.
	ChainHold = "hold-forward"
	// NATPriority is ChainNAT's priority: srcnat - 10.
	NATPriority = 90
	// MarkPriority is the mark chains' priority: mangle.
	MarkPriority = -150
	// HoldPriority is ChainHold's priority: filter.
	HoldPriority = 0
	// MarkMask holds the marks of ours (routes.MarkMask).
	MarkMask = routes.MarkMask
)
