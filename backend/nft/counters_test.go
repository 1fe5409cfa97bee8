package nft

import (
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/stats"
)

// TestRuleCounters: an address's rules sum, with the smallest port range; a
// spread rule shares its counts; a pool's rule is one stats.RuleCounters
// for its prefix, with its stickiness.
func TestRuleCounters(t *testing.T) {
	a := netip.MustParseAddr
	p := netip.MustParsePrefix("2001:db8:1::/64")
	got := ruleCounters([]Counter{
		{To: []netip.Addr{a("192.0.2.22")}, Packets: 3, Bytes: 180},
		{To: []netip.Addr{a("192.0.2.22"), a("192.0.2.23")}, Ports: snat.Ports{Lo: 40000, Hi: 40099}, Packets: 4, Bytes: 240},
		{Pool: p, Sticky: snat.StickyConnection, Packets: 7, Bytes: 560},
		{Pool: p, Sticky: snat.StickyDestination, Packets: 1, Bytes: 80},
	})
	want := []stats.RuleCounters{
		{Address: a("192.0.2.22"), Range: stats.PortRange{Lo: 40000, Hi: 40099}, Packets: 5, Bytes: 300, Ours: true},
		{Address: a("192.0.2.23"), Range: stats.PortRange{Lo: 40000, Hi: 40099}, Packets: 2, Bytes: 120, Ours: true},
		{Pool: p, Sticky: "connection", Range: stats.DefaultPortRange, Packets: 7, Bytes: 560, Ours: true},
		{Pool: p, Sticky: "destination", Range: stats.DefaultPortRange, Packets: 1, Bytes: 80, Ours: true},
	}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(x, y netip.Addr) bool { return x == y }), cmp.Comparer(func(x, y netip.Prefix) bool { return x == y })); diff != "" {
		t.Errorf("ruleCounters (-want +got):\n%s", diff)
	}
}
