package iptables

import (
	"net/netip"
	"slices"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// markedEntries returns the nat chain's entries with Marked, Replies and
// Via set where a mangle rule marks their traffic for their source's reply
// table.
func markedEntries(entries []snat.Entry, m MangleInstalled, rs routes.State) []snat.Entry {
	marks := m.marks()
	if len(marks) == 0 {
		return entries
	}
	via := map[int]netip.Addr{}
	for _, r := range rs.Routes {
		if r.Table != routes.Table {
			via[r.Table] = r.Via
		}
	}
	byMark := map[uint32]int{}
	for _, r := range rs.Rules {
		if r.Priority == routes.PrioReplies && r.Mark != 0 {
			byMark[r.Mark] = r.Table
		}
	}
	out := slices.Clone(entries)
	for i, e := range out {
		if e.Keep() || e.Sender.IsHost() {
			continue
		}
		mark, ok := marks[markMatch(e)]
		if !ok {
			continue
		}
		out[i].Marked, out[i].Replies = true, true
		out[i].Via = via[byMark[mark]]
	}
	return out
}
