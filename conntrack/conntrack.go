// Package conntrack reads the kernel's connection tracking table: what a
// flow really left with after NAT, and how many flows each source holds.
//
// A conntrack entry holds two tuples. The original tuple is the flow as
// its first packet left the application (before SNAT); the reply tuple is
// what replies must look like, so its destination is the source the flow
// was translated to. That pair is what `verify` compares with the rules.
package conntrack

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Protocol numbers of the protocols verify and stats name.
const (
	TCP  = unix.IPPROTO_TCP
	UDP  = unix.IPPROTO_UDP
	ICMP = unix.IPPROTO_ICMP
)

// ProtoName names a protocol number the way conntrack(8) does.
func ProtoName(p uint8) string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	case unix.IPPROTO_ICMPV6:
		return "icmpv6"
	case unix.IPPROTO_SCTP:
		return "sctp"
	}
	return fmt.Sprint(p)
}

// Tuple is one direction of a flow.
type Tuple struct {
	Proto uint8
	Src   netip.AddrPort
	Dst   netip.AddrPort
}

func (t Tuple) String() string {
	return fmt.Sprintf("%s %s -> %s", ProtoName(t.Proto), t.Src, t.Dst)
}

// Flow is one conntrack entry.
type Flow struct {
	Orig, Reply Tuple
	// Packets and bytes of the original direction, when the kernel counts
	// them (net.netfilter.nf_conntrack_acct=1).
	Packets, Bytes uint64
	// TCPState is a TCP flow's conntrack state (TCPTimeWait, ...); 0 for
	// other protocols.
	TCPState uint8
}

// TCP conntrack states that end a connection: nothing it sends any more
// needs its NAT binding or its path.
const (
	TCPTimeWait = 7
	TCPClose    = 8
)

// Live reports whether the flow may still carry packets that need its
// binding: any flow but a TCP connection that has ended (TIME_WAIT,
// CLOSE). A UDP flow has no end; it is live until conntrack forgets it.
func (f Flow) Live() bool {
	return f.Orig.Proto != TCP || f.TCPState != TCPTimeWait && f.TCPState != TCPClose
}

// TranslatedSource is the source the flow left with: the destination its
// replies are addressed to.
func (f Flow) TranslatedSource() netip.AddrPort { return f.Reply.Dst }

// Table lists the entries of one family (4 or 6). Netlink is the kernel's;
// Fake stands in for it in tests.
type Table interface {
	Flows(family int) ([]Flow, error)
}

// ErrNotFound means no entry has the asked original tuple.
var ErrNotFound = errors.New("no conntrack entry")

// Find returns the entry whose original tuple is orig.
func Find(t Table, orig Tuple) (Flow, error) {
	fam := 4
	if orig.Dst.Addr().Is6() {
		fam = 6
	}
	flows, err := t.Flows(fam)
	if err != nil {
		return Flow{}, err
	}
	for _, f := range flows {
		if f.Orig == orig {
			return f, nil
		}
	}
	return Flow{}, fmt.Errorf("%w for %s", ErrNotFound, orig)
}

// Fake is a fixed table.
type Fake []Flow

// Flows returns the fake's entries of family.
func (f Fake) Flows(family int) ([]Flow, error) {
	var out []Flow
	for _, fl := range f {
		if fl.Orig.Dst.Addr().Is4() == (family == 4) {
			out = append(out, fl)
		}
	}
	return out, nil
}

// Netlink reads the table through a netlink handle (of the namespace the
// handle was opened in).
type Netlink struct{ Handle *netlink.Handle }

// Flows dumps the family's conntrack table.
func (n Netlink) Flows(family int) ([]Flow, error) {
	fam := netlink.InetFamily(unix.AF_INET)
	if family == 6 {
		fam = unix.AF_INET6
	}
	h := n.Handle
	if h == nil {
		var err error
		if h, err = netlink.NewHandle(unix.NETLINK_NETFILTER); err != nil {
			return nil, fmt.Errorf("opening netfilter netlink: %w", err)
		}
		defer h.Close()
	}
	raw, err := h.ConntrackTableList(netlink.ConntrackTable, fam)
	if err != nil {
		return nil, fmt.Errorf("reading the conntrack table: %w", err)
	}
	out := make([]Flow, 0, len(raw))
	for _, r := range raw {
		f := Flow{
			Orig:    tuple(r.Forward),
			Reply:   tuple(r.Reverse),
			Packets: r.Forward.Packets,
			Bytes:   r.Forward.Bytes,
		}
		if tcp, ok := r.ProtoInfo.(*netlink.ProtoInfoTCP); ok {
			f.TCPState = tcp.State
		}
		out = append(out, f)
	}
	return out, nil
}

// Delete deletes the entry whose original tuple is orig, if there is one.
func (n Netlink) Delete(orig Tuple) error {
	if n.Handle == nil {
		return errors.New("no netlink handle for conntrack")
	}
	family := netlink.InetFamily(unix.AF_INET)
	if orig.Dst.Addr().Is6() {
		family = unix.AF_INET6
	}
	_, err := n.Handle.ConntrackDeleteFilters(netlink.ConntrackTable, family, tupleFilter{orig})
	return err
}

// tupleFilter matches the entry of one original tuple.
type tupleFilter struct{ orig Tuple }

func (f tupleFilter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	return tuple(flow.Forward) == f.orig
}

func tuple(t netlink.IPTuple) Tuple {
	return Tuple{
		Proto: t.Protocol,
		Src:   netip.AddrPortFrom(addr(t.SrcIP), t.SrcPort),
		Dst:   netip.AddrPortFrom(addr(t.DstIP), t.DstPort),
	}
}

func addr(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// Binding selects the flows of one rule's traffic that are bound to a
// source: to a destination inside Dst (or one of Dsts), translated to (or
// leaving with) To, and sent by one sender. conntrack does not know who
// sent a flow; the flow's original source does: a prefix (forwarded
// clients; the natural source of the host's own traffic), or the local
// endpoints of the sockets of a uid or cgroup.
type Binding struct {
	Dst netip.Prefix
	// Dsts are further destinations, for the rules of many destinations
	// one address served.
	Dsts []netip.Prefix
	To   netip.Addr
	// Pool, when valid, takes flows translated to any address of it but
	// Except instead of To alone: a pool's flows of every earlier period
	// (rotate --pool PREFIX --flush-conntrack), not only the last one's.
	Pool   netip.Prefix
	Except netip.Addr
	// From holds the flow's original source; invalid: any.
	From netip.Prefix
	// Sockets, when not nil, are the only original sources (address and
	// port) taken.
	Sockets []netip.AddrPort
}

// Takes reports whether f is one of b's flows.
func (b Binding) Takes(f Flow) bool {
	return b.matcher().takes(f)
}

// matcher is b ready to judge many flows: host destinations in a map.
func (b Binding) matcher() *bindingMatcher {
	m := &bindingMatcher{b: b, hosts: map[netip.Addr]bool{}}
	for _, d := range append([]netip.Prefix{b.Dst}, b.Dsts...) {
		switch {
		case !d.IsValid():
		case d.IsSingleIP():
			m.hosts[d.Addr()] = true
		default:
			m.nets = append(m.nets, d)
		}
	}
	return m
}

type bindingMatcher struct {
	b     Binding
	hosts map[netip.Addr]bool
	nets  []netip.Prefix
}

func (m *bindingMatcher) takes(f Flow) bool {
	b := m.b
	switch src := f.TranslatedSource().Addr(); {
	case b.Pool.IsValid():
		if !b.Pool.Contains(src) || src == b.Except {
			return false
		}
	case src != b.To:
		return false
	}
	if dst := f.Orig.Dst.Addr(); !m.hosts[dst] && !slices.ContainsFunc(m.nets, func(p netip.Prefix) bool { return p.Contains(dst) }) {
		return false
	}
	if b.From.IsValid() && !b.From.Contains(f.Orig.Src.Addr()) {
		return false
	}
	return b.Sockets == nil || slices.Contains(b.Sockets, f.Orig.Src)
}

// DeleteBinding deletes b's flows from the kernel's table (of the
// namespace h was opened in) and returns how many it deleted.
func DeleteBinding(h *netlink.Handle, b Binding) (uint, error) {
	if h == nil {
		// A nil handle is netlink's default one: never delete through it
		// from code that was not given this namespace's (fakes).
		return 0, errors.New("no netlink handle for conntrack")
	}
	family := netlink.InetFamily(unix.AF_INET)
	if b.To.Is6() || b.Pool.Addr().Is6() {
		family = unix.AF_INET6
	}
	n, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, family, bindingFilter{b.matcher()})
	if err != nil {
		return n, fmt.Errorf("deleting conntrack entries: %w", err)
	}
	return n, nil
}

// DeleteBinding is DeleteBinding through n's handle.
func (n Netlink) DeleteBinding(b Binding) (uint, error) { return DeleteBinding(n.Handle, b) }

// bindingFilter is a Binding as netlink's delete filter.
type bindingFilter struct{ m *bindingMatcher }

func (f bindingFilter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	return f.m.takes(Flow{Orig: tuple(flow.Forward), Reply: tuple(flow.Reverse)})
}
