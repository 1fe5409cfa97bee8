package selector

import (
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fib4 is a read-only copy of the IPv4 routing tables, used for one thing:
// grouping many destinations by the route the kernel takes for them, so that
// resolving 10,000 destinations costs one kernel lookup per route instead of
// one per destination. The kernel still gives every answer; the copy only
// decides which destinations share one. It is used only where matching in
// user space is exactly the kernel's lookup: the three default policy rules
// (local, main, default tables), no multipath and no TOS routes. Otherwise
// every destination is looked up in the kernel. IPv6 never uses it: its
// source selection depends on the destination, not only on the route.
type fib4 struct {
	usable bool
	// tables in policy order: local, main, default; each maps a route
	// prefix to the route, or to nil where two routes share a prefix.
	tables []map[netip.Prefix]*netlink.Route
	// lengths are each table's prefix lengths in use, longest first, so a
	// lookup tries a handful of lengths instead of 33.
	lengths [][]int
	// prefixes are all the tables' route prefixes, sorted by address, to
	// tell whether routes carve up a prefix asked about (see carved).
	prefixes []netip.Prefix
}

// routeKey names one route and the interface asked for.
type routeKey struct {
	table  int
	prefix netip.Prefix
	out    string
}

type natural struct {
	iface   string
	source  netip.Addr
	gateway netip.Addr
}

func (s *Selector) loadFIB4() *fib4 {
	if s.fib != nil {
		return s.fib
	}
	s.fib = &fib4{}
	rules, err := s.nl.RuleList(netlink.FAMILY_V4)
	if s.skipped != nil {
		rules = slices.DeleteFunc(rules, func(r netlink.Rule) bool { return s.skipped(r.Priority) })
	}
	if err != nil || !defaultRules(rules) {
		return s.fib
	}
	routes, err := s.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return s.fib
	}
	order := map[int]int{unix.RT_TABLE_LOCAL: 0, unix.RT_TABLE_MAIN: 1, unix.RT_TABLE_DEFAULT: 2}
	s.fib.tables = []map[netip.Prefix]*netlink.Route{{}, {}, {}}
	for i := range routes {
		r := &routes[i]
		t, ok := order[r.Table]
		if !ok {
			continue
		}
		if len(r.MultiPath) > 0 || r.Tos != 0 {
			return s.fib // not usable
		}
		p := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if r.Dst != nil {
			var ok bool
			if p, ok = prefixFrom(r.Dst); !ok {
				continue
			}
		}
		tbl := s.fib.tables[t]
		if prev, dup := tbl[p]; dup {
			switch {
			case prev == nil:
			case prev.Priority < r.Priority:
			case prev.Priority > r.Priority:
				tbl[p] = r
			default:
				tbl[p] = nil // ambiguous: leave it to the kernel
			}
			continue
		}
		tbl[p] = r
	}
	for _, tbl := range s.fib.tables {
		var ls []int
		for p := range tbl {
			s.fib.prefixes = append(s.fib.prefixes, p)
			if !slices.Contains(ls, p.Bits()) {
				ls = append(ls, p.Bits())
			}
		}
		slices.Sort(ls)
		slices.Reverse(ls)
		s.fib.lengths = append(s.fib.lengths, ls)
	}
	slices.SortFunc(s.fib.prefixes, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	s.fib.usable = true
	return s.fib
}

// defaultRules reports whether the policy rules are the kernel's three
// defaults and nothing else.
func defaultRules(rules []netlink.Rule) bool {
	want := map[int]int{0: unix.RT_TABLE_LOCAL, 32766: unix.RT_TABLE_MAIN, 32767: unix.RT_TABLE_DEFAULT}
	if len(rules) != len(want) {
		return false
	}
	for _, r := range rules {
		if want[r.Priority] != r.Table || r.Src != nil || r.Dst != nil || r.Mark != 0 || r.Tos != 0 ||
			r.IifName != "" || r.OifName != "" || r.Invert || r.Goto > 0 || r.UIDRange != nil || r.Dport != nil || r.Sport != nil || r.IPProto != 0 {
			return false
		}
	}
	return true
}

// route returns the key of the route covering dst, as the kernel would
// choose it, or false where only the kernel can tell.
func (f *fib4) route(dst netip.Prefix) (routeKey, bool) {
	if !f.usable || f.carved(dst) {
		return routeKey{}, false
	}
	tableIDs := []int{unix.RT_TABLE_LOCAL, unix.RT_TABLE_MAIN, unix.RT_TABLE_DEFAULT}
	for i, tbl := range f.tables {
		for _, bits := range f.lengths[i] {
			if bits > dst.Bits() {
				continue
			}
			p, _ := dst.Addr().Prefix(bits)
			r, ok := tbl[p]
			if !ok {
				continue
			}
			if r == nil {
				return routeKey{}, false
			}
			return routeKey{table: tableIDs[i], prefix: p}, true
		}
	}
	return routeKey{}, false
}

// carved reports whether a route more specific than dst lies inside it (in
// any table, which is conservative). The destinations of such a prefix
// need not all take the route covering it, and the answer for the prefix
// is then the one only the kernel can give: the covering route's if some
// address of the prefix takes it, else none (see Selector.probe), not the
// answer remembered for another destination of that route.
func (f *fib4) carved(dst netip.Prefix) bool {
	if dst.IsSingleIP() {
		return false
	}
	i, _ := slices.BinarySearchFunc(f.prefixes, dst.Addr(), func(p netip.Prefix, a netip.Addr) int { return p.Addr().Compare(a) })
	for ; i < len(f.prefixes) && dst.Contains(f.prefixes[i].Addr()); i++ {
		if f.prefixes[i].Bits() > dst.Bits() {
			return true
		}
	}
	return false
}
