package iptables

import (
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/snat"
)

// TestHold: a held entry is its SNAT rule plus a hold rule of the same
// match (its set too); it reads back held; holding more runs before the
// nat chain is written and holding less after; activation leaves the SNAT
// rule as it was; clear leaves the fake's tables as they were.
func TestHold(t *testing.T) {
	m, ft, _ := newFakeManager()
	ft.Droppable = true
	from := snat.From(pfx("10.50.0.0/24"))
	held := func(hold bool) []snat.Entry {
		es := []snat.Entry{senderEntry(from, "0.0.0.0/0", "192.0.2.250", "192.0.2.100")}
		for i := range snat.SetThreshold {
			es = append(es, senderEntry(from, fmt.Sprintf("198.51.100.%d", i), "192.0.2.250", "192.0.2.101"))
		}
		for i := range es {
			es[i].Hold, es[i].Standby = hold, true
		}
		return es
	}
	st, _ := m.Read()
	p := m.MakePlan(st, held(true))
	if err := m.Apply(p); err != nil {
		t.Fatal(err)
	}
	text, _ := ft.Save(snat.IPv4)
	if !strings.Contains(text, "-A FORWARD -m comment --comment egress-snat -j "+HoldChain) {
		t.Errorf("no jump to the hold chain:\n%s", text)
	}
	hold := snapshotOf(t, m).Hold[snat.IPv4]
	if len(hold.Rules) != 2 || hold.Rules[0].Set == "" && hold.Rules[1].Set == "" {
		t.Errorf("hold rules %v, want two, one of them on the set", hold.Rules)
	}
	st, _ = m.Read()
	for _, e := range st.Entries() {
		if !e.Hold {
			t.Errorf("read back %v, not held", e)
		}
	}
	if p := m.MakePlan(st, held(true)); !p.Empty() {
		t.Errorf("held again: plan %v, want none", p.Steps)
	}
	natBefore := natRules(t, ft)

	// Activation: only the hold goes (and the filter table it alone used).
	p = m.MakePlan(st, held(false))
	if len(p.Steps) != 2 || !strings.Contains(p.Steps[0].Why, "remove the hold") || p.Steps[1].Do.Tool != ToolDropTable {
		t.Fatalf("activation steps %v, want the hold removed alone", p.Steps)
	}
	if err := m.Apply(p); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(natBefore, natRules(t, ft)); diff != "" {
		t.Errorf("activation changed the nat chain (-before +after):\n%s", diff)
	}
	if text, _ := ft.Save(snat.IPv4); strings.Contains(text, HoldChain) || strings.Contains(text, "*filter") {
		t.Errorf("after activation the filter table is still there:\n%s", text)
	}

	// Standing by again: the hold comes before anything else.
	st, _ = m.Read()
	p = m.MakePlan(st, append(held(true), senderEntry(snat.From(pfx("10.60.0.0/24")), "0.0.0.0/0", "192.0.2.250", "192.0.2.23")))
	if len(p.Steps) < 2 || !strings.Contains(p.Steps[0].Why, "hold 2 rules") {
		t.Fatalf("steps %v, want the hold first", p.Steps)
	}
	if err := m.Apply(p); err != nil {
		t.Fatal(err)
	}
	// Someone flushes the hold chain: drift, by name.
	if err := ft.Restore(snat.IPv4, "*filter\n-F "+HoldChain+"\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	st, _ = m.Read()
	var kinds []string
	for _, f := range m.Diagnose(st, held(true)) {
		kinds = append(kinds, f.Kind)
	}
	if !strings.Contains(strings.Join(kinds, " "), snat.DriftHold) {
		t.Errorf("a flushed hold chain: findings %v, want %s", kinds, snat.DriftHold)
	}
	// clear leaves nothing.
	if err := m.Apply(m.MakePlan(st, nil)); err != nil {
		t.Fatal(err)
	}
	if text, _ := ft.Save(snat.IPv4); text != "" {
		t.Errorf("after clear the fake still has:\n%s", text)
	}
}

func snapshotOf(t *testing.T, m *snat.Manager) *Snapshot {
	t.Helper()
	st, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	return snapshot(st)
}

func natRules(t *testing.T, ft *FakeTables) []string {
	t.Helper()
	text, _ := ft.Save(snat.IPv4)
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "-A "+ChainName+" ") {
			out = append(out, l)
		}
	}
	return out
}
