package nft

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// A user-space evaluation of our table, as the kernel walks it for a new
// connection: the model the property tests hold against snat.Effective.

// evalChain returns the first rule of chain that matches p, or nil. mark
// is the packet's mark of ours (for the mark chains; 0 for the nat chain).
func evalChain(t *Table, chain string, p snat.Packet, mark uint32) *Rule {
	c := t.Chain(chain)
	if c == nil {
		return nil
	}
	for i := range c.Rules {
		r := &c.Rules[i]
		if !matches(t, r, p, mark) {
			continue
		}
		switch r.Action.Kind {
		case ActMark:
			// Marking does not end the chain, but the later marking
			// rules match only unmarked packets, and a later return
			// keeps the mark: the first to match decides.
			return r
		case ActRestoreMark, ActSaveMark, ActCount:
			continue // conntrack, counters: not part of the first packet's decision
		}
		return r
	}
	return nil
}

func matches(t *Table, r *Rule, p snat.Packet, mark uint32) bool {
	f := snat.FamilyOf(p.Dst)
	switch {
	case r.Family != 0 && r.Family != f:
		return false
	case r.Unmarked && mark != 0:
		return false
	case r.Out != "" && r.Out != p.Out:
		return false
	case r.Forwarded && !p.Forwarded:
		return false // fib saddr type != local: forwarded sources are never local
	case r.Src.IsValid() && !r.Src.Contains(p.Src):
		return false
	case r.HasUID && (p.Forwarded || !p.HasUID || p.UID != r.UID):
		return false
	case r.Cgroup != "" && (p.Forwarded || p.Cgroup == "" || p.Cgroup != r.Cgroup && !strings.HasPrefix(p.Cgroup, r.Cgroup+"/")):
		return false
	case r.Dst.IsValid() && !r.Dst.Contains(p.Dst):
		return false
	}
	if r.Set != "" {
		s := t.Set(r.Set)
		if s == nil {
			return false
		}
		k, _ := p.Dst.Prefix(r.SetBits)
		if _, found := slices.BinarySearchFunc(s.Elems.Addrs(), k.Addr(), netip.Addr.Compare); !found {
			return false
		}
	}
	return true
}

// sourceAfter is the source a new connection p leaves with after our nat
// chain: its rule's address(es), or p's own source.
func sourceAfter(t *Table, p snat.Packet) []netip.Addr {
	r := evalChain(t, ChainNAT, p, 0)
	if r == nil || r.Action.Kind != ActSNAT {
		return []netip.Addr{p.Src}
	}
	return r.Action.To
}

// effectiveSource is what snat.Effective says p leaves with.
func effectiveSource(es []snat.Entry, p snat.Packet) []netip.Addr {
	e := snat.Effective(es, p)
	if e == nil || e.Keep() || e.Routed {
		return []netip.Addr{p.Src}
	}
	return e.To
}
