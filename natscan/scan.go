package natscan

import (
	"cmp"
	"net/netip"
	"slices"
)

// Input is everything Scan judges, read beforehand.
type Input struct {
	// Chains are the nftables nat postrouting chains (ReadNFT).
	Chains []Chain
	// SkipIPTablesNFT leaves out iptables-nft's own nat POSTROUTING chains:
	// set when egress-snat's backend is nft, because then our jump is in
	// them and their rules are judged by order, in Ahead.
	SkipIPTablesNFT bool
	// Ahead are, per family (4, 6), the iptables rules ahead of our jump,
	// which the iptables backend reads (iptables.Backend.RulesAhead).
	Ahead map[int][]NATRule
	// Promises are the traffic we promise a source for.
	Promises []Traffic
	// Priority is our nat chain's: OurPriority when 0 (the iptables
	// backends), OurNFTPriority for the nftables backend's own chain.
	Priority int32
}

// Scan returns one finding per foreign chain (or per family's rules ahead
// of our jump) whose NAT rules may take some promised traffic. Chains after
// ours and rules that cannot match our traffic are not findings: the first
// binding wins, so they never decide our traffic's source.
func Scan(in Input) []Finding {
	var out []Finding
	ours := in.Priority
	if ours == 0 {
		ours = OurPriority
	}
	for _, c := range in.Chains {
		if c.Priority > ours || in.SkipIPTablesNFT && IPTablesNFT(c) {
			continue
		}
		f := Finding{Kind: KindChainAhead, Family: c.Family, Table: c.Table, Chain: c.Name, Priority: c.Priority, SamePriority: c.Priority == ours}
		if judge(&f, c.Rules, in.Promises) {
			out = append(out, f)
		}
	}
	// Earliest first: the first binding wins.
	slices.SortStableFunc(out, func(a, b Finding) int { return cmp.Compare(a.Priority, b.Priority) })
	for _, fam := range []int{4, 6} {
		f := Finding{Kind: KindRuleAhead, Family: map[int]string{4: "ipv4", 6: "ipv6"}[fam], Table: "nat", Chain: "POSTROUTING", Priority: OurPriority}
		if judge(&f, in.Ahead[fam], in.Promises) {
			out = append(out, f)
		}
	}
	return out
}

// judge fills f with the rules that take some promise; false when none do.
func judge(f *Finding, rules []NATRule, promises []Traffic) bool {
	shadowed := map[string]bool{}
	for _, r := range rules {
		took := false
		for _, t := range promises {
			if !r.Takes(t) {
				continue
			}
			took = true
			if !shadowed[t.Label] {
				shadowed[t.Label] = true
				f.Shadows = append(f.Shadows, t.Label)
			}
		}
		if !took {
			continue
		}
		text := r.Text
		if r.Unsure {
			text += " [it also matches on what this check does not evaluate, so it may take less]"
		}
		f.Rules = append(f.Rules, text)
		if a, ok := r.To(); ok && !slices.Contains(f.To, a) {
			f.To = append(f.To, a)
		}
	}
	return len(f.Rules) > 0
}

// Explains returns the findings that may take traffic to dst, and the
// first address they SNAT to that equals got: the likely reason a flow
// left with got instead of what we promised. For verify.
func Explains(findings []Finding, got netip.Addr) (*Finding, bool) {
	for i, f := range findings {
		if slices.Contains(f.To, got) {
			return &findings[i], true
		}
	}
	if len(findings) > 0 {
		return &findings[0], false
	}
	return nil, false
}
