package reconcile

import (
	"bytes"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/snat"
)

var (
	spillA   = netip.MustParseAddr("192.0.2.22")
	spillB   = netip.MustParseAddr("192.0.2.23")
	spillNat = netip.MustParseAddr("192.0.2.2")
	spillDst = netip.MustParseAddrPort("203.0.113.9:8080")
)

// spillRule is a failover rule of two addresses with spill and a range of
// ten ports: eight flows are 80%, five 50%.
func spillRule() snat.Entry {
	return snat.Entry{
		Match:   snat.Match{Dst: netip.MustParsePrefix("203.0.113.0/24"), Out: "eth0"},
		Natural: spillNat, To: []netip.Addr{spillA}, Spill: []netip.Addr{spillA, spillB},
		Ports: snat.Ports{Lo: 40000, Hi: 40009},
	}
}

// flows makes n TCP flows from the natural source to dst translated to
// to, every other one ended (TIME_WAIT, which holds its port all the
// same), plus as many untranslated ones and ICMP ones, which do not count.
func flows(n int, to netip.Addr, dst netip.AddrPort) conntrack.Fake {
	var out conntrack.Fake
	for i := range n {
		src := netip.AddrPortFrom(spillNat, uint16(30000+i))
		state := uint8(3)
		if i%2 == 1 {
			state = conntrack.TCPTimeWait
		}
		out = append(out,
			conntrack.Flow{
				Orig:     conntrack.Tuple{Proto: conntrack.TCP, Src: src, Dst: dst},
				Reply:    conntrack.Tuple{Proto: conntrack.TCP, Src: dst, Dst: netip.AddrPortFrom(to, uint16(40000+i))},
				TCPState: state,
			},
			conntrack.Flow{
				Orig:  conntrack.Tuple{Proto: conntrack.TCP, Src: src, Dst: dst},
				Reply: conntrack.Tuple{Proto: conntrack.TCP, Src: dst, Dst: src},
			},
			conntrack.Flow{
				Orig:  conntrack.Tuple{Proto: conntrack.ICMP, Src: netip.AddrPortFrom(spillNat, 0), Dst: netip.AddrPortFrom(dst.Addr(), 0)},
				Reply: conntrack.Tuple{Proto: conntrack.ICMP, Src: netip.AddrPortFrom(dst.Addr(), 0), Dst: netip.AddrPortFrom(to, 0)},
			})
	}
	return out
}

type swapTable struct{ t conntrack.Table }

func (s *swapTable) Flows(fam int) ([]conntrack.Flow, error) { return s.t.Flows(fam) }

// TestSpillThresholds walks one tuple through a spill: below 80% of the
// range nothing happens; at 80% a spill entry for the destination port
// gives the next address; it stays while the tuple is above 50% (no
// flapping) and ends below; flows on the spill's own address count for
// the rule; when every address is busy, no entry is made and it is said
// once; other destinations and ports never spill.
func TestSpillThresholds(t *testing.T) {
	var log bytes.Buffer
	table := &swapTable{}
	s := spiller{flows: table, log: slog.New(slog.NewTextHandler(&log, nil))}
	base := []snat.Entry{spillRule()}
	step := func(when string, ft conntrack.Fake, wantChanged bool, want []string) {
		t.Helper()
		table.t = ft
		changed, err := s.sample(base)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		var got []string
		for _, e := range s.withSpill(base)[1:] {
			got = append(got, e.String())
		}
		if changed != wantChanged || !slices.Equal(got, want) {
			t.Errorf("%s: changed %v, spill entries %q; want %v, %q\nlog:\n%s", when, changed, got, wantChanged, want, log.String())
		}
	}
	other := netip.MustParseAddrPort("203.0.113.10:8080")
	otherPort := netip.MustParseAddrPort("203.0.113.9:8081")
	spilled := []string{"203.0.113.9/32 tcp/8080 via eth0 from 192.0.2.2 -> 192.0.2.23 ports 40000-40009"}

	step("7 of 10", flows(7, spillA, spillDst), false, nil)
	step("7 of 10 to each of two other tuples", append(flows(7, spillA, other), flows(9, spillB, otherPort)...), false, nil)
	step("8 of 10", flows(8, spillA, spillDst), true, spilled)
	if !strings.Contains(log.String(), "spill started") || !strings.Contains(log.String(), `in_use="192.0.2.22=8"`) {
		t.Errorf("no start line with the use:\n%s", log.String())
	}
	step("6 of 10, and 3 on the spill", append(flows(6, spillA, spillDst), flows(3, spillB, spillDst)...), false, spilled)
	step("5 of 10", flows(5, spillA, spillDst), false, spilled)
	step("8 on both", append(flows(8, spillA, spillDst), flows(8, spillB, spillDst)...), true, nil)
	step("8 on both again", append(flows(8, spillA, spillDst), flows(8, spillB, spillDst)...), false, nil)
	if n := strings.Count(log.String(), "every address of the rule is busy"); n != 1 {
		t.Errorf("every address busy said %d times; want once:\n%s", n, log.String())
	}
	step("8 on A, B down to 4", append(flows(8, spillA, spillDst), flows(4, spillB, spillDst)...), true, spilled)
	step("4 of 10", flows(4, spillA, spillDst), true, nil)
	if !strings.Contains(log.String(), "spill ended") {
		t.Errorf("no end line:\n%s", log.String())
	}
	step("none", nil, false, nil)
	if len(s.busy) != 0 {
		t.Errorf("busy tuples left: %v", s.busy)
	}

	// The rule stops spilling (the file changed): its spill ends.
	step("8 of 10 again", flows(8, spillA, spillDst), true, spilled)
	r := spillRule()
	r.Spill = nil
	base = []snat.Entry{r} // a new base, as the daemon's resolve makes
	table.t = flows(8, spillA, spillDst)
	if changed, _ := s.sample(base); !changed || len(s.withSpill(base)) != 1 {
		t.Errorf("a rule that no longer spills kept its spill: %v", s.withSpill(base))
	}
}

// TestSpillSeed: a daemon that starts takes the spill entries installed as
// busy tuples, so a tuple between the thresholds keeps its spill, and one
// that cooled ends it.
func TestSpillSeed(t *testing.T) {
	for _, tc := range []struct {
		flows int
		want  int
	}{{6, 1}, {4, 0}} {
		var log bytes.Buffer
		s := spiller{flows: flows(tc.flows, spillA, spillDst), log: slog.New(slog.NewTextHandler(&log, nil))}
		base := []snat.Entry{spillRule()}
		installed := []snat.Entry{spillRule(), snat.SpillEntry(spillRule(), spillDst.Addr(), "tcp", spillDst.Port(), []netip.Addr{spillB})}
		s.seed(installed, base)
		s.tick(base)
		if got := len(s.withSpill(base)) - 1; got != tc.want {
			t.Errorf("%d of 10 at start with a spill installed: %d spill entries; want %d\nlog:\n%s", tc.flows, got, tc.want, log.String())
		}
	}
}

// TestSpillIndex: a flow finds the first spill rule in chain order that
// takes it, among many: the longest destination of its sender, a --from
// sender's before the host's, only a rule whose list has the flow's
// address, and none for a natural source of no rule.
func TestSpillIndex(t *testing.T) {
	var base []snat.Entry
	for i := range 1000 {
		e := spillRule()
		e.Dst = netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 51, byte(100 + i/250), byte(i % 250)}), 32)
		base = append(base, e)
	}
	wide := spillRule()
	other := spillRule()
	other.Dst = netip.MustParsePrefix("203.0.113.0/25")
	other.Spill = []netip.Addr{netip.MustParseAddr("192.0.2.30"), netip.MustParseAddr("192.0.2.31")}
	fwd := spillRule()
	fwd.Sender, fwd.Natural = snat.From(netip.MustParsePrefix("10.77.0.0/24")), netip.Addr{}
	base = append(base, wide, other, fwd)
	x := spillRules(base)
	for _, tc := range []struct {
		src, dst, to string
		want         string
	}{
		{"192.0.2.2", "198.51.101.7", "192.0.2.22", "198.51.101.7/32"},
		{"192.0.2.2", "203.0.113.9", "192.0.2.23", "203.0.113.0/24"},
		{"192.0.2.2", "203.0.113.9", "192.0.2.30", "203.0.113.0/25"},
		{"192.0.2.2", "203.0.113.200", "192.0.2.30", ""},
		{"10.77.0.5", "203.0.113.9", "192.0.2.22", "from 10.77.0.0/24 to 203.0.113.0/24"},
		{"192.0.2.99", "198.51.101.7", "192.0.2.22", ""},
		{"192.0.2.2", "198.51.101.7", "192.0.2.99", ""},
	} {
		r := x.find(netip.MustParseAddr(tc.src), netip.MustParseAddr(tc.dst), netip.MustParseAddr(tc.to))
		got := ""
		if r != nil {
			got = r.Match.String()
		}
		if got != tc.want {
			t.Errorf("flow %s -> %s as %s: rule %q; want %q", tc.src, tc.dst, tc.to, got, tc.want)
		}
	}
}
