package iptables

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/snat"
)

// TestSpillRules: a spill entry (snat/spill.go) is one rule with
// -p PROTO -m PROTO --dport PORT, first in its sender's block, ahead of the
// set of the rule it spills from, neither a set member nor an exception of
// that set; it reads back as itself, so a re-plan is empty; -m tcp without
// --dport, or --dport without -p, is not ours.
func TestSpillRules(t *testing.T) {
	m, _, _ := newFakeManager()
	var want []snat.Entry
	for i := range 9 { // enough for a set
		e := entry(fmt.Sprintf("198.51.100.%d/32", i+1), "192.0.2.250", "192.0.2.22")
		e.Ports = snat.Ports{Lo: 40000, Hi: 40009}
		want = append(want, e)
	}
	for i := range 9 {
		want = append(want, snat.SpillEntry(want[0], netip.MustParseAddr(fmt.Sprintf("198.51.100.%d", i+1)), "tcp", 443, []netip.Addr{netip.MustParseAddr("192.0.2.23")}))
	}
	want = append(want, snat.SpillEntry(want[0], netip.MustParseAddr("198.51.100.1"), "udp", 53, []netip.Addr{netip.MustParseAddr("192.0.2.23")}))
	snat.SortEntries(want)
	c := Render(snat.IPv4, want)
	for i, r := range c.Rules[:10] {
		if r.DPort == 0 || r.Set != "" || !strings.Contains(r.String(), "-m "+r.Proto+" --dport ") {
			t.Errorf("rule %d: %s; want a spill rule", i, r)
		}
	}
	if len(c.Sets) != 1 || len(c.Sets[0].NoMatch) != 0 {
		t.Errorf("sets %+v; want the rule's one, without exceptions", c.Sets)
	}
	for _, r := range c.Rules {
		back, err := ParseRule(snat.IPv4, r.Args())
		if err != nil || back != r {
			t.Errorf("ParseRule(%s) = %+v, %v; want the rule back", r, back, err)
		}
	}
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
		"-s 192.0.2.250/32 -o eth0 -p tcp -m tcp -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22",
		"-s 192.0.2.250/32 -o eth0 --dport 443 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22",
		"-s 192.0.2.250/32 -o eth0 -p tcp -m tcp --dport 0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22",
	} {
		in, err := ParseSave(snat.IPv4, "*nat\n:EGRESS-SNAT - [0:0]\n-A EGRESS-SNAT "+rule+"\nCOMMIT\n", nil)
		if err != nil || len(in.Foreign) != 1 || len(in.Entries) != 0 {
			t.Errorf("%s: entries %v, foreign %v, %v; want it foreign", rule, in.Entries, in.Foreign, err)
		}
	}
}
