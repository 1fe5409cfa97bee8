package iptables

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/snat"
	"github.com/google/go-cmp/cmp"
)

func senderEntry(s snat.Sender, dst, natural string, to ...string) snat.Entry {
	e := entry(dst, natural, to...)
	e.Sender = s
	if !s.Local() {
		e.Natural = netip.Addr{}
	}
	return e
}

// TestRuleRoundTrip: every rule shape Args renders, ParseRule reads back
// as the same struct, whatever order the backend prints the matches in.
func TestRuleRoundTrip(t *testing.T) {
	rules := []Rule{
		{Src: pfx("192.0.2.250"), Dst: pfx("198.51.100.4"), Out: "eth0", Target: "SNAT", ToSource: addr("192.0.2.22")},
		{Src: pfx("192.0.2.250"), Out: "eth0", Target: "RETURN"},
		{Src: pfx("10.77.0.0/24"), Forwarded: true, Set: "egress-snat4-abc", Out: "eth0", Every: 3, Target: "SNAT", ToSource: addr("192.0.2.23")},
		{Src: pfx("192.0.2.250"), HasUID: true, UID: 0, Out: "eth0", Target: "SNAT", ToSource: addr("192.0.2.22")},
		{Src: pfx("2001:db8::250"), Cgroup: "system.slice/postfix.service", Dst: pfx("2001:db8:ffff::/48"), Out: "eth0", Target: "SNAT", ToSource: addr("2001:db8::22")},
		{Src: pfx("10.50.0.0/24"), Forwarded: true, Set: "egress-snat4-abc", Out: "eth0", NewOrInvalid: true, Target: "DROP"},
	}
	for _, r := range rules {
		f := snat.FamilyOf(r.Src.Addr())
		got, err := ParseRule(f, r.Args())
		if err != nil {
			t.Errorf("%s: %v", r, err)
			continue
		}
		if got != r {
			t.Errorf("round trip (-want +got):\n%s", cmp.Diff(r, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })))
		}
		// The same words with the matches in another order.
		args := r.Args()
		rev := append([]string{}, args[:2]...)
		rev = append(rev, args[len(args)-4:]...)
		rev = append(rev, args[2:len(args)-4]...)
		if got, err := ParseRule(f, rev); err != nil || got != r {
			t.Errorf("reordered %q: got %v, %v", rev, got, err)
		}
	}
	for _, bad := range [][]string{
		{"-s", "192.0.2.250/32", "-o", "eth0", "-j", "SNAT", "--to-source", "192.0.2.22"},                                            // no comment
		{"-s", "192.0.2.0/24", "-o", "eth0", "-m", "comment", "--comment", "egress-snat", "-j", "SNAT", "--to-source", "192.0.2.22"}, // local rule, -s not a host
		{"-s", "192.0.2.250/32", "-o", "eth0", "-m", "comment", "--comment", "egress-snat", "-j", "MASQUERADE"},
		{"-s", "192.0.2.250/32", "-o", "eth0", "-m", "tcp", "-m", "comment", "--comment", "egress-snat", "-j", "RETURN"},
	} {
		if r, err := ParseRule(snat.IPv4, bad); err == nil {
			t.Errorf("%q parsed as ours: %v", bad, r)
		}
	}
}

// TestPrecedenceMatchesTheKernelModel renders random entries of every kind
// of sender and checks, for random packets, that the chain as the kernel
// walks it (evaluatePacket) gives what Effective says the most specific
// match is.
func TestPrecedenceMatchesTheKernelModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	natural := addr("192.0.2.250")
	pool := []netip.Addr{addr("192.0.2.22"), addr("192.0.2.23"), addr("192.0.2.24"), natural}
	senders := []snat.Sender{snat.Host(), snat.Host(), snat.UID(4242), snat.UID(0), snat.Cgroup("system.slice"), snat.Cgroup("system.slice/postfix.service"),
		snat.From(pfx("10.77.0.0/16")), snat.From(pfx("10.77.1.0/24")), snat.From(pfx("172.30.0.0/16"))}
	for round := range 40 {
		seen := map[snat.Match]bool{}
		var es []snat.Entry
		for range 10 + rng.IntN(60) {
			bits := rng.IntN(33)
			a := netip.AddrFrom4([4]byte{198, byte(rng.IntN(2)), byte(rng.IntN(4)), byte(rng.IntN(256))})
			p, _ := a.Prefix(bits)
			s := senders[rng.IntN(len(senders))]
			e := senderEntry(s, p.String(), natural.String(), pool[rng.IntN(len(pool))].String())
			if seen[e.Match] {
				continue
			}
			seen[e.Match] = true
			es = append(es, e)
		}
		norm := snat.Normalize(es)
		c := Render(snat.IPv4, norm)
		sets := map[string]Set{}
		for _, s := range c.Sets {
			sets[s.Name] = s
		}
		for range 400 {
			p := snat.Packet{Dst: netip.AddrFrom4([4]byte{198, byte(rng.IntN(2)), byte(rng.IntN(4)), byte(rng.IntN(256))}), Out: "eth0", Src: natural}
			switch rng.IntN(4) {
			case 0:
				p.Forwarded = true
				p.Src = netip.AddrFrom4([4]byte{10, 77, byte(rng.IntN(3)), 2})
			case 1:
				p.HasUID, p.UID = true, []uint32{0, 4242, 7}[rng.IntN(3)]
			case 2:
				p.Cgroup = []string{"system.slice/postfix.service", "system.slice/cron.service", "user.slice"}[rng.IntN(3)]
				p.HasUID, p.UID = true, 4242
			}
			want := p.Src
			if e := snat.Effective(es, p); e != nil && !e.Keep() {
				want = e.To[0]
			}
			if got := evaluatePacket(c, sets, p, map[int]int{}); got != want {
				t.Fatalf("round %d: %+v leaves with %s, want %s (decided by %v)\nchain:\n%s", round, p, got, want, snat.Effective(es, p), chainText(c))
			}
		}
	}
}

func chainText(c Chain) string {
	var b strings.Builder
	for _, r := range c.Rules {
		b.WriteString(r.String() + "\n")
	}
	return b.String()
}

// TestSenderRulesComeFirst: the documented precedence, case by case.
func TestSenderRulesComeFirst(t *testing.T) {
	es := []snat.Entry{
		entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23"),
		entry("198.51.100.4", "192.0.2.250", "192.0.2.24"),
		senderEntry(snat.UID(4242), "0.0.0.0/0", "192.0.2.250", "192.0.2.22"),
		senderEntry(snat.From(pfx("10.77.0.0/24")), "198.51.100.4", "192.0.2.250", "192.0.2.22"),
	}
	for _, tc := range []struct {
		p    snat.Packet
		want string
	}{
		{snat.Packet{Dst: addr("198.51.100.4"), Out: "eth0", Src: addr("192.0.2.250")}, "192.0.2.24"},
		{snat.Packet{Dst: addr("203.0.113.7"), Out: "eth0", Src: addr("192.0.2.250")}, "192.0.2.23"},
		// a uid rule for everything beats a destination-only /32
		{snat.Packet{Dst: addr("198.51.100.4"), Out: "eth0", Src: addr("192.0.2.250"), HasUID: true, UID: 4242}, "192.0.2.22"},
		{snat.Packet{Dst: addr("198.51.100.4"), Out: "eth0", Src: addr("10.77.0.2"), Forwarded: true}, "192.0.2.22"},
		// forwarded traffic to a destination without a --from rule is untouched
		{snat.Packet{Dst: addr("203.0.113.7"), Out: "eth0", Src: addr("10.77.0.2"), Forwarded: true}, "10.77.0.2"},
	} {
		got := tc.p.Src
		if e := snat.Effective(es, tc.p); e != nil {
			got = e.To[0]
		}
		if got.String() != tc.want {
			t.Errorf("%+v: got %s, want %s", tc.p, got, tc.want)
		}
	}
}

// TestKeepNaturalUnderAnotherSender: a uid asking for the natural source
// needs a RETURN rule because the host-wide rule would rewrite it.
func TestKeepNaturalUnderAnotherSender(t *testing.T) {
	got := snat.Normalize([]snat.Entry{
		entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23"),
		senderEntry(snat.UID(4242), "0.0.0.0/0", "192.0.2.250", "192.0.2.250"),
		senderEntry(snat.UID(7), "198.51.100.4", "192.0.2.250", "192.0.2.250"),
	})
	c := Render(snat.IPv4, got)
	if len(c.Rules) != 3 || c.Rules[0].Target != "RETURN" || c.Rules[1].Target != "RETURN" {
		t.Fatalf("want two RETURN rules before the host rule, got:\n%s", chainText(c))
	}
	alone := snat.Normalize([]snat.Entry{senderEntry(snat.UID(4242), "0.0.0.0/0", "192.0.2.250", "192.0.2.250")})
	if len(alone) != 0 {
		t.Errorf("a keep-natural uid entry with nothing to protect from was kept: %v", alone)
	}
}

// TestTwoSendersOneDestinationCoexist: identity is the whole match.
func TestTwoSendersOneDestinationCoexist(t *testing.T) {
	m, _, _ := newFakeManager()
	a := senderEntry(snat.From(pfx("10.77.0.0/24")), "198.51.100.4", "192.0.2.250", "192.0.2.22")
	b := senderEntry(snat.From(pfx("10.78.0.0/24")), "198.51.100.4", "192.0.2.250", "192.0.2.23")
	h := entry("198.51.100.4", "192.0.2.250", "192.0.2.24")
	update(t, m, func(*snat.State) []snat.Entry { return []snat.Entry{a, b, h} })
	st, _ := m.Read()
	if n := len(st.Entries()); n != 3 {
		t.Fatalf("read back %d entries, want 3: %v", n, st.Entries())
	}
	// Setting one sender's destination again replaces only that one.
	a2 := a
	a2.To = []netip.Addr{addr("192.0.2.25")}
	p := update(t, m, func(st *snat.State) []snat.Entry { return snat.Merge(st.Entries(), []snat.Entry{a2}) })
	if len(p.Changes) != 1 || p.Changes[0].Op != "change" || p.Changes[0].New.Sender != a.Sender {
		t.Errorf("changes: %v", p.Changes)
	}
}

// TestPlanIsTheProgram: Apply runs exactly the plan's steps, in order; the
// dry run's payloads are what the fakes receive.
func TestPlanIsTheProgram(t *testing.T) {
	m, ft, fs := newFakeManager()
	ft.Droppable = true
	var want []snat.Entry
	for i := range 10 {
		want = append(want, entry(fmt.Sprintf("198.51.100.%d", i), "192.0.2.250", "192.0.2.22"))
	}
	rec := &recordingTables{FakeTables: ft}
	m.Backend.(*Backend).Tables = rec
	st, _ := m.Read()
	p := m.MakePlan(st, want)
	var tools []snat.Tool
	for _, s := range p.Steps {
		tools = append(tools, s.Do.Tool)
	}
	if diff := cmp.Diff([]snat.Tool{ToolIPSet, ToolIPTables}, tools); diff != "" {
		t.Fatalf("steps (-want +got):\n%s", diff)
	}
	if err := m.Apply(p); err != nil {
		t.Fatal(err)
	}
	if len(rec.inputs) != 1 || rec.inputs[0] != p.Steps[1].Do.Input {
		t.Errorf("iptables-restore got %q, the plan said %q", rec.inputs, p.Steps[1].Do.Input)
	}
	if fs.Restores != 1 {
		t.Errorf("%d ipset restores, want 1", fs.Restores)
	}
	// clear: the chain, then the unused set and the empty table, as cleanup.
	st, _ = m.Read()
	p = m.MakePlan(st, nil)
	tools = nil
	for _, s := range p.Steps {
		tools = append(tools, s.Do.Tool)
	}
	if diff := cmp.Diff([]snat.Tool{ToolIPTables, ToolIPSet, ToolDropTable}, tools); diff != "" {
		t.Fatalf("clear steps (-want +got):\n%s", diff)
	}
	if err := m.Apply(p); err != nil {
		t.Fatal(err)
	}
	if text, _ := ft.Save(snat.IPv4); text != "" {
		t.Errorf("after clear the fake still has:\n%s", text)
	}
}

type recordingTables struct {
	*FakeTables
	inputs []string
}

func (r *recordingTables) Restore(f snat.Family, payload string) error {
	r.inputs = append(r.inputs, payload)
	return r.FakeTables.Restore(f, payload)
}

// TestFailedStepIsUndone: a failing IPv6 write undoes the IPv4 write and
// the new sets, from the plan's own undo steps.
func TestFailedStepIsUndone(t *testing.T) {
	m, ft, fs := newFakeManager()
	update(t, m, func(*snat.State) []snat.Entry { return []snat.Entry{entry("203.0.113.7", "192.0.2.250", "192.0.2.23")} })
	v4, _ := ft.Save(snat.IPv4)
	sets, _ := fs.Save()
	var want []snat.Entry
	for i := range 10 {
		want = append(want, entry(fmt.Sprintf("198.51.100.%d", i), "192.0.2.250", "192.0.2.22"))
	}
	want = append(want, entry("2001:db8:ffff::4", "2001:db8::250", "2001:db8::22"))
	ft.FailRestore[snat.IPv6] = fmt.Errorf("injected")
	_, _, err := m.Update(snat.Request{LockTimeout: time.Second, Desired: func(*snat.State) ([]snat.Entry, error) { return want, nil }})
	if err == nil || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("err = %v", err)
	}
	v4After, _ := ft.Save(snat.IPv4)
	setsAfter, _ := fs.Save()
	if v4 != v4After || sets != setsAfter {
		t.Errorf("a failed apply left changes:\n%s\n%s", cmp.Diff(v4, v4After), cmp.Diff(sets, setsAfter))
	}
}

// TestUpdateTakesTheInjectedLock: Update never runs unlocked and gives up
// when the lock is held.
func TestUpdateTakesTheInjectedLock(t *testing.T) {
	m, _, _ := newFakeManager()
	l := m.Locker.(*countingLock)
	update(t, m, func(*snat.State) []snat.Entry { return nil })
	if l.taken != 1 || l.held != 0 {
		t.Errorf("lock taken %d, held %d after Update", l.taken, l.held)
	}
	l.held = 1
	if _, _, err := m.Update(snat.Request{LockTimeout: time.Second, Desired: func(*snat.State) ([]snat.Entry, error) { return nil, nil }}); err == nil {
		t.Error("Update ran while the lock was held")
	}
}

// TestKeepInsideAKeepIsDropped: a destination asking for the natural source
// inside a broader destination that already keeps it needs no rule of its
// own; one with a rewriting rule between them still does.
func TestKeepInsideAKeepIsDropped(t *testing.T) {
	got := snat.Normalize([]snat.Entry{
		entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23"),
		entry("198.51.100.0/24", "192.0.2.250", "192.0.2.250"),
		entry("198.51.100.4", "192.0.2.250", "192.0.2.250"),
	})
	if len(got) != 2 || got[0].Dst != pfx("198.51.100.0/24") {
		t.Errorf("want the /24 keep and the /0 rule only, got %v", got)
	}
	got = snat.Normalize([]snat.Entry{
		entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23"),
		entry("198.51.100.0/24", "192.0.2.250", "192.0.2.250"),
		entry("198.51.100.0/28", "192.0.2.250", "192.0.2.22"),
		entry("198.51.100.4", "192.0.2.250", "192.0.2.250"),
	})
	if len(got) != 4 {
		t.Errorf("a rewriting /28 between the keeps: want all four, got %v", got)
	}
}
