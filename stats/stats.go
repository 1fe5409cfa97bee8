// Package stats summarises, per egress address and per pool, what conntrack
// holds and how close each SNAT source is to running out of ports.
//
// SNAT needs a free source port for every flow that shares one (egress
// address, destination address, destination port, protocol): two flows to
// different destinations may use the same port. So exhaustion is per
// tuple, and the number that matters is the busiest tuple's flow count
// against the size of the rule's port range.
//
// A pool (snat's pool.go: --to 2001:db8:1::/64) translates to many
// addresses of its prefix, as many as it has connections when each gets
// its own. Its addresses are folded under one report for the prefix (see
// Pool) instead of a row each: a row per address would be thousands of
// rows of one flow each, and would not say how the pool is doing.
package stats

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/conntrack"
)

// DefaultPortRange is the range SNAT without --to-source ports takes a new
// port from when the flow's own source port is taken: the kernel keeps
// ports of 1024 and above in 1024-65535. (It keeps the original port when
// it is free, so real use is spread over that range.)
var DefaultPortRange = PortRange{1024, 65535}

// WarnRatio is the share of a port range in use that deserves a warning.
const WarnRatio = 0.8

// TopN is how many destinations are listed per address, and how many
// addresses per pool.
const TopN = 10

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi uint16 }

// Size is the number of ports in the range.
func (r PortRange) Size() int { return int(r.Hi) - int(r.Lo) + 1 }

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Lo, r.Hi) }

// RuleCounters is what the nat table's SNAT rules say about one egress
// address, or one pool: its port range and their counters.
type RuleCounters struct {
	// Address is the egress address; unset for a pool.
	Address netip.Addr
	// Pool is the prefix of a pool's rules (their counters summed over
	// every rule that takes an address of it), and Sticky its
	// stickiness ("connection", "destination", "sender"; "" when the
	// backend cannot tell).
	Pool   netip.Prefix
	Sticky string
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
	PortUse
}

// PortUse is what an Address and a Pool both report, under the same JSON
// names: how much of the SNAT port range the busiest tuple holds, and the
// counters of the rules.
type PortUse struct {
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

// crowded sets PortsInUse and Ratio from the busiest tuple's flows, and
// reports whether they reach WarnRatio (the caller then says why in
// Warning).
func (u *PortUse) crowded(inUse int) bool {
	u.PortsInUse = inUse
	u.Ratio = float64(inUse) / float64(u.RangeSize)
	return u.Ratio >= WarnRatio
}

// Report is the whole report: the egress addresses, then the pools.
type Report struct {
	Addresses []Address `json:"addresses"`
	Pools     []Pool    `json:"pools"`
}

// PoolAddress is one busy address of a pool.
type PoolAddress struct {
	Address netip.Addr `json:"address"`
	Flows   int        `json:"flows"`
}

// Tuple is a pool's busiest (address, destination address, destination
// port, protocol): the one holding the most ports of the range, the first
// to run out of them.
type Tuple struct {
	Address netip.Addr     `json:"address"`
	Proto   string         `json:"proto"`
	Dst     netip.AddrPort `json:"dst"`
	Flows   int            `json:"flows"`
}

// Pool is the report for one pool: every flow whose translated source lies
// in its prefix, whichever of its addresses that is. Its addresses get no
// Address row of their own (see the package doc); the busiest are listed
// in TopAddresses, and the busiest tuple, over all of them, gives the port
// use. The JSON names of the fields an Address also has are the same.
type Pool struct {
	Pool   netip.Prefix   `json:"pool"`
	Sticky string         `json:"sticky,omitempty"`
	Flows  map[string]int `json:"flows"` // by protocol
	Total  int            `json:"total_flows"`
	// AddressesInUse is how many distinct addresses of the prefix the
	// flows left with; TopAddresses the TopN busiest of them.
	AddressesInUse int           `json:"addresses_in_use"`
	TopAddresses   []PoolAddress `json:"top_addresses"`
	// Busiest is the busiest tuple, nil (left out) without flows;
	// PortsInUse its flows, each holding one port of PortRange.
	Busiest *Tuple `json:"busiest_tuple,omitempty"`
	PortUse
}

// Compute builds the report for each rule's address and each rule's pool
// from the flows. A flow belongs to the address its replies go to, the
// source it left with: to its Address when a rule names that address,
// else to the pool whose prefix holds it (the longest, when pools nest).
// Rules of one pool (several destinations or senders, or the iptables
// backends' slices) make one Pool, their counters summed.
func Compute(rules []RuleCounters, flows []conntrack.Flow) Report {
	byAddr := map[netip.Addr]*Address{}
	tuples := map[netip.Addr]map[conntrack.Tuple]int{} // Src unset: (proto, dst)
	var order []netip.Addr
	pools := map[netip.Prefix]*poolAcc{}
	var prefixes []netip.Prefix
	for _, r := range rules {
		if r.Pool.IsValid() {
			pa := pools[r.Pool]
			if pa == nil {
				pa = &poolAcc{rep: Pool{Pool: r.Pool, Flows: map[string]int{}}, rng: r.Range, addrs: map[netip.Addr]int{}, tuples: map[conntrack.Tuple]int{}}
				pools[r.Pool] = pa
				prefixes = append(prefixes, r.Pool)
			}
			pa.add(r)
			continue
		}
		if a := byAddr[r.Address]; a != nil {
			// Two readers' rules to one address (the nftables
			// backend's and the host's iptables): one row, as the
			// rules of one reader are.
			if r.Range.Size() < a.RangeSize {
				a.PortRange, a.RangeSize = r.Range.String(), r.Range.Size()
			}
			a.Packets += r.Packets
			a.Bytes += r.Bytes
			a.Ours = a.Ours || r.Ours
			continue
		}
		byAddr[r.Address] = &Address{Address: r.Address, Flows: map[string]int{}, PortUse: PortUse{PortRange: r.Range.String(), RangeSize: r.Range.Size(), Packets: r.Packets, Bytes: r.Bytes, Ours: r.Ours}}
		tuples[r.Address] = map[conntrack.Tuple]int{}
		order = append(order, r.Address)
	}
	// Longest first, so that a pool inside another takes its own flows.
	slices.SortFunc(prefixes, func(x, y netip.Prefix) int { return cmp.Compare(y.Bits(), x.Bits()) })
	for _, f := range flows {
		src := f.TranslatedSource().Addr()
		if a := byAddr[src]; a != nil {
			a.Flows[conntrack.ProtoName(f.Orig.Proto)]++
			a.Total++
			tuples[src][conntrack.Tuple{Proto: f.Orig.Proto, Dst: f.Orig.Dst}]++
			continue
		}
		if len(prefixes) == 0 || !src.Is6() {
			continue
		}
		for _, p := range prefixes {
			if p.Contains(src) {
				pa := pools[p]
				pa.rep.Flows[conntrack.ProtoName(f.Orig.Proto)]++
				pa.rep.Total++
				pa.addrs[src]++
				pa.tuples[conntrack.Tuple{Proto: f.Orig.Proto, Src: netip.AddrPortFrom(src, 0), Dst: f.Orig.Dst}]++
				break
			}
		}
	}
	var out Report
	for _, addr := range order {
		a := byAddr[addr]
		for t, n := range tuples[addr] {
			a.Top = append(a.Top, Destination{Proto: conntrack.ProtoName(t.Proto), Dst: t.Dst, Flows: n})
		}
		slices.SortFunc(a.Top, func(x, y Destination) int {
			return cmp.Or(cmp.Compare(y.Flows, x.Flows), x.Dst.Compare(y.Dst), cmp.Compare(x.Proto, y.Proto))
		})
		inUse := 0
		if len(a.Top) > 0 {
			inUse = a.Top[0].Flows
		}
		a.Top = a.Top[:min(len(a.Top), TopN)]
		if a.crowded(inUse) {
			busiest := a.Top[0]
			a.Warning = fmt.Sprintf("%s: %d of %d NAT ports (%.0f%%) in use for %s %s; new flows to it fail when none is left",
				a.Address, a.PortsInUse, a.RangeSize, 100*a.Ratio, busiest.Proto, busiest.Dst)
		}
		out.Addresses = append(out.Addresses, *a)
	}
	slices.SortFunc(out.Addresses, func(x, y Address) int { return x.Address.Compare(y.Address) })
	for _, p := range prefixes {
		out.Pools = append(out.Pools, pools[p].finish())
	}
	slices.SortFunc(out.Pools, func(x, y Pool) int {
		return cmp.Or(x.Pool.Addr().Compare(y.Pool.Addr()), cmp.Compare(x.Pool.Bits(), y.Pool.Bits()))
	})
	return out
}

// poolAcc gathers one pool's rules and flows.
type poolAcc struct {
	rep      Pool
	rng      PortRange
	stickies []string
	addrs    map[netip.Addr]int
	tuples   map[conntrack.Tuple]int // Src: the address, port 0
}

// add sums one more rule of the pool: the smallest port range, as for an
// address, and the stickinesses it is taken with.
func (pa *poolAcc) add(r RuleCounters) {
	if r.Range.Size() < pa.rng.Size() {
		pa.rng = r.Range
	}
	pa.rep.Packets += r.Packets
	pa.rep.Bytes += r.Bytes
	pa.rep.Ours = pa.rep.Ours || r.Ours
	if r.Sticky != "" && !slices.Contains(pa.stickies, r.Sticky) {
		pa.stickies = append(pa.stickies, r.Sticky)
	}
}

// finish ranks the pool's addresses and tuples, bounded by TopN and one.
func (pa *poolAcc) finish() Pool {
	p := pa.rep
	slices.Sort(pa.stickies)
	p.Sticky = strings.Join(pa.stickies, ",")
	p.PortRange, p.RangeSize = pa.rng.String(), pa.rng.Size()
	p.AddressesInUse = len(pa.addrs)
	p.TopAddresses = make([]PoolAddress, 0, len(pa.addrs))
	for a, n := range pa.addrs {
		p.TopAddresses = append(p.TopAddresses, PoolAddress{a, n})
	}
	slices.SortFunc(p.TopAddresses, func(x, y PoolAddress) int {
		return cmp.Or(cmp.Compare(y.Flows, x.Flows), x.Address.Compare(y.Address))
	})
	p.TopAddresses = slices.Clip(p.TopAddresses[:min(len(p.TopAddresses), TopN)])
	for t, n := range pa.tuples {
		c := Tuple{Address: t.Src.Addr(), Proto: conntrack.ProtoName(t.Proto), Dst: t.Dst, Flows: n}
		if p.Busiest == nil || busier(c, *p.Busiest) {
			p.Busiest = &c
		}
	}
	inUse := 0
	if p.Busiest != nil {
		inUse = p.Busiest.Flows
	}
	if p.crowded(inUse) {
		b := p.Busiest
		p.Warning = fmt.Sprintf("pool %s: %d of %d NAT ports (%.0f%%) of %s in use for %s %s; new flows to it from that address fail when none is left",
			p.Pool, p.PortsInUse, p.RangeSize, 100*p.Ratio, b.Address, b.Proto, b.Dst)
	}
	return p
}

// busier orders tuples by flows, then by address, destination and
// protocol, so that a tie gives the same busiest on every run.
func busier(x, y Tuple) bool {
	return cmp.Or(cmp.Compare(y.Flows, x.Flows), x.Address.Compare(y.Address), x.Dst.Compare(y.Dst), cmp.Compare(x.Proto, y.Proto)) < 0
}
