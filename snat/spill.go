package snat

import (
	"errors"
	"net/netip"
	"slices"

	"github.com/egress-snat/egress-snat/selector"
)

// Spill-over before source ports run out. SNAT needs a free source port
// for each (translated address, destination, destination port, protocol):
// a host that opens many connections to one popular destination port from
// one address runs out of them (the kernel's 1024-65535 range, or a rule's
// --to-ports), and new connections there fail while the address has ports
// to spare toward every other destination.
//
// A rule with spill (set --spill, spill: true) and a list of addresses
// lets the watch daemon act on it (package reconcile, spill.go there).
// When the busiest tuple of an address of the rule passes SpillHigh of
// its port range, the daemon installs a spill entry ahead of the rule:
// the same sender, natural source and interface, the destination as a
// host prefix, the tuple's protocol and destination port, and as sources
// the rule's further addresses that are not busy themselves. New
// connections to that destination port leave from those; every other
// destination keeps the rule's. Once the busy address falls below
// SpillLow, the entry is removed and new connections go back. Existing
// flows keep their conntrack binding: nothing already open is moved.
//
// A spill entry is tagged like every rule of ours, and is the only kind
// with a destination port (Match.DPort); the daemon's desired state holds
// it while it lasts, so its drift repair keeps it. Without the daemon a
// spill rule is what it is without spill: its first address (a failover
// list) or all of them in turn (spread).

// SpillHigh and SpillLow are the shares of a port range in use, on the
// busiest tuple of an address, at which a spill starts and ends: far
// enough apart that a tuple hovering around one does not make the rules
// flap. SpillHigh is stats' warning ratio.
const (
	SpillHigh = 0.8
	SpillLow  = 0.5
)

// spillAddrs are the addresses a spill intent may spill over: its list,
// each address once, in order, of those the host has now on the
// interface the traffic leaves by (an absent one is skipped, as a spread
// rule skips it). A spill needs two addresses or more.
func spillAddrs(r Router, in Intent, dst netip.Prefix, iface string) ([]netip.Addr, error) {
	what := describe(Match{Sender: in.Sender, Dst: dst})
	addrs, _, _ := Weights(in.To)
	if len(addrs) < 2 {
		return nil, Invalid("%s: spill needs a list of two addresses or more to spill over; %s is one", what, addrList(addrs))
	}
	var out []netip.Addr
	for _, a := range addrs {
		owner, err := r.Owner(a)
		switch {
		case errors.Is(err, selector.ErrNotLocal):
			continue
		case err != nil:
			return nil, hostErr(err, "source %s", a)
		case owner != iface:
			return nil, Invalid("%s: source %s is on %s, but traffic to %s leaves by %s: a spill list must be on the outgoing interface", what, a, owner, dst, iface)
		}
		out = append(out, a)
	}
	return out, nil
}

// SpillEntry is the spill entry of rule parent for one destination
// address, protocol ("tcp" or "udp") and port, giving sources to.
func SpillEntry(parent Entry, dst netip.Addr, proto string, dport uint16, to []netip.Addr) Entry {
	e := Entry{Match: parent.Match, Natural: parent.Natural, To: slices.Clone(to), Ports: parent.Ports}
	e.Dst = netip.PrefixFrom(dst, dst.BitLen())
	e.Proto, e.DPort = proto, dport
	return e
}

// SpillParent returns the rule a spill entry spills from: among entries
// without a port, the first in chain order of the same sender, interface
// and natural source whose destination holds the spill's. Nil: none (the
// rule was removed).
func SpillParent(entries []Entry, s Entry) *Entry {
	var best *Entry
	for i := range entries {
		e := &entries[i]
		if e.IsSpill() || e.Sender != s.Sender || e.Out != s.Out || e.Natural != s.Natural || !e.Dst.Contains(s.Dst.Addr()) || e.Keep() || e.Routed {
			continue
		}
		if best == nil || compareEntryRefs(e, best) < 0 {
			best = e
		}
	}
	return best
}

// KeepSpills returns desired with the spill entries of installed that a
// rule of desired spills into: check compares the host with it, so that
// a spill watch keeps is no drift. A spill whose rule is gone, or does
// not spill (any more) to its addresses, stays out and is drift. Without
// a file the rules' spill lists are unknown (the kernel holds only the
// addresses in use): then any rule of the spill's match will do (known
// false).
func KeepSpills(desired, installed []Entry, known bool) (out, spills []Entry) {
	out = desired
	for _, s := range installed {
		if !s.IsSpill() {
			continue
		}
		p := SpillParent(desired, s)
		if p == nil || known && !allIn(s.To, p.Spill) {
			continue
		}
		if s.Ports != p.Ports {
			continue
		}
		out = append(slices.Clip(out), s)
		spills = append(spills, s)
	}
	return out, spills
}

func allIn(as, in []netip.Addr) bool {
	for _, a := range as {
		if !slices.Contains(in, a) {
			return false
		}
	}
	return true
}
