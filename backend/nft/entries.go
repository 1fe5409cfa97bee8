package nft

import (
	"net/netip"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// entries reads the table back as the entries of family f that Render
// wrote it from: one per destination of each rule of the nat chain, marked
// where a mark chain's rule marks the same sender and destination, with
// the Via of that mark's reply table in routing, and held where the hold
// chain drops for the same sender, destination and interface. Routed
// entries have no rule: routes carries them (snat reads them from there).
func (t *Table) entries(f snat.Family, routing routes.State) []snat.Entry {
	nat := t.Chain(ChainNAT)
	if nat == nil {
		return nil
	}
	type key struct {
		sender snat.Sender
		dst    netip.Prefix
	}
	marks := map[key]uint32{}
	for _, name := range []string{ChainMarkOut, ChainMarkFwd} {
		c := t.Chain(name)
		if c == nil {
			continue
		}
		for _, r := range c.Rules {
			if r.Action.Kind != ActMark || r.Family != f {
				continue
			}
			for _, d := range t.destinations(r) {
				marks[key{ruleSender(r), d}] = r.Action.Mark
			}
		}
	}
	type holdKey struct {
		key
		out string
	}
	held := map[holdKey]bool{}
	if c := t.Chain(ChainHold); c != nil {
		for _, r := range c.Rules {
			if r.Action.Kind != ActDrop || r.Family != f {
				continue
			}
			for _, d := range t.destinations(r) {
				held[holdKey{key{ruleSender(r), d}, r.Out}] = true
			}
		}
	}
	via := map[int]netip.Addr{}
	for _, r := range routing.Routes {
		if r.Table != routes.Table {
			via[r.Table] = r.Via
		}
	}
	byMark := map[uint32]int{}
	for _, r := range routing.Rules {
		if r.Priority == routes.PrioReplies && r.Mark != 0 {
			byMark[r.Mark] = r.Table
		}
	}
	// Sized first: at 100,000 destinations, growing it by append copied
	// 200-byte entries for most of a no-op apply's time.
	size := 0
	for _, r := range nat.Rules {
		if r.Family != f || (r.Action.Kind != ActSNAT && r.Action.Kind != ActAccept) || r.Proto != "" && r.DPort == 0 {
			continue
		}
		size++
		if s := t.Set(r.Set); r.Set != "" && s != nil {
			size += s.Elems.Len()
		}
	}
	out := make([]snat.Entry, 0, size)
	// A port range's rules, one protocol each, come before the entry's
	// rule without the range, which stands for the entry; the comparison
	// of the table with the rendered one catches any that differ.
	ported := map[string]snat.Ports{}
	portKey := func(r Rule) string {
		r.Proto, r.Action.Ports, r.Packets, r.Bytes = "", snat.Ports{}, 0, 0
		return r.String()
	}
	for _, r := range nat.Rules {
		if r.Family != f || (r.Action.Kind != ActSNAT && r.Action.Kind != ActAccept) {
			continue
		}
		if r.Proto != "" && r.DPort == 0 {
			ported[portKey(r)] = r.Action.Ports
			continue
		}
		e := snat.Entry{Match: snat.Match{Sender: ruleSender(r), Out: r.Out}}
		if !r.Forwarded {
			e.Natural = r.Src.Addr()
		}
		if r.Action.Kind == ActSNAT {
			e.To, e.Pool, e.Sticky = r.Action.To, r.Action.Pool, r.Action.Sticky
			e.Ports = ported[portKey(r)]
		}
		if r.DPort != 0 { // a spill entry: its one rule has its ports
			e.Proto, e.DPort, e.Ports = r.Proto, r.DPort, r.Action.Ports
		}
		for _, d := range t.destinations(r) {
			en := e
			en.Dst = d
			// Looked up only when there are any: hashing a sender and
			// a prefix for each of 100,000 entries was half of this.
			if len(marks) > 0 {
				if m, ok := marks[key{en.Sender, d}]; ok && !en.Keep() {
					en.Marked, en.Replies, en.Via = true, true, via[byMark[m]]
				}
			}
			if len(held) > 0 {
				en.Hold = held[holdKey{key{en.Sender, d}, en.Out}]
			}
			out = append(out, en)
		}
	}
	snat.SortEntries(out)
	return out
}

// destinations are the destination prefixes a rule matches: its one
// destination, its set's elements masked to the set's length, or, with
// neither, every destination of its family.
func (t *Table) destinations(r Rule) []netip.Prefix {
	switch {
	case r.Dst.IsValid():
		return []netip.Prefix{r.Dst}
	case r.Set != "":
		s := t.Set(r.Set)
		if s == nil {
			return nil
		}
		out := make([]netip.Prefix, 0, s.Elems.Len())
		for a := range s.Elems.All() {
			out = append(out, netip.PrefixFrom(a, r.SetBits))
		}
		return out
	}
	zero := netip.IPv4Unspecified()
	if r.Family == snat.IPv6 {
		zero = netip.IPv6Unspecified()
	}
	return []netip.Prefix{netip.PrefixFrom(zero, 0)}
}

// ruleSender is the sender a rule selects.
func ruleSender(r Rule) snat.Sender {
	switch {
	case r.Forwarded:
		return snat.From(r.Src)
	case r.HasUID:
		return snat.UID(r.UID)
	case r.Cgroup != "":
		return snat.Cgroup(r.Cgroup)
	}
	return snat.Host()
}
