// Package stats summarises, per egress address, what conntrack holds and
// how close each SNAT source is to running out of ports.
//
// SNAT needs a free source port for every flow that shares one (egress
// address, destination address, destination port, protocol): two flows to
// different destinations may use the same port. So exhaustion is per
// tuple, and the number that matters is the busiest tuple's flow count
// against the size of the rule's port range.
package stats

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/egress-snat/egress-snat/conntrack"
)

// DefaultPortRange is the range SNAT without --to-source ports takes a new
// port from when the flow's own source port is taken: the kernel keeps
// ports of 1024 and above in 1024-65535. (It keeps the original port when
// it is free, so real use is spread over that range.)
var DefaultPortRange = PortRange{1024, 65535}

// WarnRatio is the share of a port range in use that deserves a warning.
const WarnRatio = 0.8

// TopN is how many destinations are listed per address.
const TopN = 10

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi uint16 }

// Size is the number of ports in the range.
func (r PortRange) Size() int { return int(r.Hi) - int(r.Lo) + 1 }

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Lo, r.Hi) }

// RuleCounters is what the nat table's SNAT rules say about one egress
// address: its port range and their counters.
type RuleCounters struct {
	Address netip.Addr
	// Range is the SNAT port range, DefaultPortRange when the rule names
	// none.
	Range PortRange
	// Packets and Bytes are the rules' counters (iptables-save -c), summed
	// over the rules that SNAT to the address. The iptables backend reads
	// them (iptables.Backend.SNATCounters).
	Packets, Bytes uint64
	// Ours is true when egress-snat wrote the rule.
	Ours bool
}

// Destination is one busy destination of an address.
type Destination struct {
	Proto string         `json:"proto"`
	Dst   netip.AddrPort `json:"dst"`
	Flows int            `json:"flows"`
}

// Address is the report for one egress address.
type Address struct {
	Address netip.Addr     `json:"address"`
	Flows   map[string]int `json:"flows"` // by protocol
	Total   int            `json:"total_flows"`
	Top     []Destination  `json:"top_destinations"`
	// PortRange is the SNAT port range; PortsInUse the flows of the
	// busiest tuple, each holding one port of it.
	PortRange  string  `json:"port_range"`
	RangeSize  int     `json:"port_range_size"`
	PortsInUse int     `json:"ports_in_use"`
	Ratio      float64 `json:"port_use_ratio"`
	Warning    string  `json:"warning,omitempty"`
	Packets    uint64  `json:"rule_packets"`
	Bytes      uint64  `json:"rule_bytes"`
	Ours       bool    `json:"managed"`
}

// Compute builds the report for each rule's address from the flows. A flow
// belongs to the address its replies go to, the source it left with.
func Compute(rules []RuleCounters, flows []conntrack.Flow) []Address {
	byAddr := map[netip.Addr]*Address{}
	tuples := map[netip.Addr]map[conntrack.Tuple]int{} // Src unset: (proto, dst)
	var out []Address
	for _, r := range rules {
		byAddr[r.Address] = &Address{Address: r.Address, Flows: map[string]int{}, PortRange: r.Range.String(), RangeSize: r.Range.Size(), Packets: r.Packets, Bytes: r.Bytes, Ours: r.Ours}
		tuples[r.Address] = map[conntrack.Tuple]int{}
	}
	for _, f := range flows {
		a := byAddr[f.TranslatedSource().Addr()]
		if a == nil {
			continue
		}
		a.Flows[conntrack.ProtoName(f.Orig.Proto)]++
		a.Total++
		tuples[a.Address][conntrack.Tuple{Proto: f.Orig.Proto, Dst: f.Orig.Dst}]++
	}
	for _, r := range rules {
		a := byAddr[r.Address]
		for t, n := range tuples[r.Address] {
			a.Top = append(a.Top, Destination{Proto: conntrack.ProtoName(t.Proto), Dst: t.Dst, Flows: n})
		}
		slices.SortFunc(a.Top, func(x, y Destination) int {
			return cmp.Or(cmp.Compare(y.Flows, x.Flows), x.Dst.Compare(y.Dst), cmp.Compare(x.Proto, y.Proto))
		})
		if len(a.Top) > 0 {
			a.PortsInUse = a.Top[0].Flows
		}
		a.Top = a.Top[:min(len(a.Top), TopN)]
		a.Ratio = float64(a.PortsInUse) / float64(a.RangeSize)
		if a.Ratio >= WarnRatio {
			busiest := a.Top[0]
			a.Warning = fmt.Sprintf("%s: %d of %d NAT ports (%.0f%%) in use for %s %s; new flows to it fail when none is left",
				a.Address, a.PortsInUse, a.RangeSize, 100*a.Ratio, busiest.Proto, busiest.Dst)
		}
		out = append(out, *a)
	}
	slices.SortFunc(out, func(x, y Address) int { return x.Address.Compare(y.Address) })
	return out
}
