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
//	  7420: not from all fwmark 0x7e5a7420 lookup 7420 <- destinations
//	  7421: from all lookup main suppress_prefixlength 0  (only with 7422s)
//	  7422: from ADDR lookup 7422+n                    <- replies, bound apps
//	table 7420 (proto 83): DST [via GW] dev IF src ADDR   one per destination
//	table 7422+n (proto 83): default via GW dev IF        one per ADDR
//
// Why 7420 comes first: a destination's route of ours must win over main's
// routes, as the most specific choice the operator made. Why 7421: traffic
// from ADDR to the host's connected subnets and specific routes must still
// take them; only what would take main's default route is sent by ADDR's
// interface (wg-quick uses the same suppress_prefixlength rule).
//
// Why "not fwmark": egress-snat itself asks the kernel where a destination
// goes without its own routes (selector.Excluding), with route lookups that
// carry LookupMark. Real traffic never carries that exact mark.
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

	// LookupMark is the fwmark that rule 7420 passes over.
	LookupMark = 0x7e5a7420

	PrioDestinations = 7420
	PrioSuppress     = 7421
	PrioReplies      = 7422
)

// Ours reports whether a rule priority is in our range.
func Ours(prio int) bool { return prio >= PrioDestinations && prio <= PrioReplies }

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
}

// Rule is one ip rule of ours.
type Rule struct {
	Priority int
	// From selects the source; invalid means all.
	From  netip.Prefix
	Table int
	// SuppressPrefixLen is main's suppress rule (0); -1 when not set.
	SuppressPrefixLen int
	// NotMark: the rule passes over packets carrying this fwmark; 0: none.
	NotMark uint32
}

// State is what one family holds of ours: rules and routes, sorted.
type State struct {
	Rules  []Rule
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
}

// Desired renders paths into the rules and routes one family needs. Reply
// tables are numbered in order of their addresses, so rendering is stable.
func Desired(paths []Path) State {
	var s State
	replies := map[netip.Addr]Path{}
	for _, p := range paths {
		s.Routes = append(s.Routes, Route{Table: Table, Dst: p.Dst.Masked(), Via: p.Via, Dev: p.Dev, Src: p.Src})
		if p.Replies {
			if _, dup := replies[p.Src]; !dup {
				replies[p.Src] = p
			}
		}
	}
	if len(paths) > 0 {
		s.Rules = append(s.Rules, Rule{Priority: PrioDestinations, Table: Table, SuppressPrefixLen: -1, NotMark: LookupMark})
	}
	if len(replies) > 0 {
		s.Rules = append(s.Rules, Rule{Priority: PrioSuppress, Table: 254, SuppressPrefixLen: 0})
		addrs := slices.SortedFunc(func(yield func(netip.Addr) bool) {
			for a := range replies {
				if !yield(a) {
					return
				}
			}
		}, netip.Addr.Compare)
		for i, a := range addrs {
			if FirstReplyTable+i > LastReplyTable {
				break // more addresses than tables: the rest keep main's path
			}
			p := replies[a]
			t := FirstReplyTable + i
			s.Rules = append(s.Rules, Rule{Priority: PrioReplies, From: netip.PrefixFrom(a, a.BitLen()), Table: t, SuppressPrefixLen: -1})
			s.Routes = append(s.Routes, Route{Table: t, Dst: everything(a), Via: p.Via, Dev: p.Dev})
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
	slices.SortFunc(s.Rules, func(a, b Rule) int {
		if a.Priority != b.Priority {
			return a.Priority - b.Priority
		}
		if c := a.From.Addr().Compare(b.From.Addr()); c != 0 {
			return c
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
	return s + fmt.Sprintf(" table %d proto %d", r.Table, Protocol)
}

func (r Rule) args() string {
	s := fmt.Sprintf("pref %d", r.Priority)
	if r.NotMark != 0 {
		s += fmt.Sprintf(" not fwmark %#x", r.NotMark)
	}
	if r.From.IsValid() {
		s += " from " + r.From.String()
	}
	s += fmt.Sprintf(" lookup %d", r.Table)
	if r.SuppressPrefixLen >= 0 {
		s += fmt.Sprintf(" suppress_prefixlength %d", r.SuppressPrefixLen)
	}
	return s + fmt.Sprintf(" protocol %d", Protocol)
}

func (r Route) String() string { return r.args() }
func (r Rule) String() string  { return r.args() }
