package nft

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func pfx(s string) netip.Prefix {
	if !strings.Contains(s, "/") {
		a := addr(s)
		return netip.PrefixFrom(a, a.BitLen())
	}
	return netip.MustParsePrefix(s)
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, addr(s))
	}
	return out
}

// entry is a host entry via eth0: to nothing keeps the natural source.
func entry(dst, natural string, to ...string) snat.Entry {
	e := snat.Entry{Match: snat.Match{Dst: pfx(dst), Out: "eth0"}, To: addrs(to...)}
	if natural != "" {
		e.Natural = addr(natural)
	}
	return e
}

func senderEntry(s snat.Sender, dst, natural string, to ...string) snat.Entry {
	e := entry(dst, natural, to...)
	e.Sender = s
	if !s.Local() {
		e.Natural = netip.Addr{}
	}
	return e
}

// cmpOpts compare netip values by value, and rules without counters.
var cmpOpts = cmp.Options{
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Transformer("addrs", func(e Elems) []string {
		var out []string
		for a := range e.All() {
			out = append(out, a.String())
		}
		return out
	}),
}

func hostRule(dst, to string) Rule {
	r := Rule{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Counter: true, Comment: "host",
		Action: Action{Kind: ActSNAT}}
	if to != "" {
		r.Action.To = addrs(to)
	}
	if dst != "" {
		r.Dst = pfx(dst)
	}
	return r
}

var natHook = Hook{Type: "nat", Hook: "postrouting", Priority: NATPriority}

// natChain is the nat chain with rules, and the keeper last.
func natChain(rules ...Rule) Chain {
	return Chain{Name: ChainNAT, Hook: natHook, Rules: append(rules, keeper)}
}

// TestRender: each sender kind and action as a rule, small groups as one
// rule a destination, larger ones as a set per prefix length.
func TestRender(t *testing.T) {
	many := func(prefix string, n int, to string) []snat.Entry {
		var out []snat.Entry
		for i := range n {
			out = append(out, entry(fmt.Sprintf("%s.%d", prefix, i+1), "192.0.2.250", to))
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		entries []snat.Entry
		want    *Table
	}{
		{
			name: "no entries: the nat chain alone",
			want: &Table{Chains: []Chain{natChain()}},
		},
		{
			name:    "one host destination",
			entries: []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")},
			want:    &Table{Chains: []Chain{natChain(hostRule("198.51.100.4", "192.0.2.22"))}},
		},
		{
			name: "longest prefix first, every destination last, a carve-out kept",
			entries: []snat.Entry{
				entry("0.0.0.0/0", "192.0.2.250", "192.0.2.23"),
				entry("198.51.100.0/24", "192.0.2.250", "192.0.2.22"),
				entry("198.51.100.4", "192.0.2.250"),
			},
			want: &Table{Chains: []Chain{natChain(
				func() Rule { r := hostRule("198.51.100.4", ""); r.Action = Action{Kind: ActAccept}; return r }(),
				hostRule("198.51.100.0/24", "192.0.2.22"),
				hostRule("", "192.0.2.23"),
			)}},
		},
		{
			name:    "spread",
			entries: []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22", "192.0.2.23")},
			want: &Table{Chains: []Chain{natChain(
				func() Rule {
					r := hostRule("198.51.100.4", "")
					r.Action.To = addrs("192.0.2.22", "192.0.2.23")
					return r
				}(),
			)}},
		},
		{
			name: "senders in precedence order: from, cgroup, uid, host",
			entries: []snat.Entry{
				entry("198.51.100.4", "192.0.2.250", "192.0.2.22"),
				senderEntry(snat.UID(4242), "198.51.100.0/24", "192.0.2.250", "192.0.2.23"),
				senderEntry(snat.Cgroup("system.slice/x.service"), "0.0.0.0/0", "192.0.2.250", "192.0.2.24"),
				senderEntry(snat.From(pfx("10.88.0.0/24")), "198.51.100.4", "", "192.0.2.25"),
			},
			want: &Table{Chains: []Chain{natChain(
				Rule{Family: snat.IPv4, Out: "eth0", Forwarded: true, Src: pfx("10.88.0.0/24"), Dst: pfx("198.51.100.4"), Counter: true,
					Comment: "from 10.88.0.0/24", Action: Action{Kind: ActSNAT, To: addrs("192.0.2.25")}},
				Rule{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Cgroup: "system.slice/x.service", Counter: true,
					Comment: "cgroup system.slice/x.service", Action: Action{Kind: ActSNAT, To: addrs("192.0.2.24")}},
				Rule{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), HasUID: true, UID: 4242, Dst: pfx("198.51.100.0/24"), Counter: true,
					Comment: "uid 4242", Action: Action{Kind: ActSNAT, To: addrs("192.0.2.23")}},
				hostRule("198.51.100.4", "192.0.2.22"),
			)}},
		},
		{
			name: "IPv6",
			entries: []snat.Entry{
				{Match: snat.Match{Dst: pfx("2001:db8:ffff::/48"), Out: "eth0"}, Natural: addr("2001:db8::250"), To: addrs("2001:db8::22")},
			},
			want: &Table{Chains: []Chain{natChain(
				Rule{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Dst: pfx("2001:db8:ffff::/48"), Counter: true, Comment: "host",
					Action: Action{Kind: ActSNAT, To: addrs("2001:db8::22")}},
			)}},
		},
		{
			name:    "a group of eight is a set; the /32 of another group stays a rule ahead of it",
			entries: append(many("198.51.100", 8, "192.0.2.22"), entry("198.51.100.9", "192.0.2.250", "192.0.2.23")),
			want: func() *Table {
				e := many("198.51.100", 8, "192.0.2.22")
				gr := &group{chain: ChainNAT, fam: snat.IPv4, sender: snat.Host(), bits: 32, out: "eth0", natural: addr("192.0.2.250"),
					action: Action{Kind: ActSNAT, To: addrs("192.0.2.22")}}
				gr.actKey = gr.action.key()
				name := gr.setName()
				set := Set{Name: name, Family: snat.IPv4, Bits: 32, Elems: NewElems(snat.IPv4)}
				for _, x := range e {
					set.Elems.Add(x.Dst.Addr())
				}
				r := hostRule("", "192.0.2.22")
				r.Set, r.SetBits = name, 32
				return &Table{Sets: []Set{set}, Chains: []Chain{natChain(
					r, hostRule("198.51.100.9", "192.0.2.23"))}}
			}(),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Render(tc.entries)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got, cmpOpts); diff != "" {
				t.Errorf("Render (-want +got):\n%s\ngot:\n%s", diff, got)
			}
		})
	}
}

// TestRenderMarks: a uid's traffic marked out of eth1 gets the mark chain
// with the ct mark rules around it; a more specific entry of the same uid
// that stays on eth0 returns ahead of it.
func TestRenderMarks(t *testing.T) {
	marked := senderEntry(snat.UID(4242), "198.51.100.0/24", "192.0.2.250", "203.0.113.130")
	marked.Out, marked.Via, marked.Replies, marked.Marked = "eth1", addr("203.0.113.129"), true, true
	stays := senderEntry(snat.UID(4242), "198.51.100.4", "192.0.2.250", "192.0.2.22")
	fwd := senderEntry(snat.From(pfx("10.88.0.0/24")), "0.0.0.0/0", "", "203.0.113.131")
	fwd.Out, fwd.Via, fwd.Replies, fwd.Marked = "eth1", addr("203.0.113.129"), true, true
	got, err := Render([]snat.Entry{marked, stays, fwd})
	if err != nil {
		t.Fatal(err)
	}
	m130 := routes.MarkOf(routes.FirstReplyTable)     // 203.0.113.130 has the first reply table
	m131 := routes.MarkOf(routes.FirstReplyTable + 1) // 203.0.113.131 the second
	uid := Rule{Family: snat.IPv4, Src: pfx("192.0.2.250"), HasUID: true, UID: 4242, Comment: "uid 4242"}
	ret := uid
	ret.Dst, ret.Action = pfx("198.51.100.4"), Action{Kind: ActReturn}
	mark := uid
	mark.Unmarked, mark.Dst, mark.Action = true, pfx("198.51.100.0/24"), Action{Kind: ActMark, Mark: m130}
	want := []Chain{
		{Name: ChainMarkOut, Hook: Hook{Type: "route", Hook: "output", Priority: MarkPriority}, Rules: []Rule{
			{Action: Action{Kind: ActRestoreMark, Mark: m130}},
			ret, mark,
			{Action: Action{Kind: ActSaveMark, Mark: 0}},
			{Action: Action{Kind: ActSaveMark, Mark: m130}},
		}},
		{Name: ChainMarkFwd, Hook: Hook{Type: "filter", Hook: "prerouting", Priority: MarkPriority}, Rules: []Rule{
			{Family: snat.IPv4, Unmarked: true, Forwarded: true, Src: pfx("10.88.0.0/24"), Comment: "from 10.88.0.0/24",
				Action: Action{Kind: ActMark, Mark: m131}},
		}},
	}
	if diff := cmp.Diff(want, got.Chains[1:], cmpOpts); diff != "" {
		t.Errorf("mark chains (-want +got):\n%s\ngot:\n%s", diff, got)
	}
	// The nat chain gives the marked traffic eth1's address on eth1.
	nat := got.Chain(ChainNAT).Rules
	if len(nat) != 4 || nat[0].Out != "eth1" || nat[0].Action.To[0] != addr("203.0.113.131") {
		t.Errorf("nat chain:\n%s", got)
	}
}

func TestRenderRefuses(t *testing.T) {
	long := entry("198.51.100.4", "192.0.2.250", "192.0.2.22")
	long.Out = "a-very-long-interface-name"
	mixed := entry("198.51.100.4", "192.0.2.250", "2001:db8::22")
	for _, e := range []snat.Entry{long, mixed} {
		if _, err := Render([]snat.Entry{e}); err == nil {
			t.Errorf("Render(%v) did not fail", e)
		}
	}
}

// TestRenderPoolsApart: entries of two pools, one after the other for one
// sender, prefix length and interface, are two rules of their own pools;
// a period without its address, or with one outside its pool, is refused.
func TestRenderPoolsApart(t *testing.T) {
	pool := func(dst, p string, s snat.Sticky, to ...string) snat.Entry {
		e := snat.Entry{Match: snat.Match{Dst: pfx(dst), Out: "eth0"}, Natural: addr("2001:db8::250"), Pool: pfx(p), Sticky: s}
		for _, a := range to {
			e.To = append(e.To, addr(a))
		}
		return e
	}
	es := []snat.Entry{pool("2001:db8:a::/48", "2001:db8:1::/64", snat.StickyConnection), pool("2001:db8:b::/48", "2001:db8:2::/64", snat.StickySender)}
	snat.SortEntries(es)
	tbl, err := Render(es)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range tbl.Chain(ChainNAT).Rules {
		if r.Action.Pool.IsValid() {
			got = append(got, r.Action.Pool.String()+" "+string(r.Action.Sticky))
		}
	}
	slices.Sort(got)
	if want := []string{"2001:db8:1::/64 connection", "2001:db8:2::/64 sender"}; !slices.Equal(got, want) {
		t.Errorf("pool rules %v, want %v", got, want)
	}
	for _, e := range []snat.Entry{pool("::/0", "2001:db8:1::/64", snat.StickyPeriod), pool("::/0", "2001:db8:1::/64", snat.StickyPeriod, "2001:db8:2::1"), pool("::/0", "2001:db8:1::/64", snat.StickySender, "2001:db8:1::1")} {
		if _, err := Render([]snat.Entry{e}); err == nil || !strings.Contains(err.Error(), "2001:db8:1::/64") {
			t.Errorf("Render(%v): %v, want it refused, naming the pool", e, err)
		}
	}
}

// TestSetNamesStay: a set's name is its group's, not its content's: a
// destination more is an element more.
func TestSetNamesStay(t *testing.T) {
	var es []snat.Entry
	for i := range 20 {
		es = append(es, entry(fmt.Sprintf("198.51.100.%d", i+1), "192.0.2.250", "192.0.2.22"))
	}
	a, _ := Render(slices.Clone(es[:19]))
	b, _ := Render(slices.Clone(es))
	if len(a.Sets) != 1 || len(b.Sets) != 1 || a.Sets[0].Name != b.Sets[0].Name {
		t.Fatalf("set names differ:\n%s\n%s", a, b)
	}
	if !a.Chain(ChainNAT).Equal(*b.Chain(ChainNAT)) {
		t.Errorf("the chain changed with one destination more:\n%s\n%s", a, b)
	}
}

// randomEntries draws entries of every sender kind over a small address
// space, so that prefixes overlap and groups grow past the set threshold.
func randomEntries(rng *rand.Rand, n int) []snat.Entry {
	naturals := []netip.Addr{addr("192.0.2.250"), addr("192.0.2.251")}
	pool := []netip.Addr{addr("192.0.2.22"), addr("192.0.2.23"), addr("192.0.2.24"), addr("192.0.2.250")}
	senders := []snat.Sender{snat.Host(), snat.Host(), snat.Host(), snat.UID(4242), snat.UID(0), snat.Cgroup("system.slice"),
		snat.Cgroup("system.slice/postfix.service"), snat.From(pfx("10.77.0.0/16")), snat.From(pfx("10.77.1.0/24"))}
	seen := map[snat.Match]bool{}
	var es []snat.Entry
	for range n {
		bits := []int{32, 32, 32, 31, 30, 24, 24, 23, 16, 8, 0}[rng.IntN(11)]
		a := netip.AddrFrom4([4]byte{198, byte(rng.IntN(2)), byte(rng.IntN(4)), byte(rng.IntN(64))})
		p, _ := a.Prefix(bits)
		natural := naturals[rng.IntN(len(naturals))]
		var to []string
		switch rng.IntN(8) {
		case 0: // keep
		case 1:
			to = []string{pool[0].String(), pool[1].String()}
		default:
			to = []string{pool[rng.IntN(len(pool))].String()}
		}
		e := senderEntry(senders[rng.IntN(len(senders))], p.String(), natural.String(), to...)
		e.Out = []string{"eth0", "eth0", "eth1"}[rng.IntN(3)]
		if rng.IntN(2) == 0 {
			// Half of them in a few big groups, which become sets.
			e = senderEntry(senders[rng.IntN(2)*3], p.String(), naturals[0].String(), pool[rng.IntN(2)].String())
		}
		if seen[e.Match] {
			continue
		}
		seen[e.Match] = true
		es = append(es, e)
	}
	return es
}

func randomPacket(rng *rand.Rand) snat.Packet {
	p := snat.Packet{Dst: netip.AddrFrom4([4]byte{198, byte(rng.IntN(2)), byte(rng.IntN(4)), byte(rng.IntN(64))}),
		Out: []string{"eth0", "eth1"}[rng.IntN(2)], Src: []netip.Addr{addr("192.0.2.250"), addr("192.0.2.251"), addr("192.0.2.22")}[rng.IntN(3)]}
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
	return p
}

// TestPrecedenceEqualsEffective: for random entries of every kind and
// random packets, the rendered nat chain, walked as the kernel walks it,
// gives every new connection the source snat.Effective says it gets.
func TestPrecedenceEqualsEffective(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 90))
	sets := 0
	for round := range 60 {
		es := snat.Normalize(randomEntries(rng, 20+rng.IntN(300)))
		tbl, err := Render(es)
		if err != nil {
			t.Fatal(err)
		}
		sets += len(tbl.Sets)
		for range 500 {
			p := randomPacket(rng)
			want, got := effectiveSource(es, p), sourceAfter(tbl, p)
			if !slices.Equal(want, got) {
				t.Fatalf("round %d: %+v leaves with %s, want %s (decided by %v; rule %v)\ntable:\n%s",
					round, p, got, want, snat.Effective(es, p), evalChain(tbl, ChainNAT, p, 0), tbl)
			}
		}
	}
	if sets < 60 {
		t.Errorf("only %d sets in all rounds: the test hardly covers them", sets)
	}
}

// TestMarksEqualTheMangleChains: the mark chains, grouped into sets and
// rules per prefix length, give every packet the mark that walking the
// entries one by one, as snat's mangle chains do, gives it.
func TestMarksEqualTheMangleChains(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 42))
	for round := range 60 {
		es := randomEntries(rng, 20+rng.IntN(200))
		for i := range es {
			// Marked entries leave by eth1; entries keep their matches
			// unique.
			if !es[i].Sender.IsHost() && !es[i].Keep() && es[i].Out == "eth1" && rng.IntN(2) == 0 {
				es[i].Marked, es[i].Replies = true, true
				es[i].To = addrs([]string{"203.0.113.130", "203.0.113.131"}[rng.IntN(2)])
			}
		}
		es = snat.Normalize(es)
		tbl, err := Render(es)
		if err != nil {
			t.Fatal(err)
		}
		for range 500 {
			p := randomPacket(rng)
			chain := ChainMarkOut
			if p.Forwarded {
				chain = ChainMarkFwd
			}
			var got uint32
			if r := evalChain(tbl, chain, p, 0); r != nil && r.Action.Kind == ActMark {
				got = r.Action.Mark
			}
			if want := referenceMark(es, p); got != want {
				var b strings.Builder
				for _, r := range tbl.Chain(chain).Rules {
					b.WriteString(r.String() + "\n")
				}
				for _, e := range es {
					if e.Dst.Contains(p.Dst) && !e.Sender.IsHost() {
						fmt.Fprintf(&b, "entry %v marked=%v\n", e, e.Marked)
					}
				}
				t.Fatalf("round %d: %+v gets mark %#x, want %#x\n%s", round, p, got, want, &b)
			}
		}
	}
}

// referenceMark walks the entries one by one in chain order, as snat's
// mangle chains are written: the first entry with a rule that matches p
// (without its interface) decides.
func referenceMark(es []snat.Entry, p snat.Packet) uint32 {
	var paths []routes.Path
	for _, e := range es {
		if e.Routed || e.Marked {
			paths = append(paths, routes.Path{Dst: e.Dst, Dev: e.Out, Src: e.To[0], Replies: e.Replies, Marked: e.Marked})
		}
	}
	tables := routes.ReplyTables(paths)
	for i, e := range es {
		if e.Sender.IsHost() || e.Routed || e.Sender.Local() == p.Forwarded {
			continue
		}
		m := e
		m.Out = p.Out // the mark rules do not match the interface
		if snat.Effective([]snat.Entry{m}, p) == nil {
			continue
		}
		if e.Marked {
			return routes.MarkOf(tables[e.To[0]])
		}
		for _, o := range es[i+1:] {
			if o.Marked && o.Dst.Overlaps(e.Dst) && (o.Sender.Contains(e.Sender) || e.Sender.Contains(o.Sender)) {
				return 0 // it returns
			}
		}
	}
	return 0
}
