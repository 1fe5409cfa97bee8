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
		out = append(out, Flow{
			Orig:    tuple(r.Forward),
			Reply:   tuple(r.Reverse),
			Packets: r.Forward.Packets,
			Bytes:   r.Forward.Bytes,
		})
	}
	return out, nil
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
