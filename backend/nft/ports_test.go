package nft

import (
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// TestRenderPorts: an entry with a port range is its rule for TCP and for
// UDP with the range (the kernel applies one only to a protocol with
// ports), then its rule without for the rest; the table reads back as the
// entry, port range and all.
func TestRenderPorts(t *testing.T) {
	e := entry("203.0.113.7", "192.0.2.250", "192.0.2.22", "192.0.2.23")
	e.Ports = snat.Ports{Lo: 40000, Hi: 40007}
	plain := entry("198.51.100.4", "192.0.2.250", "192.0.2.22")
	tbl, err := Render([]snat.Entry{e, plain})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range tbl.Chain(ChainNAT).Rules {
		if r.Action.Kind == ActSNAT {
			got = append(got, r.String())
		}
	}
	want := []string{
		`meta nfproto ipv4 oifname "eth0" ip saddr 192.0.2.250 ip daddr 198.51.100.4 counter snat ip to 192.0.2.22 comment "host"`,
		`meta nfproto ipv4 oifname "eth0" ip saddr 192.0.2.250 ip daddr 203.0.113.7 meta l4proto tcp counter snat ip to numgen inc mod 2 map { 0 : 192.0.2.22, 1 : 192.0.2.23 }:40000-40007 comment "host"`,
		`meta nfproto ipv4 oifname "eth0" ip saddr 192.0.2.250 ip daddr 203.0.113.7 meta l4proto udp counter snat ip to numgen inc mod 2 map { 0 : 192.0.2.22, 1 : 192.0.2.23 }:40000-40007 comment "host"`,
		`meta nfproto ipv4 oifname "eth0" ip saddr 192.0.2.250 ip daddr 203.0.113.7 counter snat ip to numgen inc mod 2 map { 0 : 192.0.2.22, 1 : 192.0.2.23 } comment "host"`,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
	back := tbl.entries(snat.IPv4, routes.State{})
	wantBack := []snat.Entry{e, plain}
	snat.SortEntries(wantBack)
	if diff := cmp.Diff(wantBack, back, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("entries read back (-want +got):\n%s", diff)
	}
}

// TestRenderSpill: a spill entry (snat/spill.go) is one rule for its
// destination, protocol and port, ahead of its sender's other rules, the
// set of the rule it spills from included, and never a set member itself;
// the table reads back as the entries.
func TestRenderSpill(t *testing.T) {
	var es []snat.Entry
	for i := range snat.SetThreshold {
		e := entry(netip.AddrFrom4([4]byte{198, 51, 100, byte(i + 1)}).String(), "192.0.2.250", "192.0.2.22")
		e.Ports = snat.Ports{Lo: 40000, Hi: 40009}
		es = append(es, e)
	}
	var spills []snat.Entry
	for i := range snat.SetThreshold { // as many as would make a set
		spills = append(spills, snat.SpillEntry(es[0], netip.AddrFrom4([4]byte{198, 51, 100, byte(i + 1)}), "tcp", 443, addrs("192.0.2.23")))
	}
	all := append(append([]snat.Entry{}, es...), spills...)
	tbl, err := Render(all)
	if err != nil {
		t.Fatal(err)
	}
	rules := tbl.Chain(ChainNAT).Rules
	for i, r := range rules[:len(spills)] {
		want := `meta nfproto ipv4 oifname "eth0" ip saddr 192.0.2.250 ip daddr ` + spills[i].Dst.Addr().String() + ` meta l4proto tcp th dport 443 counter snat ip to 192.0.2.23:40000-40009 comment "host"`
		if r.String() != want {
			t.Errorf("rule %d: %s; want %s", i, r, want)
		}
	}
	if r := rules[len(spills)]; r.Set == "" || r.DPort != 0 {
		t.Errorf("rule after the spills: %s; want the rule's set", r)
	}
	back := tbl.entries(snat.IPv4, routes.State{})
	snat.SortEntries(all)
	if diff := cmp.Diff(all, back, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("entries read back (-want +got):\n%s", diff)
	}
}
