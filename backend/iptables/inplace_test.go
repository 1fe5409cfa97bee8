package iptables

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/snat"
	"github.com/google/go-cmp/cmp"
)

// hosts gives n entries to 198.18.x.y from the natural source to to,
// starting at the i-th address.
func hosts(from, n int, to string) []snat.Entry {
	var es []snat.Entry
	for i := from; i < from+n; i++ {
		es = append(es, entry(fmt.Sprintf("198.18.%d.%d", i/256, i%256), "192.0.2.250", to))
	}
	return es
}

func setsOf(t *testing.T, fs *FakeIPSets) map[string]Set {
	t.Helper()
	text, _ := fs.Save()
	sets, err := ParseSets(text)
	if err != nil {
		t.Fatal(err)
	}
	return sets
}

// TestSmallSetChangeIsInPlace: one destination changed among 100 is one
// ipset step of one add and one delete in the installed set, which keeps
// its name; the chain is not written, and a second plan is empty.
func TestSmallSetChangeIsInPlace(t *testing.T) {
	m, ft, fs := newFakeManager()
	update(t, m, func(*snat.State) []snat.Entry { return hosts(0, 100, "192.0.2.22") })
	before := setsOf(t, fs)
	if len(before) != 1 {
		t.Fatalf("want one set, have %v", before)
	}
	var name string
	for name = range before {
	}
	chainBefore, _ := ft.Save(snat.IPv4)

	changed := append(hosts(1, 99, "192.0.2.22"), entry("198.18.9.9", "192.0.2.250", "192.0.2.22"))
	p := update(t, m, func(*snat.State) []snat.Entry { return changed })
	if len(p.Steps) != 1 || p.Steps[0].Do.Tool != ToolIPSet || !strings.HasPrefix(p.Steps[0].Why, "change set") {
		t.Fatalf("want one in-place ipset step, plan:\n%v", p.Steps)
	}
	if want := "add " + name + " 198.18.9.9/32\ndel " + name + " 198.18.0.0/32\n"; p.Steps[0].Do.Input != want {
		t.Errorf("in-place payload:\n%s\nwant:\n%s", p.Steps[0].Do.Input, want)
	}
	if after, _ := ft.Save(snat.IPv4); after != chainBefore {
		t.Errorf("the chain was written:\n%s", cmp.Diff(chainBefore, after))
	}
	after := setsOf(t, fs)
	if _, ok := after[name]; !ok || len(after) != 1 {
		t.Fatalf("the set did not keep its name %s: %v", name, after)
	}
	st, _ := m.Read()
	if d := cmp.Diff(snat.Normalize(changed), st.Entries()); d != "" {
		t.Errorf("the kernel holds (-want +got):\n%s", d)
	}
	if again := m.MakePlan(st, changed); !again.Empty() {
		t.Errorf("a second plan is not empty:\n%v", again.Steps)
	}
}

// TestLargeSetChangeIsRebuilt: past inPlaceMax the set is built anew under
// a temporary name and swapped in, atomic for the whole set; it keeps its
// name and the chain is not written.
func TestLargeSetChangeIsRebuilt(t *testing.T) {
	m, ft, fs := newFakeManager()
	update(t, m, func(*snat.State) []snat.Entry { return hosts(0, 100, "192.0.2.22") })
	before := setsOf(t, fs)
	chainBefore, _ := ft.Save(snat.IPv4)
	p := update(t, m, func(*snat.State) []snat.Entry { return hosts(60, 100, "192.0.2.22") })
	if len(p.Steps) != 1 || !strings.Contains(p.Steps[0].Do.Input, "\nswap ") || strings.HasPrefix(p.Steps[0].Why, "change set") {
		t.Fatalf("want one rebuild-and-swap step, plan:\n%v", p.Steps)
	}
	after := setsOf(t, fs)
	for n := range before {
		if _, ok := after[n]; !ok || len(after) != 1 {
			t.Errorf("the set %s did not keep its name: %v", n, after)
		}
	}
	if now, _ := ft.Save(snat.IPv4); now != chainBefore {
		t.Errorf("the chain was written:\n%s", cmp.Diff(chainBefore, now))
	}
	st, _ := m.Read()
	if again := m.MakePlan(st, hosts(60, 100, "192.0.2.22")); !again.Empty() {
		t.Errorf("a second plan is not empty:\n%v", again.Steps)
	}
}

// TestMoveBetweenSetsIsAtomic: a destination that moves to another set's
// source, inside a broader destination of its old set, turns from a member
// of one set into a member of the other and a nomatch exception of the
// first. Two sets change, so neither changes in place: changed one after
// the other, the destination would be in neither for a moment. Both are
// created afresh and switched to in the chain's one transaction.
func TestMoveBetweenSetsIsAtomic(t *testing.T) {
	m, _, fs := newFakeManager()
	var wide []snat.Entry
	for i := range 20 {
		wide = append(wide, entry(fmt.Sprintf("198.18.%d.0/24", i), "192.0.2.250", "192.0.2.22"))
	}
	other := hosts(10000, 10, "192.0.2.23")
	first := slices.Concat(wide, other, []snat.Entry{entry("198.18.1.7", "192.0.2.250", "192.0.2.22")})
	update(t, m, func(*snat.State) []snat.Entry { return first })
	second := slices.Concat(wide, other, []snat.Entry{entry("198.18.1.7", "192.0.2.250", "192.0.2.23")})
	p := update(t, m, func(*snat.State) []snat.Entry { return second })
	for _, s := range p.Steps {
		if strings.HasPrefix(s.Why, "change set") || strings.Contains(s.Do.Input, "\nswap ") {
			t.Errorf("a set changed ahead of the chain: %s", s.Why)
		}
	}
	st, _ := m.Read()
	if d := cmp.Diff(snat.Normalize(second), st.Entries()); d != "" {
		t.Errorf("the kernel holds (-want +got):\n%s", d)
	}
	nomatch := 0
	for _, s := range setsOf(t, fs) {
		nomatch += len(s.NoMatch)
	}
	if nomatch != 1 {
		t.Errorf("%d nomatch exceptions, want 1 (198.18.1.7 in the /24s' set)", nomatch)
	}
}

// TestMemberChangesFlip: the in-place payload of a member that turns into
// a nomatch exception deletes it and adds it back flagged, and its undo
// does the reverse.
func TestMemberChangesFlip(t *testing.T) {
	old := Set{Name: "s", Members: []netip.Prefix{pfx("198.18.1.0/24"), pfx("198.18.1.7/32")}}
	new := Set{Name: "s", Members: []netip.Prefix{pfx("198.18.1.0/24"), pfx("198.18.2.0/24")}, NoMatch: []netip.Prefix{pfx("198.18.1.7/32")}}
	u := memberChanges(old, new)
	if want := "add s 198.18.2.0/24\ndel s 198.18.1.7/32\nadd s 198.18.1.7/32 nomatch\n"; u.Do != want {
		t.Errorf("do:\n%s\nwant:\n%s", u.Do, want)
	}
	if want := "del s 198.18.1.7/32\nadd s 198.18.1.7/32\ndel s 198.18.2.0/24\n"; u.Undo != want {
		t.Errorf("undo:\n%s\nwant:\n%s", u.Undo, want)
	}
	if u.Added != 1 || u.Deleted != 0 || u.Flipped != 1 {
		t.Errorf("counts %d added, %d deleted, %d flipped; want 1, 0, 1", u.Added, u.Deleted, u.Flipped)
	}
}

// TestChainChangeTakesFreshSets: when the chain must be written anyway, a
// changed set is created afresh and switched to in the chain's one
// transaction, not changed in place ahead of it.
func TestChainChangeTakesFreshSets(t *testing.T) {
	m, _, fs := newFakeManager()
	update(t, m, func(*snat.State) []snat.Entry { return hosts(0, 100, "192.0.2.22") })
	before := setsOf(t, fs)
	next := append(hosts(1, 100, "192.0.2.22"), entry("203.0.113.9", "192.0.2.250", "192.0.2.23"))
	p := update(t, m, func(*snat.State) []snat.Entry { return next })
	for _, s := range p.Steps {
		if strings.HasPrefix(s.Why, "change set") || strings.Contains(s.Do.Input, "\nswap ") {
			t.Errorf("a set changed ahead of the chain: %s", s.Why)
		}
	}
	after := setsOf(t, fs)
	for n := range before {
		if _, ok := after[n]; ok {
			t.Errorf("the old set %s is still there", n)
		}
	}
	st, _ := m.Read()
	if again := m.MakePlan(st, next); !again.Empty() {
		t.Errorf("a second plan is not empty:\n%v", again.Steps)
	}
}

// TestFailedInPlaceIsUndone: an in-place change whose plan fails later (a
// failing IPv6 write) is put back: the set holds its old members.
func TestFailedInPlaceIsUndone(t *testing.T) {
	m, ft, fs := newFakeManager()
	six := entry("2001:db8:ffff::4", "2001:db8::250", "2001:db8::22")
	update(t, m, func(*snat.State) []snat.Entry { return append(hosts(0, 100, "192.0.2.22"), six) })
	before := setsOf(t, fs)
	ft.FailRestore[snat.IPv6] = fmt.Errorf("injected failure")
	st, _ := m.Read()
	p := m.MakePlan(st, append(hosts(1, 100, "192.0.2.22"), entry("2001:db8:ffff::4", "2001:db8::250", "2001:db8::23")))
	if !strings.HasPrefix(p.Steps[0].Why, "change set") {
		t.Fatalf("want the in-place step first, plan:\n%v", p.Steps)
	}
	if err := m.Apply(p); err == nil || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("apply with a failing snat.IPv6 write: %v", err)
	}
	after := setsOf(t, fs)
	for name, s := range before {
		if a, ok := after[name]; !ok || !sameMembers(s, a) || len(after) != len(before) {
			t.Errorf("the failed in-place change was not undone: set %s was %v, is %v (sets now %d)", name, s.Members, a.Members, len(after))
		}
	}
}

// TestSetNameTakenByAChangedSet: a set changed in place keeps the digest
// name of its old content; another rule wanting exactly that old content
// gets a set of its own under a suffixed name, and the first set is not
// touched.
func TestSetNameTakenByAChangedSet(t *testing.T) {
	m, _, fs := newFakeManager()
	update(t, m, func(*snat.State) []snat.Entry { return hosts(0, 100, "192.0.2.22") })
	var name string
	for name = range setsOf(t, fs) {
	}
	changed := hosts(1, 100, "192.0.2.22")
	update(t, m, func(*snat.State) []snat.Entry { return changed })
	var uid []snat.Entry
	for _, e := range hosts(0, 100, "192.0.2.23") {
		uid = append(uid, senderEntry(snat.UID(4242), e.Dst.String(), "192.0.2.250", "192.0.2.23"))
	}
	both := append(slices.Clone(changed), uid...)
	update(t, m, func(*snat.State) []snat.Entry { return both })
	sets := setsOf(t, fs)
	if len(sets) != 2 {
		t.Fatalf("want two sets, have %v", slices.Collect(maps.Keys(sets)))
	}
	if s := sets[name]; len(s.Members) != 100 || s.Members[0] != pfx("198.18.0.1/32") {
		t.Errorf("set %s, changed in place, was touched: %v...", name, s.Members[:1])
	}
	if s, ok := sets[name+"-1"]; !ok || s.Members[0] != pfx("198.18.0.0/32") {
		t.Errorf("the uid rule's set is not %s-1 with the old content: %v", name, slices.Collect(maps.Keys(sets)))
	}
	st, _ := m.Read()
	if d := cmp.Diff(snat.Normalize(both), st.Entries()); d != "" {
		t.Errorf("the kernel holds (-want +got):\n%s", d)
	}
	if again := m.MakePlan(st, both); !again.Empty() {
		t.Errorf("a second plan is not empty:\n%v", again.Steps)
	}
}

// TestSetOfAnOlderNameIsKept: a set whose name is not the digest of what it
// holds (an earlier version's name, or one changed in place since) is kept
// by the rule that uses it: re-applying the same content writes nothing.
func TestSetOfAnOlderNameIsKept(t *testing.T) {
	m, ft, fs := newFakeManager()
	desired := hosts(0, 50, "192.0.2.22")
	update(t, m, func(*snat.State) []snat.Entry { return desired })
	var name string
	for name = range setsOf(t, fs) {
	}
	// Rename it by hand, rules and all, as an older version would have
	// named it.
	old := SetPrefix + "4-0123456789ab"
	text, _ := fs.Save()
	fs.sets = map[string]Set{}
	if err := fs.Restore(strings.ReplaceAll(text, name, old)); err != nil {
		t.Fatal(err)
	}
	v4, _ := ft.Save(snat.IPv4)
	ft.tables[snat.IPv4] = nil
	if err := ft.Restore(snat.IPv4, strings.ReplaceAll(strings.TrimPrefix(v4, "# Generated by fake\n"), name, old)); err != nil {
		t.Fatal(err)
	}
	if now, _ := ft.Save(snat.IPv4); !strings.Contains(now, "--match-set "+old+" ") || len(setsOf(t, fs)[old].Members) != 50 {
		t.Fatalf("the older name did not take:\n%s", now)
	}
	st, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	if p := m.MakePlan(st, desired); !p.Empty() {
		t.Errorf("the same content under an older name is rewritten:\n%v", p.Steps)
	}
}
