package nft

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/egress-snat/egress-snat/snat"
)

func mustRender(t *testing.T, es []snat.Entry) *Table {
	t.Helper()
	tbl, err := Render(slices.Clone(es))
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

// canonical orders a table's chains as Render does, for comparisons.
func canonical(t *Table) *Table {
	if t == nil {
		return nil
	}
	c := cloneTable(t)
	slices.SortStableFunc(c.Chains, func(a, b Chain) int {
		return slices.Index(chainOrder, a.Name) - slices.Index(chainOrder, b.Name)
	})
	return c
}

var tableOpts = cmp.Options{cmpOpts, cmpopts.IgnoreFields(Table{}, "Foreign"), cmpopts.IgnoreFields(Rule{}, "Packets", "Bytes"), cmpopts.EquateEmpty()}

func showSteps(p Program) string {
	var kinds []string
	for _, s := range p.Steps {
		kinds = append(kinds, fmt.Sprintf("%T", s))
	}
	return strings.Join(kinds, " ")
}

func hosts(n int, to string) []snat.Entry {
	var es []snat.Entry
	for i := range n {
		es = append(es, entry(netip.AddrFrom4([4]byte{198, 51, byte(i / 250), byte(1 + i%250)}).String(), "192.0.2.250", to))
	}
	return es
}

func TestPlanFreshTable(t *testing.T) {
	want := mustRender(t, append(hosts(20, "192.0.2.22"), entry("203.0.113.7", "192.0.2.250", "192.0.2.23", "192.0.2.24")))
	p := Plan(nil, want)
	if got := showSteps(p); got != "nft.AddTable nft.AddChain nft.AddSet nft.AddElements nft.AddRule nft.AddRule nft.AddRule" {
		t.Errorf("steps: %s\n%s", got, p.Show())
	}
	var k fakeKernel
	if err := k.run(p); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, canonical(k.t), tableOpts); diff != "" {
		t.Errorf("after the plan (-want +got):\n%s", diff)
	}
	if p := Plan(want, want); !p.Empty() {
		t.Errorf("a plan from a table to itself:\n%s", p.Show())
	}
	if got := Plan(want, nil).Show(); got != "delete table inet egress-snat\n" {
		t.Errorf("a plan to no table: %q", got)
	}
}

// TestPlanOneDestination: a destination moved between two addresses is one
// element deleted from one set and one added to the other; no chain is
// written.
func TestPlanOneDestination(t *testing.T) {
	es := append(hosts(500, "192.0.2.22"), hosts(500, "192.0.2.23")[250:]...)
	have := mustRender(t, es)
	moved := slices.Clone(es)
	moved[3].To = addrs("192.0.2.23")
	want := mustRender(t, moved)
	p := Plan(have, want)
	if got := showSteps(p); got != "nft.DeleteElements nft.AddElements" {
		t.Fatalf("steps: %s\n%s", got, p.Show())
	}
	for _, s := range p.Steps {
		switch s := s.(type) {
		case DeleteElements:
			if s.Elems.Len() != 1 || s.Elems.At(0) != addr("198.51.0.4") {
				t.Errorf("deleted %v", s.Elems.Addrs())
			}
		case AddElements:
			if s.Elems.Len() != 1 || s.Elems.At(0) != addr("198.51.0.4") {
				t.Errorf("added %v", s.Elems.Addrs())
			}
		}
	}
	k := fakeKernel{t: cloneTable(have)}
	if err := k.run(p); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, canonical(k.t), tableOpts); diff != "" {
		t.Errorf("after the plan (-want +got):\n%s", diff)
	}
}

// TestPlanReaches: from any table to any other, the plan, run by the fake
// kernel with the kernel's preconditions, gives exactly the wanted table.
func TestPlanReaches(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tables := []*Table{nil}
	for range 12 {
		es := randomEntries(rng, rng.IntN(300))
		for i := range es {
			if !es[i].Sender.IsHost() && !es[i].Keep() && es[i].Out == "eth1" && rng.IntN(2) == 0 {
				es[i].Marked, es[i].Replies = true, true
				es[i].To = addrs("203.0.113.130")
			}
		}
		tables = append(tables, mustRender(t, snat.Normalize(es)))
	}
	for i, have := range tables {
		for j, want := range tables {
			k := fakeKernel{t: cloneTable(have)}
			p := Plan(have, want)
			if err := k.run(p); err != nil {
				t.Fatalf("%d -> %d: %v\n%s", i, j, err, p.Show())
			}
			if diff := cmp.Diff(want, canonical(k.t), tableOpts); diff != "" {
				t.Fatalf("%d -> %d: after the plan (-want +got):\n%s", i, j, diff)
			}
			if i == j && !p.Empty() {
				t.Errorf("%d -> itself: %s", i, showSteps(p))
			}
		}
	}
}

// TestPlanRemovesForeign: what someone else put in our table goes, and a
// rule changed by hand is written back.
func TestPlanRemovesForeign(t *testing.T) {
	want := mustRender(t, hosts(10, "192.0.2.22"))
	have := cloneTable(want)
	have.Chains[0].Rules[0].Action = Action{Kind: "foreign rule 7"}
	have.Chains = append(have.Chains, Chain{Name: "mine", Hook: Hook{Type: "filter (foreign)", Hook: "input"}})
	have.Sets = append(have.Sets, Set{Name: "zz-mine", Bits: -1})
	k := fakeKernel{t: cloneTable(have)}
	p := Plan(have, want)
	if err := k.run(p); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, canonical(k.t), tableOpts); diff != "" {
		t.Errorf("after the plan (-want +got):\n%s\n%s", diff, p.Show())
	}
}
