// Package iptables is egress-snat's iptables backend (snat.Backend): it
// renders the desired entries into one nat chain per address family (plus
// ipsets for large destination lists, and mangle chains for senders that
// leave by another interface), writes them in one atomic iptables-restore
// transaction per family, reads them back from iptables-save (one reader,
// save.go), and removes them. Both flavours of iptables are the same
// program: iptables-nft and iptables-legacy (Flavour). The kernel is the
// only state: there is no state file.
//
// It owns every other reading of iptables-save too, into the models of
// the packages that judge them: the foreign NAT rules ahead of our jump
// for natscan (ahead.go), and the SNAT rules' counters for stats
// (counters.go). Those packages never import this one.
//
// Layout, the same in iptables (IPv4) and ip6tables (IPv6):
//
//	nat POSTROUTING
//	  1: -m comment --comment egress-snat -j EGRESS-SNAT   <- always first
//	  2..: foreign rules (Docker, kube-proxy, libvirt, firewalld), untouched
//
//	nat EGRESS-SNAT (ours alone; rewritten whole on every change)
//	  set rules   -o OUT -s NATURAL -m set --match-set egress-snat4-… dst -j SNAT --to-source TO
//	  host/prefix -o OUT -s NATURAL -d DST                              -j SNAT --to-source TO
//	              (longest prefix first; -j RETURN keeps the natural source
//	               for a destination carved out of a broader entry)
//
//	nat EGRESS-SNAT-KEEP (only while connections of removed rules live:
//	  no jump to it; one conntrack rule per address, see linger.go)
//
// Why the jump is first: SNAT is decided on a connection's first packet by
// the first matching rule, and a foreign MASQUERADE ahead of us would win.
// Every write therefore deletes every jump it finds and inserts one at
// position 1 in the same transaction, so tools that insert ahead of us at any
// time are put back behind on the next write.
//
// Why -s NATURAL: like the article's command, a rule rewrites only traffic
// that would otherwise leave with the kernel's natural source. Applications
// that bind() another address explicitly, and forwarded traffic, keep theirs.
// (Binding the natural source itself cannot be told apart in a packet.)
//
// Why longest prefix first: SNAT is a terminating target, so order decides,
// and operators expect routing semantics: the most specific destination wins.
// Set rules come first because each set also holds, as "nomatch" exceptions,
// every more specific destination of another entry; a set therefore matches
// only where one of its members is the longest match overall.
//
// The chain name, the comment and the ipset name prefix are this tool's
// identity on every host it has ever run on. Never rename them: a renamed
// chain would strand the rules of hosts that upgrade.
package iptables

// Identity constants. Never change these; see the package comment.
const (
	ChainName = "EGRESS-SNAT"
	Comment   = "egress-snat"
	SetPrefix = "egress-snat"
	table     = "nat"
	hookChain = "POSTROUTING"
)
