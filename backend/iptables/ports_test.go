package iptables

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/snat"
)

// TestPortsRules: an entry with a port range is written once for TCP and
// once for UDP with the range (iptables takes a port range only after -p),
// then once without for the rest; a spread takes its turns in each.
func TestPortsRules(t *testing.T) {
	e := entry("203.0.113.7/32", "192.0.2.250", "192.0.2.22", "192.0.2.23")
	e.Ports = snat.Ports{Lo: 40000, Hi: 40007}
	c := Render(snat.IPv4, []snat.Entry{e})
	var got []string
	for _, r := range c.Rules {
		got = append(got, r.String())
	}
	tail := func(s string) string { return s[strings.Index(s, "-o eth0"):] }
	want := []string{
		"-o eth0 -p tcp -m comment --comment egress-snat -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source 192.0.2.22:40000-40007",
		"-o eth0 -p tcp -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23:40000-40007",
		"-o eth0 -p udp -m comment --comment egress-snat -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source 192.0.2.22:40000-40007",
		"-o eth0 -p udp -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23:40000-40007",
		"-o eth0 -m comment --comment egress-snat -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source 192.0.2.22",
		"-o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23",
	}
	var tails []string
	for _, g := range got {
		tails = append(tails, tail(g))
	}
	if diff := cmp.Diff(want, tails); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
	// IPv6 brackets the address.
	e6 := entry("2001:db8:ffff::4/128", "2001:db8::250", "2001:db8::22")
	e6.Ports = snat.Ports{Lo: 40000, Hi: 40000}
	r6 := Render(snat.IPv6, []snat.Entry{e6}).Rules[0].String()
	if !strings.HasSuffix(r6, "--to-source [2001:db8::22]:40000") {
		t.Errorf("IPv6 rule %s, want --to-source [2001:db8::22]:40000", r6)
	}
	// Every rule reads back as itself.
	for _, r := range append(Render(snat.IPv4, []snat.Entry{e}).Rules, Render(snat.IPv6, []snat.Entry{e6}).Rules...) {
		f := snat.FamilyOf(r.Src.Addr())
		back, err := ParseRule(f, r.Args())
		if err != nil || back != r {
			t.Errorf("ParseRule(%s) = %+v, %v; want the rule back", r, back, err)
		}
	}
}

// TestPortsReadBack: entries with port ranges, single and through a set,
// read back as themselves, so a re-plan is empty; a port range without
// -p, or -p without one, is not ours.
func TestPortsReadBack(t *testing.T) {
	m, _, _ := newFakeManager()
	want := []snat.Entry{entry("203.0.113.7/32", "192.0.2.250", "192.0.2.22", "192.0.2.23"), entry("2001:db8:ffff::4/128", "2001:db8::250", "2001:db8::22")}
	want[0].Ports = snat.Ports{Lo: 40000, Hi: 40007}
	want[1].Ports = snat.Ports{Lo: 1024, Hi: 2047}
	for i := range 9 { // enough for a set
		e := entry(fmt.Sprintf("198.51.100.%d/32", i+1), "192.0.2.250", "192.0.2.22")
		e.Ports = snat.Ports{Lo: 50000, Hi: 50099}
		want = append(want, e)
	}
	snat.SortEntries(want)
	update(t, m, func(*snat.State) []snat.Entry { return want })
	st, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, st.Entries(), cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("read back (-want +got):\n%s", diff)
	}
	if p := m.MakePlan(st, want); !p.Empty() {
		t.Errorf("re-plan is not empty: %v", p.Changes)
	}
	for _, rule := range []string{
		"-s 192.0.2.250/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22:40000-40007",
		"-s 192.0.2.250/32 -o eth0 -p tcp -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22",
		"-s 192.0.2.250/32 -o eth0 -p icmp -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22",
	} {
		in, err := ParseSave(snat.IPv4, "*nat\n:EGRESS-SNAT - [0:0]\n-A EGRESS-SNAT "+rule+"\nCOMMIT\n", nil)
		if err != nil || len(in.Foreign) != 1 || len(in.Entries) != 0 {
			t.Errorf("%s: entries %v, foreign %v, %v; want it foreign", rule, in.Entries, in.Foreign, err)
		}
	}
}
