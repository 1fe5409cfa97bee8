package stats

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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

func testReport(t *testing.T) []Address {
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
	r := testReport(t)
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
	if err := WritePromFile(path, testReport(t), at, nil); err != nil {
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
