package snat

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Family is an address family: each has its own nat table and chain.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Families lists both in the order they are written.
var Families = []Family{IPv4, IPv6}

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// FamilyOf returns the family of a.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Entry is one managed destination. New connections to Dst that leave by
// Out with the natural source Natural get source To; with several To
// addresses, new connections are spread over them in turn. An Entry with no
// To keeps the natural source: it carves Dst out of a broader entry.
type Entry struct {
	Dst     netip.Prefix `json:"dst"`
	Out     string       `json:"out"`
	Natural netip.Addr   `json:"natural"`
	To      []netip.Addr `json:"to"`
}

// Family of the entry.
func (e Entry) Family() Family { return FamilyOf(e.Dst.Addr()) }

// Keep reports whether the entry keeps the natural source.
func (e Entry) Keep() bool { return len(e.To) == 0 }

// Equal compares two entries field by field.
func (e Entry) Equal(o Entry) bool {
	return e.Dst == o.Dst && e.Out == o.Out && e.Natural == o.Natural && slices.Equal(e.To, o.To)
}

// ToString renders To for people: "192.0.2.23", "192.0.2.22,192.0.2.23",
// or "(natural)" for a kept natural source.
func (e Entry) ToString() string {
	if e.Keep() {
		return "(natural " + e.Natural.String() + ")"
	}
	s := make([]string, len(e.To))
	for i, a := range e.To {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func (e Entry) String() string {
	return fmt.Sprintf("%s via %s from %s -> %s", e.Dst, e.Out, e.Natural, e.ToString())
}

// groupKey identifies the entries that can share one set rule: same
// interface, same natural source, same target.
type groupKey struct {
	Out     string
	Natural netip.Addr
	To      string
}

func (e Entry) group() groupKey {
	return groupKey{Out: e.Out, Natural: e.Natural, To: e.ToString()}
}

// SortEntries orders entries the way the chain evaluates them for single
// rules: family, then longest prefix first, then address, so rendering is
// deterministic.
func SortEntries(es []Entry) {
	if !slices.IsSortedFunc(es, compareEntries) {
		slices.SortFunc(es, compareEntries)
	}
}

func compareEntries(a, b Entry) int {
	if a.Family() != b.Family() {
		return int(a.Family()) - int(b.Family())
	}
	if a.Dst.Bits() != b.Dst.Bits() {
		return b.Dst.Bits() - a.Dst.Bits()
	}
	return a.Dst.Addr().Compare(b.Dst.Addr())
}

// Normalize returns the entries that need a rule:
//   - an entry whose only target is its natural source needs a rule only
//     when a broader SNAT entry for the same traffic would otherwise rewrite
//     it; it becomes a keep-natural entry;
//   - a keep-natural entry with no broader SNAT entry above it is dropped.
//
// The result is sorted. Normalize is idempotent.
func Normalize(es []Entry) []Entry {
	out := make([]Entry, 0, len(es))
	for _, e := range es {
		if len(e.To) == 1 && e.To[0] == e.Natural {
			e.To = nil
		}
		if e.Keep() && !coveredBySNAT(e, es) {
			continue
		}
		out = append(out, e)
	}
	SortEntries(out)
	return out
}

// coveredBySNAT reports whether a strictly broader entry rewriting the same
// traffic (same interface and natural source) contains e.Dst.
func coveredBySNAT(e Entry, es []Entry) bool {
	for _, o := range es {
		if o.Keep() || (len(o.To) == 1 && o.To[0] == o.Natural) {
			continue
		}
		if o.Out == e.Out && o.Natural == e.Natural && o.Dst.Bits() < e.Dst.Bits() && o.Dst.Contains(e.Dst.Addr()) {
			return true
		}
	}
	return false
}

// Effective returns the entry that decides the source of a new connection
// to dst leaving by out with the natural source natural: the longest
// matching destination, as the chain evaluates it. Nil means no rule applies.
func Effective(entries []Entry, dst netip.Addr, out string, natural netip.Addr) *Entry {
	var best *Entry
	for i, e := range entries {
		if e.Out != out || e.Natural != natural || !e.Dst.Contains(dst) {
			continue
		}
		if best == nil || e.Dst.Bits() > best.Dst.Bits() {
			best = &entries[i]
		}
	}
	return best
}

// Merge returns installed with the entries of updates added, replacing any
// installed entry for the same destination.
func Merge(installed, updates []Entry) []Entry {
	replaced := map[netip.Prefix]bool{}
	for _, u := range updates {
		replaced[u.Dst] = true
	}
	out := slices.Clone(updates)
	for _, e := range installed {
		if !replaced[e.Dst] {
			out = append(out, e)
		}
	}
	return out
}
