package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/stats"
)

// SNATCounters reads each family's nat table with its counters and returns
// what stats reports per egress address: one stats.RuleCounters per --to-source
// address of every SNAT rule, egress-snat's and others' (see snatCounters).
func (b *Backend) SNATCounters() ([]stats.RuleCounters, error) {
	var out []stats.RuleCounters
	for _, f := range snat.Families {
		text, err := b.Tables.SaveNATCounters(f)
		if err != nil {
			return nil, err
		}
		s, err := ReadSave(text, table)
		if err != nil {
			return nil, fmt.Errorf("reading the %s %w", f, err)
		}
		rules, err := snatCounters(s.Table(table))
		if err != nil {
			return nil, fmt.Errorf("reading the %s nat table: %w", f, err)
		}
		out = append(out, rules...)
	}
	return out, nil
}

// snatCounters returns one stats.RuleCounters per --to-source address of the SNAT
// rules of a nat table read with counters (nil: none), in the order of
// first use: the smallest port range named for it, the counters summed. A
// rule carrying our comment marks it as egress-snat's. The rules of one of
// our pools (pool.go: one range, or poolSlices by turns) make one
// stats.RuleCounters for its prefix instead, with their counters summed:
// none for the first address of each range.
func snatCounters(nat *SavedTable) ([]stats.RuleCounters, error) {
	if nat == nil {
		return nil, nil
	}
	pools, inPool := poolCounters(nat)
	var out []stats.RuleCounters
	byAddr := map[netip.Addr]int{}
	for i, sr := range nat.Rules {
		if g, ok := inPool[i]; ok {
			if g >= 0 {
				out = append(out, pools[g]) // at its first rule
			}
			continue
		}
		spec := sr.Spec
		if target(spec) != "SNAT" {
			continue
		}
		j := slices.Index(spec, "--to-source")
		if j < 0 || j+1 >= len(spec) {
			continue
		}
		ts, err := parseToSource(spec[j+1])
		if err != nil {
			return nil, err
		}
		k, seen := byAddr[ts.From]
		if !seen {
			k = len(out)
			byAddr[ts.From] = k
			out = append(out, stats.RuleCounters{Address: ts.From, Range: stats.DefaultPortRange})
		}
		r := &out[k]
		if pr := ts.portRange(); pr.Size() < r.Range.Size() {
			r.Range = pr
		}
		r.Packets += sr.Counters.Packets
		r.Bytes += sr.Counters.Bytes
		if hasComment(spec, Comment) {
			r.Ours = true
		}
	}
	if out == nil {
		out = []stats.RuleCounters{}
	}
	return out, nil
}

// poolCounters finds the rules of our chain that are a pool's, read as
// readInstalled reads them: our rules with a --to-source range, grouped by
// their match, whose ranges are exactly a pool's, and a period's rules
// (one each, told by their comment). It returns one
// stats.RuleCounters per pool rule group, and for each of their rules (by
// index in nat.Rules) its group's index at the group's first rule, -1 at
// the others. Ranges that are no pool's are left to the reading by
// address, as another tool's.
func poolCounters(nat *SavedTable) ([]stats.RuleCounters, map[int]int) {
	type group struct {
		ranges         []addrRange
		persistent     bool
		rules          []int
		packets, bytes uint64
	}
	var groups []*group
	byMatch := map[Rule]*group{}
	var out []stats.RuleCounters
	inPool := map[int]int{}
	for i, sr := range nat.Rules {
		if sr.Chain != ChainName || target(sr.Spec) != "SNAT" {
			continue
		}
		// Only an IPv6 range with --random can be a pool's (a range of
		// one address, a /124's slice, is saved as the address alone),
		// or a rule with a period's comment: the rest, all of an IPv4
		// table, is not parsed twice.
		if j := slices.Index(sr.Spec, "--to-source"); j < 0 || j+1 >= len(sr.Spec) || !strings.Contains(sr.Spec[j+1], ":") {
			continue
		}
		if period := periodRule(sr.Spec); period.IsValid() {
			inPool[i] = len(out)
			out = append(out, stats.RuleCounters{Pool: period, Sticky: string(snat.StickyPeriod), Range: stats.DefaultPortRange, Packets: sr.Counters.Packets, Bytes: sr.Counters.Bytes, Ours: true})
			continue
		}
		if !slices.Contains(sr.Spec, "--random") {
			continue
		}
		r, err := ParseRule(snat.IPv6, sr.Spec)
		if err != nil || !r.ToLast.IsValid() || !r.ToSource.Is6() {
			continue
		}
		g := byMatch[r.match()]
		if g == nil {
			g = &group{persistent: r.Persistent}
			byMatch[r.match()] = g
			groups = append(groups, g)
		}
		g.ranges = append(g.ranges, addrRange{r.ToSource, r.ToLast})
		g.rules = append(g.rules, i)
		g.packets += sr.Counters.Packets
		g.bytes += sr.Counters.Bytes
	}
	for _, g := range groups {
		p, sticky, ok := poolOf(g.ranges, g.persistent)
		if !ok {
			continue
		}
		for k, i := range g.rules {
			inPool[i] = -1
			if k == 0 {
				inPool[i] = len(out)
			}
		}
		out = append(out, stats.RuleCounters{Pool: p, Sticky: string(sticky), Range: stats.DefaultPortRange, Packets: g.packets, Bytes: g.bytes, Ours: true})
	}
	return out, inPool
}

// portRange is the range SNAT takes ports from: the one named, else the
// kernel's default.
func (ts toSource) portRange() stats.PortRange {
	if ts.HasPorts {
		return ts.Ports
	}
	return stats.DefaultPortRange
}

// periodRule is the pool of a period's rule (see pool.go), when spec is
// one; else the zero prefix.
func periodRule(spec []string) netip.Prefix {
	i := slices.Index(spec, "--comment")
	if i < 0 || i+1 >= len(spec) || !strings.HasPrefix(spec[i+1], periodPrefix) {
		return netip.Prefix{}
	}
	r, err := ParseRule(snat.IPv6, spec)
	if err != nil {
		return netip.Prefix{}
	}
	return r.Pool
}

// hasComment reports whether a rule carries -m comment --comment c.
func hasComment(spec []string, c string) bool {
	for i := 0; i+1 < len(spec); i++ {
		if spec[i] == "--comment" && spec[i+1] == c {
			return true
		}
	}
	return false
}
