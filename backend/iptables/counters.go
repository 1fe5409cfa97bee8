package iptables

import (
	"fmt"
	"net/netip"
	"slices"

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
// rule carrying our comment marks it as egress-snat's.
func snatCounters(nat *SavedTable) ([]stats.RuleCounters, error) {
	if nat == nil {
		return nil, nil
	}
	byAddr := map[netip.Addr]*stats.RuleCounters{}
	var order []netip.Addr
	for _, sr := range nat.Rules {
		spec := sr.Spec
		if target(spec) != "SNAT" {
			continue
		}
		i := slices.Index(spec, "--to-source")
		if i < 0 || i+1 >= len(spec) {
			continue
		}
		ts, err := parseToSource(spec[i+1])
		if err != nil {
			return nil, err
		}
		r := byAddr[ts.From]
		if r == nil {
			r = &stats.RuleCounters{Address: ts.From, Range: stats.DefaultPortRange}
			byAddr[ts.From] = r
			order = append(order, ts.From)
		}
		if pr := ts.portRange(); pr.Size() < r.Range.Size() {
			r.Range = pr
		}
		r.Packets += sr.Counters.Packets
		r.Bytes += sr.Counters.Bytes
		if hasComment(spec, Comment) {
			r.Ours = true
		}
	}
	out := make([]stats.RuleCounters, 0, len(order))
	for _, a := range order {
		out = append(out, *byAddr[a])
	}
	return out, nil
}

// portRange is the range SNAT takes ports from: the one named, else the
// kernel's default.
func (ts toSource) portRange() stats.PortRange {
	if ts.HasPorts {
		return ts.Ports
	}
	return stats.DefaultPortRange
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
