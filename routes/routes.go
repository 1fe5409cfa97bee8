// Package routes owns egress-snat's policy routing: the routes and ip rules
// that send chosen destinations out of another interface, or from a chosen
// source by the article's method one (a route with src), and that send
// traffic already carrying such an address out of that address's interface.
// It renders them as `ip -batch` input, reads them back over netlink, and
// has a stateful fake. Like the nat chain, the kernel is the only state.
//
// Layout, per address family:
//
//	ip rule
//	  7419: from all fwmark 0x7e5a7420 goto 7423       <- egress-snat's own lookups
//	  7420: from 0.0.0.0 lookup 7420                   <- new connections (no source yet;
//	                                                      IPv6: from all, see Desired)
//	  7421: from all lookup main suppress_prefixlength 0  (only with 7422s)
//	  7422: from ADDR lookup 7422+n                    <- replies, bound apps
//	  7422: fwmark (n+1)<<24/0x7f000000 lookup 7422+n  <- senders marked for ADDR
//	  7423: nop                                        <- 7419's target
//	table 7420 (proto 83): DST [via GW] dev IF src ADDR   one per destination
//	                       local POOL dev lo              one per IPv6 pool (AnyIP)
//	table 7422+n (proto 83): default via GW dev IF        one per ADDR
//
// Why 7420 matches only lookups without a source: it is the lookup of a
// new connection whose application bound nothing, the traffic egress-snat
// chooses a source for. A packet that already has a source (a reply from
// another address, an application bound to one) keeps the path of that
// source: main's, or its reply table. Its route of ours must win over
// main's routes, as the most specific choice the operator made. Why 7421: traffic
// from ADDR to the host's connected subnets and specific routes must still
// take them; only what would take main's default route is sent by ADDR's
// interface (wg-quick uses the same suppress_prefixlength rule).
//
// Why 7419: egress-snat itself asks the kernel where a destination goes
// without its own routes (selector.Excluding), with route lookups that
// carry LookupMark; 7419 sends them past 7420-7422 to the host's own rules.
// Real traffic never carries that exact mark.
//
// The numbers are this tool's identity on every host it ran on, chosen
// clear of Tailscale (table 52, priorities 5210-5310), wg-quick (table
// 51820, priorities 32764-32765), the kernel's 0/32766/32767, and the
// defaults of systemd-networkd and NetworkManager (which use main or tables
// the operator names). Never change them: a host that upgrades would keep
// rules nobody removes.
package routes

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Identity constants. Never change these; see the package comment.
const (
	// Table holds one route per managed destination.
	Table = 7420
	// FirstReplyTable is the first of the per-address reply tables.
	FirstReplyTable = 7422
	// LastReplyTable is the last table of ours.
	LastReplyTable = 7499
	// Protocol tags our routes and rules (rt_protos number).
	Protocol = 83

	// LookupMark is the fwmark whose lookups skip our rules.
	LookupMark = 0x7e5a7420
	// MarkMask holds the bits of the marks that send a sender's traffic
	// (--from, --uid, --cgroup) out of another interface: (n+1)<<24 for
	// reply table 7422+n. Clear of kube-proxy's 0xc000, Cilium's 0x0f00,
	// Tailscale's 0xff0000 and wg-quick's 0xca6c.
	MarkMask = 0x7f000000

	PrioExempt       = 7419
	PrioDestinations = 7420
	PrioSuppress     = 7421
	PrioReplies      = 7422
	PrioEnd          = 7423
)

// Ours reports whether a rule priority is in our range. A rule at such a
// priority is ours only when it carries Protocol too (see System.Rules):
// other tools may add rules there.
func Ours(prio int) bool { return prio >= PrioExempt && prio <= PrioEnd }

// OurTable reports whether a routing table is ours.
func OurTable(t int) bool {
	return t == Table || t >= FirstReplyTable && t <= LastReplyTable
}

// Route is one route of ours.
type Route struct {
	Table int
	Dst   netip.Prefix
	// Via is the gateway; invalid for an on-link destination.
	Via netip.Addr
	Dev string
	// Src is the preferred source; invalid on reply tables' routes.
	Src netip.Addr
	// Local makes the route an AnyIP local route (type local, dev lo):
	// the host takes every address of Dst as its own, a pool's (see
	// Path.Pool).
	Local bool
}

// IPRule is one ip rule (policy routing rule) of ours.
type IPRule struct {
	Priority int
	// From selects the source; invalid means all.
	From  netip.Prefix
	Table int
	// SuppressPrefixLen is main's suppress rule (0); -1 when not set.
	SuppressPrefixLen int
	// Mark and MarkMask: the rule matches packets whose mark, masked,
	// is Mark; 0: any.
	Mark, MarkMask uint32
	// Goto is the priority the rule jumps to; Nop marks a rule that does
	// nothing (a goto target).
	Goto int
	Nop  bool
}

// State is what one family holds of ours: rules and routes, sorted.
type State struct {
	Rules  []IPRule
	Routes []Route
}

// Empty reports whether s holds nothing.
func (s State) Empty() bool { return len(s.Rules) == 0 && len(s.Routes) == 0 }

// Path is how a destination leaves when a route of ours carries it.
type Path struct {
	Dst netip.Prefix
	Dev string
	Via netip.Addr
	Src netip.Addr
	// Replies: traffic leaving with Src takes Dev and Via too, because
	// Dev is not the interface the host's own routes use for it.
	Replies bool
	// Marked: the path is for a sender's traffic, which a mark of Src's
	// reply table sends there, not a route for Dst.
	Marked bool
	// Linger: no rule wants Src's path any more, but connections still
	// leave with Src: its reply rule and table stay (with Replies), and
	// no destination route, until they end.
	Linger bool
	// Pool: Dst is an IPv6 pool of source addresses that new
	// connections are translated to (snat's pool.go); the host takes its
	// addresses as its own with an AnyIP local route in Table, so that a
	// packet to one that is no connection's (a late one, a probe) ends
	// here instead of bouncing back to the router that routes the pool
	// to the host. (Replies of connections need no route: conntrack
	// translates them back before routing.) Only Dst counts.
	Pool bool
}

// MarkOf is the mark that sends traffic to reply table t.
func MarkOf(t int) uint32 { return uint32(t-FirstReplyTable+1) << 24 }

// ReplyTables numbers the reply tables of the sources of paths that need
// one, in address order: the one place tables are assigned.
func ReplyTables(paths []Path) map[netip.Addr]int {
	seen := map[netip.Addr]bool{}
	var addrs []netip.Addr
	for _, p := range paths {
		if (p.Replies || p.Marked) && !seen[p.Src] {
			seen[p.Src] = true
			addrs = append(addrs, p.Src)
		}
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	out := map[netip.Addr]int{}
	for i, a := range addrs {
		if FirstReplyTable+i <= LastReplyTable {
			out[a] = FirstReplyTable + i
		}
	}
	return out
}

// Desired renders paths into the rules and routes one family needs. Reply
// tables are numbered in order of their addresses, so rendering is stable.
func Desired(paths []Path) State {
	var s State
	var dests []Path
	pools := map[netip.Prefix]bool{}
	for _, p := range paths {
		switch {
		case p.Pool && !pools[p.Dst.Masked()]:
			pools[p.Dst.Masked()] = true
			dests = append(dests, p)
			s.Routes = append(s.Routes, Route{Table: Table, Dst: p.Dst.Masked(), Dev: "lo", Local: true})
		case p.Pool:
		case !p.Marked && !p.Linger:
			dests = append(dests, p)
			s.Routes = append(s.Routes, Route{Table: Table, Dst: p.Dst.Masked(), Via: p.Via, Dev: p.Dev, Src: p.Src})
		}
	}
	if len(dests) > 0 {
		d := IPRule{Priority: PrioDestinations, Table: Table, SuppressPrefixLen: -1}
		if dests[0].Dst.Addr().Is4() {
			// IPv6 rules with a source never match a lookup without one
			// (fib6_rule_match), so there 7420 takes every lookup:
			// traffic that already has another source follows the
			// destination's route too.
			d.From = netip.PrefixFrom(netip.IPv4Unspecified(), 32)
		}
		s.Rules = append(s.Rules, d)
	}
	if len(paths) > 0 {
		s.Rules = append(s.Rules,
			IPRule{Priority: PrioExempt, Mark: LookupMark, MarkMask: 0xffffffff, Goto: PrioEnd, SuppressPrefixLen: -1},
			IPRule{Priority: PrioEnd, Nop: true, SuppressPrefixLen: -1})
	}
	tables := ReplyTables(paths)
	if len(tables) > 0 {
		s.Rules = append(s.Rules, IPRule{Priority: PrioSuppress, Table: 254, SuppressPrefixLen: 0})
	}
	done := map[int]bool{}
	marked := map[int]bool{}
	for _, p := range paths {
		t, ok := tables[p.Src]
		if !ok {
			continue // more addresses than tables: the rest keep main's path
		}
		if !done[t] {
			done[t] = true
			s.Rules = append(s.Rules, IPRule{Priority: PrioReplies, From: netip.PrefixFrom(p.Src, p.Src.BitLen()), Table: t, SuppressPrefixLen: -1})
			s.Routes = append(s.Routes, Route{Table: t, Dst: everything(p.Src), Via: p.Via, Dev: p.Dev})
		}
		if p.Marked && !marked[t] {
			marked[t] = true
			s.Rules = append(s.Rules, IPRule{Priority: PrioReplies, Mark: MarkOf(t), MarkMask: MarkMask, Table: t, SuppressPrefixLen: -1})
		}
	}
	s.sort()
	return s
}

func everything(a netip.Addr) netip.Prefix {
	if a.Is4() {
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
}

func (s *State) sort() {
	slices.SortFunc(s.Rules, func(a, b IPRule) int {
		if a.Priority != b.Priority {
			return a.Priority - b.Priority
		}
		if c := a.From.Addr().Compare(b.From.Addr()); c != 0 {
			return c
		}
		if a.Mark != b.Mark {
			return int(int64(a.Mark) - int64(b.Mark))
		}
		return a.Table - b.Table
	})
	slices.SortFunc(s.Routes, func(a, b Route) int {
		if a.Table != b.Table {
			return a.Table - b.Table
		}
		if a.Dst.Bits() != b.Dst.Bits() {
			return b.Dst.Bits() - a.Dst.Bits()
		}
		return a.Dst.Addr().Compare(b.Dst.Addr())
	})
}

// Batch is the `ip -batch` input that turns have into want, in two parts:
// Add (rules and routes to create or replace) runs before the nat chain is
// written and Del (what is no longer wanted) after it, so that a
// destination always has a path: make before break. Each has its undo.
type Batch struct {
	Add, Del         string
	UndoAdd, UndoDel string
}

// Diff computes the batches from have to want.
func Diff(have, want State) Batch {
	var b Batch
	var add, del, undoAdd, undoDel strings.Builder
	haveRoutes := map[routeKey]Route{}
	for _, r := range have.Routes {
		haveRoutes[r.key()] = r
	}
	wantRoutes := map[routeKey]bool{}
	for _, r := range want.Routes {
		wantRoutes[r.key()] = true
		old, had := haveRoutes[r.key()]
		if had && old == r {
			continue
		}
		add.WriteString("route replace " + r.args() + "\n")
		if had {
			undoAdd.WriteString("route replace " + old.args() + "\n")
		} else {
			undoAdd.WriteString("route del " + r.delArgs() + "\n")
		}
	}
	for _, r := range want.Rules {
		if !slices.Contains(have.Rules, r) {
			add.WriteString("rule add " + r.args() + "\n")
			undoAdd.WriteString("rule del " + r.args() + "\n")
		}
	}
	for _, r := range have.Rules {
		if !slices.Contains(want.Rules, r) {
			del.WriteString("rule del " + r.args() + "\n")
			undoDel.WriteString("rule add " + r.args() + "\n")
		}
	}
	for _, r := range have.Routes {
		if !wantRoutes[r.key()] {
			del.WriteString("route del " + r.delArgs() + "\n")
			undoDel.WriteString("route replace " + r.args() + "\n")
		}
	}
	b.Add, b.Del, b.UndoAdd, b.UndoDel = add.String(), del.String(), undoAdd.String(), undoDel.String()
	return b
}

type routeKey struct {
	table int
	dst   netip.Prefix
}

func (r Route) key() routeKey { return routeKey{r.Table, r.Dst} }

func (r Route) args() string {
	s := r.Dst.String()
	if r.Dst.Bits() == 0 {
		s = "default"
	}
	if r.Local {
		s = "local " + s
	}
	if r.Via.IsValid() {
		s += " via " + r.Via.String()
	}
	s += " dev " + r.Dev
	if r.Src.IsValid() {
		s += " src " + r.Src.String()
	}
	return s + fmt.Sprintf(" table %d proto %d", r.Table, Protocol)
}

func (r Route) delArgs() string {
	s := r.Dst.String()
	if r.Dst.Bits() == 0 {
		s = "default"
	}
	if r.Local {
		s = "local " + s
	}
	return s + fmt.Sprintf(" table %d proto %d", r.Table, Protocol)
}

func (r IPRule) args() string {
	s := fmt.Sprintf("pref %d", r.Priority)
	if r.From.IsValid() {
		s += " from " + r.From.String()
	}
	if r.Mark != 0 {
		s += fmt.Sprintf(" fwmark %#x/%#x", r.Mark, r.MarkMask)
	}
	switch {
	case r.Goto != 0:
		s += fmt.Sprintf(" goto %d", r.Goto)
	case r.Nop:
		s += " nop"
	default:
		s += fmt.Sprintf(" lookup %d", r.Table)
	}
	if r.SuppressPrefixLen >= 0 {
		s += fmt.Sprintf(" suppress_prefixlength %d", r.SuppressPrefixLen)
	}
	return s + fmt.Sprintf(" protocol %d", Protocol)
}

func (r Route) String() string  { return r.args() }
func (r IPRule) String() string { return r.args() }
