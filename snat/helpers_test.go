package snat

import "net/netip"

// pfx reads a prefix, or an address as its host prefix.
func pfx(s string) netip.Prefix {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked()
	}
	a := netip.MustParseAddr(s)
	return netip.PrefixFrom(a, a.BitLen())
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// entry is the host's entry for dst leaving by eth0 with natural, to to.
func entry(dst, natural string, to ...string) Entry {
	e := Entry{Match: Match{Dst: pfx(dst), Out: "eth0"}, Natural: addr(natural)}
	for _, t := range to {
		e.To = append(e.To, addr(t))
	}
	return e
}

// senderEntry is entry for sender s (forwarded ones have no natural).
func senderEntry(s Sender, dst, natural string, to ...string) Entry {
	e := entry(dst, natural, to...)
	e.Sender = s
	if !s.Local() {
		e.Natural = netip.Addr{}
	}
	return e
}
