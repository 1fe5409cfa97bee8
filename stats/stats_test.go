package stats

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/egress-snat/egress-snat/conntrack"
)

func flow(proto uint8, src, dst, leftWith string) conntrack.Flow {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	return conntrack.Flow{
		Orig:  conntrack.Tuple{Proto: proto, Src: s, Dst: d},
		Reply: conntrack.Tuple{Proto: proto, Src: d, Dst: netip.AddrPortFrom(netip.MustParseAddr(leftWith), s.Port())},
	}
}

func testReport(t *testing.T) Report {
	// What the iptables backend reads from a nat table with two rules of
	// ours to 192.0.2.22 and another tool's to 192.0.2.23:40000-40099
	// (iptables' TestSNATCounters).
	rules := []RuleCounters{
		{Address: netip.MustParseAddr("192.0.2.22"), Range: DefaultPortRange, Packets: 10, Bytes: 600, Ours: true},
		{Address: netip.MustParseAddr("192.0.2.23"), Range: PortRange{40000, 40099}, Packets: 1, Bytes: 60},
	}
	var flows []conntrack.Flow
	for i := range 85 { // 85 of 100 ports for one tuple: a warning
		flows = append(flows, flow(conntrack.UDP, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.250"), uint16(30000+i)).String(), "198.51.100.5:53", "192.0.2.23"))
	}
	flows = append(flows,
		flow(conntrack.TCP, "192.0.2.250:30001", "198.51.100.4:443", "192.0.2.22"),
		flow(conntrack.TCP, "192.0.2.250:30002", "198.51.100.4:443", "192.0.2.22"),
		flow(conntrack.UDP, "192.0.2.250:30003", "203.0.113.9:53", "192.0.2.22"),
		flow(conntrack.TCP, "192.0.2.250:30004", "203.0.113.9:80", "192.0.2.250"), // not an egress address of a rule
	)
	return Compute(rules, flows)
}

func TestCompute(t *testing.T) {
	r := testReport(t).Addresses
	if len(r) != 2 {
		t.Fatalf("report %+v", r)
	}
	a22, a23 := r[0], r[1]
	if a22.Total != 3 || a22.Flows["tcp"] != 2 || a22.Flows["udp"] != 1 || a22.PortsInUse != 2 || a22.Warning != "" {
		t.Errorf("192.0.2.22: %+v", a22)
	}
	if a22.Top[0].Dst.String() != "198.51.100.4:443" || a22.Top[0].Flows != 2 {
		t.Errorf("busiest destination of .22: %+v", a22.Top)
	}
	if a23.PortsInUse != 85 || a23.RangeSize != 100 || !strings.Contains(a23.Warning, "85 of 100") {
		t.Errorf("192.0.2.23: %+v", a23)
	}
}

func TestPromTextfileParses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "egress_snat.prom")
	at := time.Unix(1767225600, 250e6)
	report := testReport(t)
	report.Pools = testPools(t).Pools
	if err := WritePromFile(path, report, at, nil); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("textfile does not parse: %v\n%s", err, b)
	}
	ratio := families["egress_snat_nat_port_use_ratio"]
	if ratio == nil {
		t.Fatalf("no port use ratio in\n%s", b)
	}
	found := false
	for _, m := range ratio.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "address" && l.GetValue() == "192.0.2.23" {
				found = m.GetGauge().GetValue() == 0.85
			}
		}
	}
	if !found {
		t.Errorf("192.0.2.23's ratio is not 0.85:\n%s", b)
	}
	if c := families["egress_snat_rule_packets_total"]; c == nil || c.GetType().String() != "COUNTER" {
		t.Errorf("packet counter missing or not a counter")
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
	last := families[LastRunMetric]
	if last == nil || last.GetType().String() != "GAUGE" || len(last.GetMetric()) != 1 {
		t.Fatalf("want one gauge %s, the node_exporter textfile convention, in\n%s", LastRunMetric, b)
	}
	if got := last.GetMetric()[0].GetGauge().GetValue(); got != 1767225600.25 {
		t.Errorf("%s = %v, want 1767225600.25 (the time written, in Unix seconds)", LastRunMetric, got)
	}
	// What promtool check metrics would ask of the names.
	for name, f := range families {
		if !strings.HasPrefix(name, "egress_snat_") || f.GetHelp() == "" {
			t.Errorf("%s: want the egress_snat_ prefix and a HELP line", name)
		}
		if isCounter := f.GetType().String() == "COUNTER"; isCounter != strings.HasSuffix(name, "_total") {
			t.Errorf("%s is a %s: counters, and only counters, end in _total", name, f.GetType())
		}
	}
}

// TestPromFileMissingDirectory: a textfile path in a directory that does
// not exist is refused with an error naming the directory, and nothing is
// written.
func TestPromFileMissingDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "textfile_collector")
	path := filepath.Join(dir, "egress_snat.prom")
	err := WritePromFile(path, testReport(t), time.Now(), nil)
	if err == nil || !strings.Contains(err.Error(), "the directory "+dir+" does not exist") || strings.Contains(err.Error(), ".tmp") {
		t.Errorf("WritePromFile into a missing directory: %v; want an error naming %s", err, dir)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("WritePromFile created %s", dir)
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := CheckPromDir(filepath.Join(file, "egress_snat.prom")); err == nil || !strings.Contains(err.Error(), file+" is not a directory") {
		t.Errorf("CheckPromDir under a regular file: %v, want it named as not a directory", err)
	}
}

// testPools is what the backends read for a /64 pool of two rules (two
// destinations, per connection), a /124 pool inside it, and a rule to one
// address of the /64 by name; and the flows that left with them.
func testPools(t *testing.T) Report {
	t.Helper()
	p64, p124 := netip.MustParsePrefix("2001:db8:1::/64"), netip.MustParsePrefix("2001:db8:1:0:1::/124")
	rules := []RuleCounters{
		{Pool: p64, Sticky: "connection", Range: DefaultPortRange, Packets: 10, Bytes: 600, Ours: true},
		{Pool: p124, Sticky: "destination", Range: DefaultPortRange, Packets: 2, Bytes: 120, Ours: true},
		{Pool: p64, Sticky: "connection", Range: DefaultPortRange, Packets: 5, Bytes: 300, Ours: true},
		{Address: netip.MustParseAddr("2001:db8:1::99"), Range: DefaultPortRange, Packets: 1, Bytes: 60, Ours: true},
	}
	f := func(proto uint8, port int, dst, leftWith string) conntrack.Flow {
		return flow(proto, fmt.Sprintf("[2001:db8::250]:%d", port), dst, leftWith)
	}
	flows := []conntrack.Flow{
		f(conntrack.TCP, 30001, "[2001:db8:ffff::4]:80", "2001:db8:1::a"),
		f(conntrack.TCP, 30002, "[2001:db8:ffff::4]:80", "2001:db8:1::a"),
		f(conntrack.TCP, 30003, "[2001:db8:ffff::4]:80", "2001:db8:1::a"),
		f(conntrack.TCP, 30004, "[2001:db8:ffff::4]:80", "2001:db8:1::b"),
		f(conntrack.UDP, 30005, "[2001:db8:ffff::5]:53", "2001:db8:1::b"),
		f(conntrack.UDP, 30006, "[2001:db8:ffff::5]:53", "2001:db8:1::b"),
		f(conntrack.TCP, 30007, "[2001:db8:ffff::4]:80", "2001:db8:1:0:1::3"), // the /124's
		f(conntrack.TCP, 30008, "[2001:db8:ffff::4]:80", "2001:db8:1::99"),    // the address rule's
		f(conntrack.TCP, 30009, "[2001:db8:ffff::4]:80", "2001:db8:2::1"),     // no rule's
		flow(conntrack.TCP, "192.0.2.250:30010", "198.51.100.4:443", "192.0.2.22"),
	}
	return Compute(rules, flows)
}

// TestComputePools: a pool's flows, whichever of its addresses they left
// with, make one Pool: its flows, distinct addresses, busiest addresses and
// busiest tuple, and its rules' counters summed. A pool inside another
// keeps its own flows; an address a rule names keeps its row.
func TestComputePools(t *testing.T) {
	r := testPools(t)
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	want := []Pool{
		{
			Pool: netip.MustParsePrefix("2001:db8:1::/64"), Sticky: "connection",
			Flows: map[string]int{"tcp": 4, "udp": 2}, Total: 6,
			AddressesInUse: 2,
			TopAddresses:   []PoolAddress{{a("2001:db8:1::a"), 3}, {a("2001:db8:1::b"), 3}},
			Busiest:        &Tuple{Address: a("2001:db8:1::a"), Proto: "tcp", Dst: netip.MustParseAddrPort("[2001:db8:ffff::4]:80"), Flows: 3},
			PortUse: PortUse{PortRange: "1024-65535", RangeSize: 64512, PortsInUse: 3, Ratio: 3.0 / 64512,
				Packets: 15, Bytes: 900, Ours: true},
		},
		{
			Pool: netip.MustParsePrefix("2001:db8:1:0:1::/124"), Sticky: "destination",
			Flows: map[string]int{"tcp": 1}, Total: 1,
			AddressesInUse: 1,
			TopAddresses:   []PoolAddress{{a("2001:db8:1:0:1::3"), 1}},
			Busiest:        &Tuple{Address: a("2001:db8:1:0:1::3"), Proto: "tcp", Dst: netip.MustParseAddrPort("[2001:db8:ffff::4]:80"), Flows: 1},
			PortUse: PortUse{PortRange: "1024-65535", RangeSize: 64512, PortsInUse: 1, Ratio: 1.0 / 64512,
				Packets: 2, Bytes: 120, Ours: true},
		},
	}
	if diff := cmp.Diff(want, r.Pools, cmp.Comparer(func(x, y netip.Addr) bool { return x == y }), cmp.Comparer(func(x, y netip.Prefix) bool { return x == y }), cmp.Comparer(func(x, y netip.AddrPort) bool { return x == y })); diff != "" {
		t.Errorf("pools (-want +got):\n%s", diff)
	}
	if len(r.Addresses) != 1 || r.Addresses[0].Address != a("2001:db8:1::99") || r.Addresses[0].Total != 1 {
		t.Errorf("addresses %+v, want 2001:db8:1::99 alone, with its one flow: the pools' addresses have no row", r.Addresses)
	}
}

// TestComputePoolBounds: a pool's busiest addresses are bounded by TopN
// while it counts every address; a busy tuple warns, naming the address.
func TestComputePoolBounds(t *testing.T) {
	pool := netip.MustParsePrefix("2001:db8:1::/64")
	rules := []RuleCounters{{Pool: pool, Range: PortRange{40000, 40009}}}
	var flows []conntrack.Flow
	for i := range 25 {
		flows = append(flows, flow(conntrack.TCP, fmt.Sprintf("[2001:db8::250]:%d", 30000+i), "[2001:db8:ffff::4]:443", fmt.Sprintf("2001:db8:1::%x", 0x100+i)))
	}
	for i := range 9 { // 9 of 10 ports of 2001:db8:1::7's tuple
		flows = append(flows, flow(conntrack.UDP, fmt.Sprintf("[2001:db8::250]:%d", 31000+i), "[2001:db8:ffff::5]:53", "2001:db8:1::7"))
	}
	r := Compute(rules, flows)
	if len(r.Pools) != 1 || len(r.Addresses) != 0 {
		t.Fatalf("report %+v, want one pool and no address", r)
	}
	p := r.Pools[0]
	if p.Total != 34 || p.AddressesInUse != 26 || len(p.TopAddresses) != TopN || p.TopAddresses[0] != (PoolAddress{netip.MustParseAddr("2001:db8:1::7"), 9}) {
		t.Errorf("pool: %d flows, %d addresses, top %v; want 34 flows, 26 addresses, %d listed, 2001:db8:1::7 first with 9", p.Total, p.AddressesInUse, p.TopAddresses, TopN)
	}
	if p.PortsInUse != 9 || p.RangeSize != 10 || p.Ratio != 0.9 || p.Sticky != "" {
		t.Errorf("port use %d of %d (%v), sticky %q; want 9 of 10, no sticky", p.PortsInUse, p.RangeSize, p.Ratio, p.Sticky)
	}
	if want := "pool 2001:db8:1::/64: 9 of 10 NAT ports (90%) of 2001:db8:1::7 in use for udp [2001:db8:ffff::5]:53"; !strings.HasPrefix(p.Warning, want) {
		t.Errorf("warning %q, want it to start %q", p.Warning, want)
	}
	if r := Compute(rules, nil); len(r.Pools) != 1 || r.Pools[0].Busiest != nil || r.Pools[0].Warning != "" || r.Pools[0].AddressesInUse != 0 {
		t.Errorf("a pool without flows: %+v", r.Pools)
	}
}

// TestPromPoolsBounded: a pool is one set of series labelled by its
// prefix, however many of its addresses are in use.
func TestPromPoolsBounded(t *testing.T) {
	pool := netip.MustParsePrefix("2001:db8:1::/64")
	var flows []conntrack.Flow
	for i := range 1000 {
		flows = append(flows, flow(conntrack.TCP, fmt.Sprintf("[2001:db8::250]:%d", 30000+i), "[2001:db8:ffff::4]:443", fmt.Sprintf("2001:db8:1::%x", 0x100+i)))
	}
	var b bytes.Buffer
	if err := WriteProm(&b, Compute([]RuleCounters{{Pool: pool, Range: DefaultPortRange, Packets: 1000, Ours: true}}, flows), time.Unix(0, 0), nil); err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(b.Bytes()))
	if err != nil {
		t.Fatalf("textfile does not parse: %v\n%s", err, b.String())
	}
	series := 0
	for name, f := range families {
		if !strings.HasPrefix(name, "egress_snat_pool_") {
			continue
		}
		for _, m := range f.GetMetric() {
			series++
			for _, l := range m.GetLabel() {
				if l.GetName() != "pool" && l.GetName() != "proto" {
					t.Errorf("%s has a label %s=%s: a pool's series are labelled by pool (and proto) only", name, l.GetName(), l.GetValue())
				}
				if l.GetName() == "pool" && l.GetValue() != pool.String() {
					t.Errorf("%s{pool=%q}, want %s", name, l.GetValue(), pool)
				}
			}
		}
	}
	if series > 12 {
		t.Errorf("%d pool series for one pool of 1000 addresses in use, want a dozen at most:\n%s", series, b.String())
	}
	want := map[string]float64{
		"egress_snat_pool_addresses_in_use":      1000,
		"egress_snat_pool_busiest_address_flows": 1,
		"egress_snat_pool_rule_packets_total":    1000,
		"egress_snat_pool_nat_ports_in_use":      1, // each tuple is of one address
	}
	for name, v := range want {
		f := families[name]
		if f == nil || len(f.GetMetric()) != 1 {
			t.Errorf("want one %s:\n%s", name, b.String())
			continue
		}
		m := f.GetMetric()[0]
		got := m.GetGauge().GetValue()
		if m.GetCounter() != nil {
			got = m.GetCounter().GetValue()
		}
		if got != v {
			t.Errorf("%s = %v, want %v", name, got, v)
		}
	}
}
