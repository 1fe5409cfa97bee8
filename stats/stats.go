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
	"bufio"
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
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

// TopN is how many destinations are listed per address.
const TopN = 10

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi uint16 }

// Size is the number of ports in the range.
func (r PortRange) Size() int { return int(r.Hi) - int(r.Lo) + 1 }

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Lo, r.Hi) }

// Rule is what the nat table says about one egress address.
type Rule struct {
	Address netip.Addr
	// Range is the SNAT port range, DefaultPortRange when the rule names
	// none.
	Range PortRange
	// Packets and Bytes are the rules' counters (iptables-save -c), summed
	// over the rules that SNAT to the address.
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
func Compute(rules []Rule, flows []conntrack.Flow) []Address {
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

// RulesFromSave reads the SNAT rules of a nat table saved with counters
// (iptables-save -c) and returns one Rule per --to-source address: the
// smallest port range named for it, the counters summed. A rule carrying
// comment marks it as egress-snat's.
func RulesFromSave(text, comment string) ([]Rule, error) {
	byAddr := map[netip.Addr]*Rule{}
	var order []netip.Addr
	inNat := false
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "*") {
			inNat = line == "*nat"
			continue
		}
		if !inNat {
			continue
		}
		var pk, by uint64
		if strings.HasPrefix(line, "[") {
			c, rest, ok := strings.Cut(line[1:], "] ")
			if !ok {
				continue
			}
			p, b, _ := strings.Cut(c, ":")
			var err1, err2 error
			pk, err1 = strconv.ParseUint(p, 10, 64)
			by, err2 = strconv.ParseUint(b, 10, 64)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("bad counters in %q", line)
			}
			line = rest
		}
		if !strings.HasPrefix(line, "-A ") || !strings.Contains(line, " -j SNAT") {
			continue
		}
		f := strings.Fields(line)
		i := slices.Index(f, "--to-source")
		if i < 0 || i+1 >= len(f) {
			continue
		}
		a, pr, ok := parseToSource(f[i+1])
		if !ok {
			return nil, fmt.Errorf("bad --to-source %q", f[i+1])
		}
		r := byAddr[a]
		if r == nil {
			r = &Rule{Address: a, Range: DefaultPortRange}
			byAddr[a] = r
			order = append(order, a)
		}
		if pr.Size() < r.Range.Size() {
			r.Range = pr
		}
		r.Packets += pk
		r.Bytes += by
		if comment != "" && strings.Contains(line, "--comment "+comment) {
			r.Ours = true
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	out := make([]Rule, 0, len(order))
	for _, a := range order {
		out = append(out, *byAddr[a])
	}
	return out, nil
}

// parseToSource reads 192.0.2.23, 192.0.2.23:40000-40099,
// [2001:db8::22]:40000-40099 or 2001:db8::22; a range of addresses counts
// as its first.
func parseToSource(v string) (netip.Addr, PortRange, bool) {
	host, ports := v, ""
	if rest, ok := strings.CutPrefix(v, "["); ok {
		host, ports, _ = strings.Cut(rest, "]")
		ports = strings.TrimPrefix(ports, ":")
	} else if strings.Count(v, ":") == 1 {
		host, ports, _ = strings.Cut(v, ":")
	}
	host, _, _ = strings.Cut(host, "-")
	a, err := netip.ParseAddr(host)
	if err != nil {
		return a, PortRange{}, false
	}
	if ports == "" {
		return a, DefaultPortRange, true
	}
	lo, hi, found := strings.Cut(ports, "-")
	if !found {
		hi = lo
	}
	l, err1 := strconv.ParseUint(lo, 10, 16)
	h, err2 := strconv.ParseUint(hi, 10, 16)
	if err1 != nil || err2 != nil || l > h {
		return a, PortRange{}, false
	}
	return a, PortRange{uint16(l), uint16(h)}, true
}
