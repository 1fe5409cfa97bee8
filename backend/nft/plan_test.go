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

var tableOpts = cmp.Options{cmpOpts, cmpopts.IgnoreFields(Table{}, "Foreign"), cmpopts.IgnoreFields(Rule{}, "Packets", "Bytes"),
	cmpopts.IgnoreFields(Set{}, "Count"), cmpopts.EquateEmpty()}

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

// TestPlanRehooksChain: our chain found at another priority (moved by
// hand) is deleted and created again in the same transaction.
func TestPlanRehooksChain(t *testing.T) {
	want := mustRender(t, hosts(10, "192.0.2.22"))
	have := cloneTable(want)
	have.Chains[0].Hook.Priority = 100
	k := fakeKernel{t: cloneTable(have)}
	p := Plan(have, want)
	if err := k.run(p); err != nil {
		t.Fatalf("%v\n%s", err, p.Show())
	}
	if diff := cmp.Diff(want, canonical(k.t), tableOpts); diff != "" {
		t.Errorf("after the plan (-want +got):\n%s\n%s", diff, p.Show())
	}
}

// TestElemsDiff: the diff, with its equal blocks skipped, is the naive one.
func TestElemsDiff(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for range 50 {
		var a, b []netip.Addr
		for i := range 5000 {
			x := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
			if rng.IntN(100) > 0 {
				a = append(a, x)
			}
			if rng.IntN(100) > 0 {
				b = append(b, x)
			}
		}
		plus, minus := ElemsOf(snat.IPv4, a...).diff(ElemsOf(snat.IPv4, b...))
		var wantPlus, wantMinus []netip.Addr
		for _, x := range b {
			if !slices.Contains(a, x) {
				wantPlus = append(wantPlus, x)
			}
		}
		for _, x := range a {
			if !slices.Contains(b, x) {
				wantMinus = append(wantMinus, x)
			}
		}
		if !slices.Equal(plus.Addrs(), wantPlus) || !slices.Equal(minus.Addrs(), wantMinus) {
			t.Fatalf("diff: +%v -%v, want +%v -%v", plus.Addrs(), minus.Addrs(), wantPlus, wantMinus)
		}
	}
}

// TestPatch: a change of a few entries inside big groups, patched, is the
// table rendered from the changed entries, and its program, run by the
// fake kernel on the old table, makes it; a change that would reshape the
// table is refused.
func TestPatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	patched := 0
	for round := range 200 {
		var es []snat.Entry
		for i := range 300 {
			to := []string{"192.0.2.22", "192.0.2.23"}[rng.IntN(2)]
			bits := []int{32, 32, 24}[rng.IntN(3)]
			p, _ := netip.AddrFrom4([4]byte{198, 18, byte(i), byte(rng.IntN(256))}).Prefix(bits)
			es = append(es, entry(p.String(), "192.0.2.250", to))
		}
		es = dedupe(es)
		have := mustRender(t, es)
		// Move, remove and add a few.
		next := slices.Clone(es)
		var removed, added []snat.Entry
		used := map[int]bool{}
		for range 1 + rng.IntN(4) {
			i := rng.IntN(len(next))
			if used[i] {
				continue // one change an entry: removed and added are sets
			}
			used[i] = true
			removed = append(removed, next[i])
			switch rng.IntN(3) {
			case 0: // moved to the other address
				e := next[i]
				e.To = addrs(map[string]string{"192.0.2.22": "192.0.2.23", "192.0.2.23": "192.0.2.22"}[e.To[0].String()])
				next[i] = e
				added = append(added, e)
			case 1: // removed (in place, so that indices stay)
				next[i] = snat.Entry{}
			case 2: // another destination
				e := entry(fmt.Sprintf("198.19.%d.%d", rng.IntN(256), rng.IntN(256)), "192.0.2.250", "192.0.2.22")
				next = append(next, e)
				added = append(added, e)
				removed = removed[:len(removed)-1]
			}
		}
		if rng.IntN(10) == 0 {
			added = append(added, entry("0.0.0.0/0", "192.0.2.250", "192.0.2.24")) // reshapes
			next = append(next, added[len(added)-1])
		}
		next = dedupe(slices.DeleteFunc(next, func(e snat.Entry) bool { return !e.Dst.IsValid() }))
		p, got, ok := Patch(have, removed, added)
		if !ok {
			continue
		}
		patched++
		want := mustRender(t, next)
		if diff := cmp.Diff(want, got, tableOpts); diff != "" {
			t.Fatalf("round %d: patched (-rendered +patched):\n%s", round, diff)
		}
		k := fakeKernel{t: cloneTable(have)}
		if err := k.run(p); err != nil {
			t.Fatalf("round %d: %v\n%s", round, err, p.Show())
		}
		if diff := cmp.Diff(want, canonical(k.t), tableOpts); diff != "" {
			t.Fatalf("round %d: after the program (-want +got):\n%s", round, diff)
		}
		for _, s := range p.Steps {
			if _, ok := s.(AddElements); !ok {
				if _, ok := s.(DeleteElements); !ok {
					t.Fatalf("round %d: step %s", round, s.Show())
				}
			}
		}
	}
	if patched < 100 {
		t.Errorf("only %d of 200 changes patched", patched)
	}
	// A set that would fall under the threshold is refused.
	es := hosts(8, "192.0.2.22")
	if _, _, ok := Patch(mustRender(t, es), es[:1], nil); ok {
		t.Errorf("patched a set of 8 down to 7")
	}
}

// dedupe keeps one entry per match, the last.
func dedupe(es []snat.Entry) []snat.Entry {
	seen := map[snat.Match]int{}
	var out []snat.Entry
	for _, e := range es {
		e.Dst = e.Dst.Masked()
		if i, ok := seen[e.Match]; ok {
			out[i] = e
			continue
		}
		seen[e.Match] = len(out)
		out = append(out, e)
	}
	return out
}
