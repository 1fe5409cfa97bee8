// Package natscan finds NAT that runs before egress-snat's and can take
// traffic egress-snat promises a source for.
//
// The first NAT rule to bind a connection decides its source: once a
// connection has a source binding, later nat chains on the hook are not
// consulted for it. egress-snat's rules live in the iptables nat table,
// whose POSTROUTING chain sits at priority 100 (NF_IP_PRI_NAT_SRC) with
// both backends. A native nftables nat chain on the postrouting hook with a
// lower priority therefore binds first, and so does a SNAT or MASQUERADE
// rule in POSTROUTING ahead of the jump to EGRESS-SNAT. Chains at exactly
// priority 100 run in an order the kernel does not promise.
//
// The package holds a small model of those chains and rules (NATRule) and
// says, purely, which of our promises each may shadow. Reading nftables is
// behind ReadNFT. The iptables rules ahead of our jump are read by the
// iptables backend, which owns the reading of iptables-save
// (backend/iptables/ahead.go), into the same model; everything else works
// on fixed inputs.
package natscan

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Kinds of finding, stable for scripts (check prints them as drift kinds).
const (
	// KindChainAhead is a nftables nat chain on the postrouting hook that
	// runs before (or, at equal priority, possibly before) ours.
	KindChainAhead = "nat-chain-ahead"
	// KindRuleAhead is a SNAT or MASQUERADE rule in the nat table's
	// POSTROUTING ahead of the jump to egress-snat's chain.
	KindRuleAhead = "nat-rule-ahead"
)

// OurPriority is the priority of the iptables nat POSTROUTING chain, the
// one egress-snat's jump is in: NF_IP_PRI_NAT_SRC for iptables-legacy,
// "srcnat" for iptables-nft.
const OurPriority int32 = 100

// OurTable is the nftables backend's table, of family inet (backend/nft):
// ReadNFT leaves it out, and its nat chain's priority is OurNFTPriority.
const (
	OurTable             = "egress-snat"
	OurNFTPriority int32 = 90
)

// Range is an inclusive range of addresses of one family.
type Range struct{ From, To netip.Addr }

// PrefixRange is the range a prefix covers.
func PrefixRange(p netip.Prefix) Range {
	p = p.Masked()
	b := p.Addr().As16()
	host := p.Addr().BitLen() - p.Bits()
	for i := 15; i >= 0 && host > 0; i-- {
		n := min(host, 8)
		b[i] |= byte(1<<n - 1)
		host -= n
	}
	to := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		to = to.Unmap()
	}
	return Range{p.Addr(), to}
}

// Overlaps reports whether r and o share an address.
func (r Range) Overlaps(o Range) bool {
	if r.From.BitLen() != o.From.BitLen() {
		return false
	}
	return r.From.Compare(o.To) <= 0 && o.From.Compare(r.To) <= 0
}

func (r Range) String() string {
	if r.From == r.To {
		return r.From.String()
	}
	if p := r.prefix(); p.IsValid() {
		return p.String()
	}
	return r.From.String() + "-" + r.To.String()
}

// prefix returns the prefix r is exactly, if it is one.
func (r Range) prefix() netip.Prefix {
	for bits := 0; bits <= r.From.BitLen(); bits++ {
		p := netip.PrefixFrom(r.From, bits)
		if p.Masked().Addr() == r.From && PrefixRange(p).To == r.To {
			return p
		}
	}
	return netip.Prefix{}
}

// Match is one address match of a rule: nil Ranges means any address.
// A negated match (daddr != X) is kept as any address, because it matches
// nearly everything; so is a match the reader could not decode.
type Match []Range

func (m Match) overlaps(r Range) bool {
	if m == nil {
		return true
	}
	return slices.ContainsFunc(m, r.Overlaps)
}

func (m Match) String() string {
	s := make([]string, len(m))
	for i, r := range m {
		s[i] = r.String()
	}
	if len(s) == 1 {
		return s[0]
	}
	return "{ " + strings.Join(s, ", ") + " }"
}

// NATRule is one foreign rule that binds a source (SNAT, MASQUERADE),
// with the traffic it can match as far as the reader understood it.
// Whatever it did not understand is read as "matches": a rule is reported
// when it MAY take our traffic.
type NATRule struct {
	// Family is 4 or 6, or 0 when the rule is not restricted to one (an
	// inet chain without an nfproto match).
	Family int
	Src    Match
	Dst    Match
	// Out is the outgoing interface the rule requires, empty for any.
	Out string
	// Action is what it does: "snat to 192.0.2.23", "masquerade".
	Action string
	// Text is the rule as the operator would recognise it.
	Text string
	// Unsure is true when the rule, or a rule before it that may end the
	// chain, matches on something the reader does not evaluate (a mark,
	// conntrack state, a negation): it may take less than it seems.
	Unsure bool
}

// Traffic is what one of our promises covers: new connections to Dst
// leaving by Out whose source (before NAT) is in Src. For a host's own
// traffic Src is the natural source as a host prefix.
type Traffic struct {
	Dst netip.Prefix
	Src netip.Prefix
	Out string
	// Label names the promise in findings, e.g. "198.51.100.4 -> 192.0.2.22".
	Label string
}

func (t Traffic) family() int {
	if t.Dst.Addr().Is4() {
		return 4
	}
	return 6
}

// Takes reports whether r may match (and so bind the source of) traffic t.
func (r NATRule) Takes(t Traffic) bool {
	if r.Family != 0 && r.Family != t.family() {
		return false
	}
	if r.Out != "" && t.Out != "" && r.Out != t.Out {
		return false
	}
	if !r.Dst.overlaps(PrefixRange(t.Dst)) {
		return false
	}
	return !t.Src.IsValid() || r.Src.overlaps(PrefixRange(t.Src))
}

// describe renders the decoded match for people.
func (r NATRule) describe() string {
	var w []string
	if r.Out != "" {
		w = append(w, "oifname "+r.Out)
	}
	if r.Src != nil {
		w = append(w, "saddr "+r.Src.String())
	}
	if r.Dst != nil {
		w = append(w, "daddr "+r.Dst.String())
	}
	if len(w) == 0 {
		w = append(w, "any destination")
	}
	return strings.Join(w, " ") + " " + r.Action
}

// Finding is one foreign NAT place that can take traffic we promise a
// source for.
type Finding struct {
	Kind string `json:"kind"`
	// Family is the nftables family (ip, ip6, inet) of a chain, or the
	// iptables family (ipv4, ipv6) of a rule ahead of our jump.
	Family   string `json:"family"`
	Table    string `json:"table"`
	Chain    string `json:"chain"`
	Priority int32  `json:"priority"`
	// SamePriority is true when the chain shares our priority: the kernel
	// does not promise which of the two runs first.
	SamePriority bool `json:"same_priority,omitempty"`
	// Rules are the chain's NAT rules that take some of our traffic.
	Rules []string `json:"rules"`
	// Shadows labels the promises those rules may take.
	Shadows []string `json:"shadows"`
	// To are the addresses the rules SNAT to, when they name one: the
	// source the traffic then really leaves with.
	To []netip.Addr `json:"to,omitempty"`
}

// Detail is the finding as one line.
func (f Finding) Detail() string {
	where := fmt.Sprintf("table %s %s chain %s (priority %d", f.Family, f.Table, f.Chain, f.Priority)
	switch {
	case f.Kind == KindRuleAhead:
		where = fmt.Sprintf("%s POSTROUTING ahead of the jump to our chain (", f.Table)
		where += "rules run in order"
	case f.SamePriority:
		where += ", the same as ours: which runs first is not defined"
	default:
		where += fmt.Sprintf(", ahead of ours at %d", OurPriority)
	}
	return fmt.Sprintf("%s) NATs first with %s; it may take %s", where, strings.Join(f.Rules, "; "), strings.Join(f.Shadows, ", "))
}
