package iptables

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// TestRoutedEntriesRoundTrip: a destination sent out of another interface
// becomes routes and rules, reads back as the same entry, re-plans to
// nothing, and clear removes every trace.
func TestRoutedEntriesRoundTrip(t *testing.T) {
	m, _, _ := newFakeManager()
	other := snat.Entry{Match: snat.Match{Dst: pfx("198.51.100.4"), Out: "eth1"}, Natural: addr("203.0.113.130"), To: addrs("203.0.113.130"), Routed: true, Via: addr("203.0.113.129"), Replies: true}
	same := snat.Entry{Match: snat.Match{Dst: pfx("203.0.113.7"), Out: "eth0"}, Natural: addr("192.0.2.22"), To: addrs("192.0.2.22"), Routed: true, Via: addr("192.0.2.1")}
	snatted := entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23")
	want := []snat.Entry{other, same, snatted}
	p := update(t, m, func(*snat.State) []snat.Entry { return want })
	var tools []snat.Tool
	for _, s := range p.Steps {
		tools = append(tools, s.Do.Tool)
	}
	if diff := cmp.Diff([]snat.Tool{snat.ToolIP4Batch, ToolIPTables}, tools); diff != "" {
		t.Errorf("steps (-want +got):\n%s", diff)
	}
	st, _ := m.Read()
	got := st.Entries()
	snat.SortEntries(want)
	if len(got) != 3 || !got[0].Equal(want[0]) || !got[1].Equal(want[1]) || !got[2].Equal(want[2]) {
		t.Errorf("read back:\n%v\nwant:\n%v", got, want)
	}
	if p := m.MakePlan(st, want); !p.Empty() {
		t.Errorf("re-plan is not empty: %v", p.Steps)
	}
	rs := st.Routing[snat.IPv4]
	if len(rs.Rules) != 5 || len(rs.Routes) != 3 {
		t.Errorf("routing: %v", rs)
	}
	if c := Render(snat.IPv4, snat.Normalize(want)); len(c.Rules) != 1 {
		t.Errorf("routed entries got chain rules:\n%s", chainText(c))
	}
	// A deleted rule is drift, and the plan repairs it.
	m.Routing.(*routes.Fake).Batch(true, "rule del pref 7420 from 0.0.0.0/32 lookup 7420 protocol 83\n")
	st, _ = m.Read()
	found := false
	for _, f := range m.Diagnose(st, want) {
		found = found || f.Kind == snat.DriftRoutes
	}
	if !found {
		t.Errorf("a deleted ip rule is not reported: %v", m.Diagnose(st, want))
	}
	update(t, m, func(*snat.State) []snat.Entry { return want })
	st, _ = m.Read()
	if len(st.Routing[snat.IPv4].Rules) != 5 {
		t.Errorf("repair left %v", st.Routing[snat.IPv4].Rules)
	}
	update(t, m, func(*snat.State) []snat.Entry { return nil })
	st, _ = m.Read()
	if !st.Routing[snat.IPv4].Empty() || len(st.Entries()) != 0 {
		t.Errorf("clear left %v %v", st.Routing[snat.IPv4], st.Entries())
	}
}

// TestRouteStepsAreMakeBeforeBreak: moving a destination from a route back
// to SNAT writes the chain before the route goes.
func TestRouteStepsAreMakeBeforeBreak(t *testing.T) {
	m, _, _ := newFakeManager()
	routed := snat.Entry{Match: snat.Match{Dst: pfx("198.51.100.4"), Out: "eth1"}, Natural: addr("203.0.113.130"), To: addrs("203.0.113.130"), Routed: true, Via: addr("203.0.113.129"), Replies: true}
	update(t, m, func(*snat.State) []snat.Entry { return []snat.Entry{routed} })
	p := update(t, m, func(*snat.State) []snat.Entry {
		return []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")}
	})
	var order []string
	for _, s := range p.Steps {
		order = append(order, string(s.Do.Tool)+": "+strings.SplitN(s.Do.Input, "\n", 2)[0])
	}
	if len(p.Steps) != 2 || p.Steps[0].Do.Tool != ToolIPTables || p.Steps[1].Do.Tool != snat.ToolIP4Batch {
		t.Errorf("steps: %q", order)
	}
}

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, a := range s {
		out = append(out, addr(a))
	}
	return out
}
