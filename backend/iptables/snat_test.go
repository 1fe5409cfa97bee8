package iptables

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
	"github.com/google/go-cmp/cmp"
)

func pfx(s string) netip.Prefix {
	p, err := parsePrefix(s)
	if err != nil {
		panic(err)
	}
	return p
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func entry(dst, natural string, to ...string) snat.Entry {
	e := snat.Entry{Match: snat.Match{Dst: pfx(dst), Out: "eth0"}, Natural: addr(natural)}
	for _, t := range to {
		e.To = append(e.To, addr(t))
	}
	return e
}

func TestRestorePayloadGolden(t *testing.T) {
	entries := snat.Normalize([]snat.Entry{
		entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23"),
		entry("198.51.100.4", "192.0.2.250", "192.0.2.22"),
		entry("198.51.100.5", "192.0.2.250", "192.0.2.250"), // natural under a broader rule: keep
		entry("203.0.113.0/24", "192.0.2.250", "192.0.2.22", "192.0.2.23"),
	})
	jump := [][]string{{"-m", "comment", "--comment", "egress-snat", "-j", "EGRESS-SNAT"}}
	got := RestorePayload(Render(snat.IPv4, entries).Args(), jump)
	want := `*nat
:EGRESS-SNAT - [0:0]
-D POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT
-I POSTROUTING 1 -m comment --comment egress-snat -j EGRESS-SNAT
-A EGRESS-SNAT -s 192.0.2.250/32 -d 198.51.100.4/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22
-A EGRESS-SNAT -s 192.0.2.250/32 -d 198.51.100.5/32 -o eth0 -m comment --comment egress-snat -j RETURN
-A EGRESS-SNAT -s 192.0.2.250/32 -d 203.0.113.0/24 -o eth0 -m comment --comment egress-snat -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source 192.0.2.22
-A EGRESS-SNAT -s 192.0.2.250/32 -d 203.0.113.0/24 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23
-A EGRESS-SNAT -s 192.0.2.250/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23
COMMIT
`
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("restore payload (-want +got):\n%s", diff)
	}
}

func TestNormalize(t *testing.T) {
	tests := []struct {
		name string
		in   []snat.Entry
		want []snat.Entry
	}{
		{"natural alone needs no rule",
			[]snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.250")}, []snat.Entry{}},
		{"natural under a broader rule is kept",
			[]snat.Entry{entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23"), entry("198.51.100.4", "192.0.2.250", "192.0.2.250")},
			[]snat.Entry{entry("198.51.100.4", "192.0.2.250"), entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23")}},
		{"keep without a broader rule is dropped",
			[]snat.Entry{entry("198.51.100.4", "192.0.2.250")}, []snat.Entry{}},
		{"a broader rule for another natural source does not cover",
			[]snat.Entry{entry("0.0.0.0/0", "198.18.0.10", "198.18.0.11"), entry("198.51.100.4", "192.0.2.250", "192.0.2.250")}, []snat.Entry{entry("0.0.0.0/0", "198.18.0.10", "198.18.0.11")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := snat.Normalize(tc.in)
			if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
				t.Errorf("snat.Normalize (-want +got):\n%s", diff)
			}
		})
	}
}

func newFakeManager() (*snat.Manager, *FakeTables, *FakeIPSets) {
	ft, fs := NewFakeKernel()
	return &snat.Manager{Backend: &Backend{Tables: ft, Sets: fs}, Locker: &countingLock{}, Routing: routes.NewFake()}, ft, fs
}

// countingLock stands in for the host's lock, so unit tests never take it.
type countingLock struct{ held, taken int }

func (l *countingLock) Lock(time.Duration) (func(), error) {
	if l.held > 0 {
		return nil, snat.ErrBusy
	}
	l.held++
	l.taken++
	return func() { l.held-- }, nil
}

// update runs one write through Update, the path every command uses.
func update(t *testing.T, m *snat.Manager, desired func(*snat.State) []snat.Entry) snat.Plan {
	t.Helper()
	_, p, err := m.Update(snat.Request{LockTimeout: time.Second, Desired: func(st *snat.State) ([]snat.Entry, error) { return desired(st), nil }})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestSetIsIdempotentAndKeepsForeignRules(t *testing.T) {
	m, ft, _ := newFakeManager()
	foreign := "*nat\n-A POSTROUTING -s 10.66.0.0/16 -j MASQUERADE\nCOMMIT\n*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
	if err := ft.Restore(snat.IPv4, foreign); err != nil {
		t.Fatal(err)
	}
	before, _ := ft.Save(snat.IPv4)

	want := []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.23")}
	p := update(t, m, func(*snat.State) []snat.Entry { return want })
	if p.Empty() || ft.Restores[snat.IPv4] != 2 {
		t.Fatalf("first set wrote nothing (plan %+v)", p.Changes)
	}
	if ft.Restores[snat.IPv6] != 0 {
		t.Errorf("an snat.IPv4-only change wrote the snat.IPv6 table")
	}
	st, _ := m.Read()
	if diff := cmp.Diff(want, st.Entries(), cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("read back (-want +got):\n%s", diff)
	}
	if in := snapshot(st).Installed[snat.IPv4]; !in.JumpFirst || len(in.Jumps) != 1 {
		t.Errorf("jump first=%v count=%d, want first and one", in.JumpFirst, len(in.Jumps))
	}

	// Same desired state again: nothing is written.
	if p := update(t, m, func(*snat.State) []snat.Entry { return want }); !p.Empty() {
		t.Errorf("second identical set planned %v", p.Changes)
	}
	if ft.Restores[snat.IPv4] != 2 {
		t.Errorf("second identical set ran iptables-restore")
	}

	// Another tool inserts ahead of our jump: the next write puts it first.
	if err := ft.Restore(snat.IPv4, "*nat\n-I POSTROUTING 1 -o eth0 -j MASQUERADE\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	st, _ = m.Read()
	if snapshot(st).Installed[snat.IPv4].JumpFirst {
		t.Fatal("jump still first after a foreign insert")
	}
	update(t, m, func(*snat.State) []snat.Entry { return want })
	st, _ = m.Read()
	if in := snapshot(st).Installed[snat.IPv4]; !in.JumpFirst || len(in.Jumps) != 1 {
		t.Errorf("after repair jump first=%v count=%d", in.JumpFirst, len(in.Jumps))
	}

	// Clear: only the foreign insert we made above differs from before.
	if err := ft.Restore(snat.IPv4, "*nat\n-D POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	update(t, m, func(*snat.State) []snat.Entry { return nil })
	after, _ := ft.Save(snat.IPv4)
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("clear did not restore the ruleset (-before +after):\n%s", diff)
	}
	if p := update(t, m, func(*snat.State) []snat.Entry { return nil }); !p.Empty() {
		t.Errorf("clearing a clean host planned %v", p.Changes)
	}
}

func TestFailedWriteChangesNothing(t *testing.T) {
	m, ft, fs := newFakeManager()
	update(t, m, func(*snat.State) []snat.Entry {
		return []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.23"), entry("2001:db8:ffff::4", "2001:db8::250", "2001:db8::22")}
	})
	v4, _ := ft.Save(snat.IPv4)
	v6, _ := ft.Save(snat.IPv6)
	sets, _ := fs.Save()
	ft.FailRestore[snat.IPv6] = fmt.Errorf("injected failure")
	st, _ := m.Read()
	var many []snat.Entry
	for i := range 20 {
		many = append(many, entry(fmt.Sprintf("203.0.113.%d", i), "192.0.2.250", "192.0.2.22"))
	}
	many = append(many, entry("2001:db8:ffff::5", "2001:db8::250", "2001:db8::23"))
	p := m.MakePlan(st, many)
	if err := m.Apply(p); err == nil {
		t.Fatal("apply with a failing snat.IPv6 write succeeded")
	}
	v4After, _ := ft.Save(snat.IPv4)
	v6After, _ := ft.Save(snat.IPv6)
	setsAfter, _ := fs.Save()
	if v4 != v4After || v6 != v6After || sets != setsAfter {
		t.Errorf("a failed apply left changes:\nv4 %s\nv6 %s\nsets %s", cmp.Diff(v4, v4After), cmp.Diff(v6, v6After), cmp.Diff(sets, setsAfter))
	}
}

// evaluate walks a rendered chain the way the kernel does for the first
// packet of a connection and returns the source it leaves with.
func evaluate(c Chain, sets map[string]Set, natural netip.Addr, out string, dst netip.Addr, nth map[int]int) netip.Addr {
	return evaluatePacket(c, sets, snat.Packet{Dst: dst, Out: out, Src: natural}, nth)
}

// evaluatePacket is evaluate for any packet: it models each match the
// kernel applies (addrtype, owner, cgroup subtree, set, statistic).
func evaluatePacket(c Chain, sets map[string]Set, p snat.Packet, nth map[int]int) netip.Addr {
	for i, r := range c.Rules {
		if r.Out != p.Out || !r.Src.Contains(p.Src) || r.Forwarded != p.Forwarded {
			continue
		}
		if r.HasUID && (!p.HasUID || p.UID != r.UID) {
			continue
		}
		if r.Cgroup != "" && !snat.Cgroup(r.Cgroup).Contains(snat.Cgroup(p.Cgroup)) {
			continue
		}
		if r.Set != "" {
			if !setMatches(sets[r.Set], p.Dst) {
				continue
			}
		} else if r.Dst.IsValid() && !r.Dst.Contains(p.Dst) {
			continue
		}
		if r.Every > 0 {
			n := nth[i]
			nth[i]++
			if n%r.Every != 0 {
				continue
			}
		}
		if r.Target == "RETURN" {
			return p.Src
		}
		return r.ToSource
	}
	return p.Src
}

// setMatches is hash:net semantics: the most specific element decides, and
// a nomatch element means no match.
func setMatches(s Set, a netip.Addr) bool {
	best, match := -1, false
	for _, p := range s.Members {
		if p.Contains(a) && p.Bits() > best {
			best, match = p.Bits(), true
		}
	}
	for _, p := range s.NoMatch {
		if p.Contains(a) && p.Bits() > best {
			best, match = p.Bits(), false
		}
	}
	return match
}

// TestLongestPrefixWinsAcrossSetsAndRules renders random overlapping entries,
// some grouped into sets and some single rules, and checks that for random
// destinations the chain picks the source of the longest matching entry.
func TestLongestPrefixWinsAcrossSetsAndRules(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	natural := addr("192.0.2.250")
	pool := []netip.Addr{addr("192.0.2.22"), addr("192.0.2.23"), addr("192.0.2.24"), natural}
	for round := range 30 {
		seen := map[netip.Prefix]bool{}
		var es []snat.Entry
		for range 10 + rng.IntN(60) {
			bits := 8 + rng.IntN(25)
			a := netip.AddrFrom4([4]byte{198, byte(rng.IntN(4)), byte(rng.IntN(256)), byte(rng.IntN(256))})
			p, _ := a.Prefix(bits)
			if seen[p] {
				continue
			}
			seen[p] = true
			// Skew towards one source so that sets form.
			to := pool[0]
			if rng.IntN(3) == 0 {
				to = pool[rng.IntN(len(pool))]
			}
			es = append(es, snat.Entry{Match: snat.Match{Dst: p, Out: "eth0"}, Natural: natural, To: []netip.Addr{to}})
		}
		norm := snat.Normalize(es)
		c := Render(snat.IPv4, norm)
		sets := map[string]Set{}
		for _, s := range c.Sets {
			sets[s.Name] = s
		}
		for range 500 {
			dst := netip.AddrFrom4([4]byte{198, byte(rng.IntN(4)), byte(rng.IntN(256)), byte(rng.IntN(256))})
			want := natural
			if e := snat.Effective(es, snat.Packet{Dst: dst, Out: "eth0", Src: natural}); e != nil {
				want = e.To[0]
			}
			if got := evaluate(c, sets, natural, "eth0", dst, map[int]int{}); got != want {
				t.Fatalf("round %d: %s leaves with %s, want %s (sets %d, rules %d)", round, dst, got, want, len(c.Sets), len(c.Rules))
			}
		}
	}
}

func TestSpreadIsRoundRobin(t *testing.T) {
	e := entry("203.0.113.0/24", "192.0.2.250", "192.0.2.21", "192.0.2.22", "192.0.2.23")
	c := Render(snat.IPv4, []snat.Entry{e})
	nth := map[int]int{}
	count := map[netip.Addr]int{}
	for range 300 {
		count[evaluate(c, nil, e.Natural, "eth0", addr("203.0.113.7"), nth)]++
	}
	for _, a := range e.To {
		if count[a] != 100 {
			t.Errorf("%s got %d of 300 connections, want 100 (%v)", a, count[a], count)
		}
	}
}

// TestWeightedSpreadIsExact: a weighted spread (snat.Weigh's turns) is
// one nth rule per turn, and gives each address exactly its share; it
// reads back as the same To, so a re-plan is empty.
func TestWeightedSpreadIsExact(t *testing.T) {
	to, err := snat.Weigh([]netip.Addr{addr("192.0.2.22"), addr("192.0.2.23")}, []int{3, 1})
	if err != nil {
		t.Fatal(err)
	}
	e := entry("203.0.113.0/24", "192.0.2.250")
	e.To = to
	c := Render(snat.IPv4, []snat.Entry{e})
	if len(c.Rules) != 4 {
		t.Fatalf("3:1 rendered %d rules, want 4 (one per turn):\n%v", len(c.Rules), c.Args())
	}
	nth := map[int]int{}
	count := map[netip.Addr]int{}
	for range 4000 {
		count[evaluate(c, nil, e.Natural, "eth0", addr("203.0.113.7"), nth)]++
	}
	if count[addr("192.0.2.22")] != 3000 || count[addr("192.0.2.23")] != 1000 {
		t.Errorf("4000 connections went %v, want 3000 and 1000", count)
	}
	m, _, _ := newFakeManager()
	update(t, m, func(*snat.State) []snat.Entry { return []snat.Entry{e} })
	st, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Entries(); len(got) != 1 || !got[0].Equal(e) {
		t.Fatalf("read back %v, want %v", got, e)
	}
	if p := m.MakePlan(st, []snat.Entry{e}); !p.Empty() {
		t.Errorf("re-plan of the weighted entry is not empty: %v", p.Changes)
	}
	// The same weights in another order interleave differently: another
	// rule, not one group.
	other, _ := snat.Weigh([]netip.Addr{addr("192.0.2.23"), addr("192.0.2.22")}, []int{1, 3})
	f := entry("198.51.100.0/24", "192.0.2.250")
	f.To = other
	if c := Render(snat.IPv4, []snat.Entry{e, f}); len(c.Rules) != 8 {
		t.Errorf("two weighted orders rendered %d rules, want 8:\n%v", len(c.Rules), c.Args())
	}
}

func TestParseSaveReadsBackWhatRenderWrites(t *testing.T) {
	m, _, _ := newFakeManager()
	var want []snat.Entry
	for i := range 12 {
		want = append(want, entry(fmt.Sprintf("198.51.100.%d", i), "192.0.2.250", "192.0.2.22"))
	}
	want = append(want,
		entry("198.51.100.0/24", "192.0.2.250", "192.0.2.23"),
		entry("2001:db8:ffff::/48", "2001:db8::250", "2001:db8::22", "2001:db8::23"),
	)
	update(t, m, func(*snat.State) []snat.Entry { return want })
	st, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	snat.SortEntries(want)
	if diff := cmp.Diff(want, st.Entries(), cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("read back (-want +got):\n%s", diff)
	}
	if n := len(snapshot(st).Installed[snat.IPv4].SetNames); n != 1 {
		t.Errorf("12 destinations of one source made %d sets, want 1", n)
	}
	if p := m.MakePlan(st, want); !p.Empty() {
		t.Errorf("re-plan of the installed state is not empty: %v", p.Changes)
	}
}

func TestEditedSetIsRepaired(t *testing.T) {
	m, _, fs := newFakeManager()
	var want []snat.Entry
	for i := range 10 {
		want = append(want, entry(fmt.Sprintf("198.51.100.%d", i), "192.0.2.250", "192.0.2.22"))
	}
	update(t, m, func(*snat.State) []snat.Entry { return want })
	st, _ := m.Read()
	name := snapshot(st).Installed[snat.IPv4].SetNames[0]
	fs.Put(Set{Name: name, Family: snat.IPv4, Members: []netip.Prefix{pfx("198.51.100.1")}})
	st, _ = m.Read()
	if p := m.MakePlan(st, want); p.Empty() {
		t.Fatal("a hand-edited set was not noticed")
	}
	update(t, m, func(*snat.State) []snat.Entry { return want })
	st, _ = m.Read()
	if got := len(snapshot(st).Sets[name].Members); got != 10 {
		t.Errorf("repaired set has %d members, want 10", got)
	}
}

func TestParseSaveReportsForeignRulesInOurChain(t *testing.T) {
	text := "*nat\n:POSTROUTING ACCEPT [0:0]\n:EGRESS-SNAT - [0:0]\n-A POSTROUTING -j MASQUERADE\n-A POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT\n-A EGRESS-SNAT -j ACCEPT\nCOMMIT\n"
	in, err := ParseSave(snat.IPv4, text, nil)
	if err != nil {
		t.Fatal(err)
	}
	if in.JumpFirst || len(in.Jumps) != 1 || len(in.Foreign) != 1 {
		t.Errorf("got first=%v jumps=%d foreign=%v", in.JumpFirst, len(in.Jumps), in.Foreign)
	}
}

func TestLockTimesOut(t *testing.T) {
	// A directory of the test's own: the host's lock under /run is never
	// taken, so a real egress-snat run on this machine never waits for us.
	lock := snat.FileLock{Dir: t.TempDir()}
	unlock, err := lock.Lock(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	// flock locks are per open file description, so a second Lock in the
	// same process contends like another process would.
	start := time.Now()
	_, err = lock.Lock(100 * time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "another egress-snat run") {
		t.Fatalf("second lock: %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("bounded wait took %s", time.Since(start))
	}
}
