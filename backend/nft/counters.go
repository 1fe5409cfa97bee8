package nft

import (
	"net/netip"

	"github.com/egress-snat/egress-snat/stats"
)

// SNATCounters reads the nat chain's SNAT rules with their counters and
// returns what stats reports, as the iptables backend's SNATCounters: one
// stats.RuleCounters per address, and one per pool.
func (b *Backend) SNATCounters() ([]stats.RuleCounters, error) {
	counters, err := b.Counters()
	if err != nil {
		return nil, err
	}
	return ruleCounters(counters), nil
}

// ruleCounters turns the rules' counters into stats' view, in the order of
// first use. One per address: the smallest port range named for it (a
// rule's --to-ports), the counters summed; a spread rule's addresses share
// its counts evenly, as its round robin does. One per pool rule: a pool is
// one rule per destination match, and stats sums the rules of one prefix.
func ruleCounters(counters []Counter) []stats.RuleCounters {
	var rules []stats.RuleCounters
	byAddr := map[netip.Addr]int{}
	for _, ct := range counters {
		pr := stats.DefaultPortRange
		if !ct.Ports.IsZero() {
			pr = stats.PortRange{Lo: ct.Ports.Lo, Hi: ct.Ports.Hi}
		}
		if ct.Pool.IsValid() {
			rules = append(rules, stats.RuleCounters{Pool: ct.Pool, Sticky: string(ct.Sticky), Range: pr, Packets: ct.Packets, Bytes: ct.Bytes, Ours: true})
			continue
		}
		n := uint64(len(ct.To))
		for _, a := range ct.To {
			i, seen := byAddr[a]
			if !seen {
				i = len(rules)
				byAddr[a] = i
				rules = append(rules, stats.RuleCounters{Address: a, Range: stats.DefaultPortRange, Ours: true})
			}
			r := &rules[i]
			if pr.Size() < r.Range.Size() {
				r.Range = pr
			}
			r.Packets += ct.Packets / n
			r.Bytes += ct.Bytes / n
		}
	}
	return rules
}
