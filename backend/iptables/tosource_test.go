package iptables

import (
	"net/netip"
	"testing"

	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/stats"
)

// TestParseToSource: every form iptables-save prints, read by the one
// parser; and what ParseRule, reading egress-snat's own rules, refuses.
func TestParseToSource(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.23":                              "192.0.2.23",
		"192.0.2.22-192.0.2.23":                   "192.0.2.22-192.0.2.23",
		"192.0.2.23:40000-40099":                  "192.0.2.23 40000-40099",
		"192.0.2.23:5000":                         "192.0.2.23 5000-5000",
		"192.0.2.22-192.0.2.23:40000":             "192.0.2.22-192.0.2.23 40000-40000",
		"2001:db8::22":                            "2001:db8::22",
		"2001:db8::22-2001:db8::23":               "2001:db8::22-2001:db8::23",
		"[2001:db8::22]":                          "2001:db8::22",
		"[2001:db8::22]:40000":                    "2001:db8::22 40000-40000",
		"[2001:db8::22]:40000-40099":              "2001:db8::22 40000-40099",
		"[2001:db8::22-2001:db8::23]:40000-40099": "2001:db8::22-2001:db8::23 40000-40099",
		"[2001:db8::22]-[2001:db8::23]":           "2001:db8::22-2001:db8::23",
	} {
		ts, err := parseToSource(in)
		got := ts.From.String()
		if ts.To.IsValid() {
			got += "-" + ts.To.String()
		}
		if ts.HasPorts {
			got += " " + ts.Ports.String()
		}
		if err != nil || got != want {
			t.Errorf("parseToSource(%q) = %s, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"", "eth0", "192.0.2.23:", "192.0.2.23:x", "192.0.2.23:99-1", "192.0.2.23:70000",
		"192.0.2.22-", "2001:db8::22]", "[2001:db8::22]40000", "[2001:db8::22]:"} {
		if ts, err := parseToSource(in); err == nil {
			t.Errorf("parseToSource(%q) = %+v, want an error", in, ts)
		}
	}
	if ts, _ := parseToSource("192.0.2.23"); ts.Ports != (stats.PortRange{}) {
		t.Errorf("no ports given, got %v", ts.Ports)
	}
	spec := func(to string) []string {
		return []string{"-s", "192.0.2.250/32", "-o", "eth0", "-m", "comment", "--comment", Comment, "-j", "SNAT", "--to-source", to}
	}
	if r, err := ParseRule(snat.IPv4, spec("192.0.2.22")); err != nil || r.ToSource != netip.MustParseAddr("192.0.2.22") {
		t.Errorf("ParseRule of our own rule: %+v, %v", r, err)
	}
	for _, v := range []string{"192.0.2.22-192.0.2.23", "192.0.2.22:40000"} {
		if r, err := ParseRule(snat.IPv4, spec(v)); err == nil {
			t.Errorf("ParseRule read --to-source %s, which egress-snat never writes, as %+v", v, r)
		}
	}
}
