package iptables

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// fakeFlows is a Flows with fixed answers, counting its reads.
type fakeFlows struct {
	live  snat.Liveness
	reads int
}

func (f *fakeFlows) Live() (snat.Liveness, error) {
	f.reads++
	return f.live, nil
}

func lingerManager() (*snat.Manager, *FakeTables, *fakeFlows) {
	m, ft, _ := newFakeManager()
	ft.Droppable = true // iptables-nft with nft
	flows := &fakeFlows{live: snat.Liveness{Translated: map[netip.Addr]int{}, Sources: map[netip.Addr]int{}}}
	m.Flows = flows
	return m, ft, flows
}

// keepOf reads the IPv4 keep chain from the fake tables.
func keepOf(t *testing.T, m *snat.Manager) []netip.Addr {
	t.Helper()
	st, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	return snapshot(st).Installed[snat.IPv4].Keep
}

// TestKeepChainOutlivesTheLastRule: clearing the last SNAT rule while a
// connection it translated lives writes the keep chain in the same
// transaction that removes the rule, keeps it while the connection lives,
// and removes it on the first run after the connection ended; a write that
// takes nothing away never reads the connections.
func TestKeepChainOutlivesTheLastRule(t *testing.T) {
	for _, droppable := range []bool{true, false} { // iptables-nft, legacy
		m, ft, flows := lingerManager()
		ft.Droppable = droppable
		update(t, m, func(*snat.State) []snat.Entry {
			return []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")}
		})
		if flows.reads != 0 {
			t.Errorf("adding a rule read the connections %d times, want 0", flows.reads)
		}
		flows.live.Translated[addr("192.0.2.22")] = 1
		p := update(t, m, func(*snat.State) []snat.Entry { return nil })
		if len(p.Steps) != 1 || !strings.Contains(p.Steps[0].Do.Input, "-X EGRESS-SNAT\n") || !strings.Contains(p.Steps[0].Do.Input, "-A "+KeepChain) {
			t.Fatalf("clear: want one transaction removing the chain and writing the keep chain, got %v", p.Steps)
		}
		if got := keepOf(t, m); !slices.Equal(got, []netip.Addr{addr("192.0.2.22")}) {
			t.Fatalf("keep chain after clear: %v, want it for 192.0.2.22", got)
		}
		if !slices.ContainsFunc(p.Lingering(), func(s string) bool { return strings.Contains(s, "192.0.2.22") }) {
			t.Errorf("Lingering() = %q, want it to name 192.0.2.22", p.Lingering())
		}
		if p := update(t, m, func(*snat.State) []snat.Entry { return nil }); !p.Empty() {
			t.Errorf("a run while the connection lives changed %v", p.Steps)
		}
		st, _ := m.Read()
		if _, err := m.Plan(st, nil); err != nil { // as check does: reads what lives
			t.Fatal(err)
		}
		if fs := m.Diagnose(st, nil); len(fs) != 0 {
			t.Errorf("the keep chain is drift: %v", fs)
		}
		delete(flows.live.Translated, addr("192.0.2.22"))
		p = update(t, m, func(*snat.State) []snat.Entry { return nil })
		if p.Empty() || len(keepOf(t, m)) != 0 {
			t.Fatalf("once the connection ended: steps %v, keep chain %v", p.Steps, keepOf(t, m))
		}
		text, _ := ft.Save(snat.IPv4)
		if strings.Contains(text, KeepChain) {
			t.Errorf("keep chain still declared:\n%s", text)
		}
	}
}

// TestClearNowTakesTheKeepChain: an empty Liveness (clear --now) removes
// the keep chain and writes none.
func TestClearNowTakesTheKeepChain(t *testing.T) {
	m, _, flows := lingerManager()
	update(t, m, func(*snat.State) []snat.Entry {
		return []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")}
	})
	flows.live.Translated[addr("192.0.2.22")] = 3
	update(t, m, func(*snat.State) []snat.Entry { return nil })
	update(t, m, func(st *snat.State) []snat.Entry {
		st.Live = &snat.Liveness{}
		return nil
	})
	if got := keepOf(t, m); len(got) != 0 {
		t.Errorf("clear --now left the keep chain for %v", got)
	}
}

// TestNoKeepChainWhereRulesRemain: a family that keeps a SNAT rule needs
// no keep chain: its own rules hold conntrack.
func TestNoKeepChainWhereRulesRemain(t *testing.T) {
	m, _, flows := lingerManager()
	two := []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22"), entry("203.0.113.7", "192.0.2.250", "192.0.2.23")}
	update(t, m, func(*snat.State) []snat.Entry { return two })
	flows.live.Translated[addr("192.0.2.22")] = 1
	update(t, m, func(*snat.State) []snat.Entry { return two[1:] })
	if got := keepOf(t, m); len(got) != 0 {
		t.Errorf("a keep chain beside a remaining rule: %v", got)
	}
}

// TestReplyRouteOutlivesItsRule: unsetting a destination sent out of
// another interface keeps that address's reply rule and table while a
// socket leaves with the address, without its destination route, and
// takes them on the first run after.
func TestReplyRouteOutlivesItsRule(t *testing.T) {
	m, _, flows := lingerManager()
	other := snat.Entry{Match: snat.Match{Dst: pfx("198.51.100.4"), Out: "eth1"}, Natural: addr("203.0.113.130"), To: addrs("203.0.113.130"), Routed: true, Via: addr("203.0.113.129"), Replies: true}
	update(t, m, func(*snat.State) []snat.Entry { return []snat.Entry{other} })
	flows.live.Sources[addr("203.0.113.130")] = 1
	p := update(t, m, func(*snat.State) []snat.Entry { return nil })
	st, _ := m.Read()
	rs := st.Routing[snat.IPv4]
	hasReply := slices.ContainsFunc(rs.Rules, func(r routes.IPRule) bool {
		return r.Priority == routes.PrioReplies && r.From.Addr() == addr("203.0.113.130")
	})
	hasDst := slices.ContainsFunc(rs.Routes, func(r routes.Route) bool { return r.Table == routes.Table })
	if !hasReply || hasDst {
		t.Errorf("after unset with a live socket: reply rule kept %v (want true), destination route kept %v (want false)\n%v", hasReply, hasDst, rs)
	}
	if len(p.Lingering()) != 1 {
		t.Errorf("Lingering() = %q, want the reply route", p.Lingering())
	}
	if _, err := m.Plan(st, nil); err != nil { // as check does: reads what lives
		t.Fatal(err)
	}
	if fs := m.Diagnose(st, nil); len(fs) != 0 {
		t.Errorf("the lingering reply route is drift: %v", fs)
	}
	delete(flows.live.Sources, addr("203.0.113.130"))
	update(t, m, func(*snat.State) []snat.Entry { return nil })
	st, _ = m.Read()
	if !st.Routing[snat.IPv4].Empty() {
		t.Errorf("once the socket closed, routing left: %v", st.Routing[snat.IPv4])
	}
}
