package iptables

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

func poolEntry(dst, pool string, s snat.Sticky) snat.Entry {
	e := entry(dst, "2001:db8::250")
	e.Pool, e.Sticky = pfx(pool), s
	return e
}

// period is a period's entry of pool: its address at.
func period(dst, pool, at string) snat.Entry {
	e := poolEntry(dst, pool, snat.StickyPeriod)
	e.To = []netip.Addr{addr(at)}
	return e
}

// TestPoolRules: a pool is one --to-source range (--persistent per
// sender), or 16 slices taken by turns per connection; the /64 range ends
// one 2^32nd short of the prefix (the kernel's overflow, pool.go).
func TestPoolRules(t *testing.T) {
	tests := []struct {
		pool   string
		sticky snat.Sticky
		want   []string // the rules' tails from -j
	}{
		{"2001:db8:1::/64", snat.StickyDestination, []string{"-j SNAT --to-source 2001:db8:1::1-2001:db8:1:0:ffff:fffe:ffff:ffff --random"}},
		{"2001:db8:1::/64", snat.StickySender, []string{"-j SNAT --to-source 2001:db8:1::1-2001:db8:1:0:ffff:fffe:ffff:ffff --random --persistent"}},
		{"2001:db8:1::/112", snat.StickyDestination, []string{"-j SNAT --to-source 2001:db8:1::1-2001:db8:1::ffff --random"}},
		{"2001:db8:1::/64", snat.StickyPeriod, []string{`-m comment --comment egress-snat pool 2001:db8:1::/64 per period -j SNAT --to-source 2001:db8:1::abcd:1`}},
		{"2001:db8:1::/64", snat.StickyConnection, []string{
			"--every 16 --packet 0 -j SNAT --to-source 2001:db8:1::1-2001:db8:1:0:fff:ffff:ffff:ffff --random",
			"--every 15 --packet 0 -j SNAT --to-source 2001:db8:1:0:1000::-2001:db8:1:0:1fff:ffff:ffff:ffff --random",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.pool+" "+string(tt.sticky), func(t *testing.T) {
			e := poolEntry("2001:db8:ffff::/48", tt.pool, tt.sticky)
			if tt.sticky == snat.StickyPeriod {
				e.To = []netip.Addr{addr("2001:db8:1::abcd:1")}
			}
			c := Render(snat.IPv6, []snat.Entry{e})
			var got []string
			for _, r := range c.Rules {
				got = append(got, r.String())
			}
			n := len(tt.want)
			if tt.sticky == snat.StickyConnection {
				n = 16
			}
			if len(got) != n {
				t.Fatalf("%d rules, want %d:\n%s", len(got), n, strings.Join(got, "\n"))
			}
			for i, w := range tt.want {
				if !strings.HasSuffix(got[i], w) {
					t.Errorf("rule %d: %s\nwant it to end %s", i+1, got[i], w)
				}
			}
		})
	}
	// A /124 per connection: its first sixteenth is the zero address
	// alone, never used: 15 rules of one address each.
	c := Render(snat.IPv6, []snat.Entry{poolEntry("2001:db8:ffff::/48", "2001:db8:1::/124", snat.StickyConnection)})
	if len(c.Rules) != 15 || c.Rules[0].ToSource != addr("2001:db8:1::1") || c.Rules[14].ToLast != addr("2001:db8:1::f") {
		t.Errorf("/124 per connection: %v", c.Args())
	}
}

// TestPoolsReadBack: every pool shape reads back as its entry, through a
// set too, so a re-plan is empty; a range that is no pool's is foreign.
func TestPoolsReadBack(t *testing.T) {
	m, ft, _ := newFakeManager()
	var want []snat.Entry
	for i, s := range []snat.Sticky{snat.StickyConnection, snat.StickyDestination, snat.StickySender} {
		for j, pool := range []string{"2001:db8:1::/64", "2001:db8:2::/100", "2001:db8:3::/124"} {
			want = append(want, poolEntry(fmt.Sprintf("2001:db8:ff%d%d::/48", i, j), pool, s))
		}
	}
	for i := range 9 { // enough for a set
		want = append(want, poolEntry(fmt.Sprintf("2001:db8:fe%02d::/48", i), "2001:db8:1::/64", snat.StickyDestination))
	}
	// A period's rule, alone and through a set: one address of its pool,
	// the pool in its comment.
	for i := range 9 {
		e := poolEntry(fmt.Sprintf("2001:db8:fd%02d::/48", i), "2001:db8:4::/64", snat.StickyPeriod)
		e.To = []netip.Addr{addr("2001:db8:4::abcd:1")}
		want = append(want, e)
	}
	single := poolEntry("2001:db8:fc00::/48", "2001:db8:5::/112", snat.StickyPeriod)
	single.To = []netip.Addr{addr("2001:db8:5::7")}
	want = append(want, single)
	snat.SortEntries(want)
	update(t, m, func(*snat.State) []snat.Entry { return want })
	st, err := m.Read()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, st.Entries(), cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("read back (-want +got):\n%s", diff)
	}
	if len(snapshot(st).Installed[snat.IPv6].SetNames) != 2 {
		t.Errorf("9 destinations of one pool, 9 of one period: sets %v, want 2", snapshot(st).Installed[snat.IPv6].SetNames)
	}
	if p := m.MakePlan(st, want); !p.Empty() {
		t.Errorf("re-plan is not empty: %v", p.Changes)
	}
	// The pools' local routes are ours.
	rs, _ := m.Routing.Read(false)
	var local []string
	for _, r := range rs.Routes {
		if r.Local {
			local = append(local, r.String())
		}
	}
	if diff := cmp.Diff([]string{
		"local 2001:db8:3::/124 dev lo table 7420 proto 83",
		"local 2001:db8:5::/112 dev lo table 7420 proto 83",
		"local 2001:db8:2::/100 dev lo table 7420 proto 83",
		"local 2001:db8:1::/64 dev lo table 7420 proto 83",
		"local 2001:db8:4::/64 dev lo table 7420 proto 83",
	}, local); diff != "" {
		t.Errorf("local routes (-want +got):\n%s", diff)
	}
	if !containsRule(rs.Rules, routes.PrioDestinations) {
		t.Errorf("rules %v: no rule %d sends lookups to table %d", rs.Rules, routes.PrioDestinations, routes.Table)
	}

	// A range cut otherwise is not ours.
	in, err := ParseSave(snat.IPv6, "*nat\n:EGRESS-SNAT - [0:0]\n-A EGRESS-SNAT -s 2001:db8::250/128 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 2001:db8:1::1-2001:db8:1::5 --random\nCOMMIT\n", nil)
	if err != nil || len(in.Foreign) != 1 || len(in.Entries) != 0 {
		t.Errorf("a range of no pool: entries %v, foreign %v, %v", in.Entries, in.Foreign, err)
	}
	// A pool's range without --random is not ours either: the kernel
	// would reuse addresses across destinations (pool.go).
	in, err = ParseSave(snat.IPv6, "*nat\n:EGRESS-SNAT - [0:0]\n-A EGRESS-SNAT -s 2001:db8::250/128 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 2001:db8:1::1-2001:db8:1::ffff\nCOMMIT\n", nil)
	if err != nil || len(in.Foreign) != 1 || len(in.Entries) != 0 {
		t.Errorf("a range without --random: entries %v, foreign %v, %v", in.Entries, in.Foreign, err)
	}
	// A period's comment on a rule that is not SNAT to one address of
	// its pool is not ours.
	for _, rule := range []string{
		`-s 2001:db8::250/128 -o eth0 -m comment --comment "egress-snat pool 2001:db8:4::/64 per period" -j SNAT --to-source 2001:db8:9::1`,
		`-s 2001:db8::250/128 -o eth0 -m comment --comment "egress-snat pool 2001:db8:4::/64 per period" -j SNAT --to-source 2001:db8:4::`,
		`-s 2001:db8::250/128 -o eth0 -m comment --comment "egress-snat pool 2001:db8:4::/64 per period" -j RETURN`,
		`-s 2001:db8::250/128 -o eth0 -m comment --comment "egress-snat pool 2001:db8:4::/48 per period" -j SNAT --to-source 2001:db8:4::1`,
	} {
		in, err = ParseSave(snat.IPv6, "*nat\n:EGRESS-SNAT - [0:0]\n-A EGRESS-SNAT "+rule+"\nCOMMIT\n", nil)
		if err != nil || len(in.Foreign) != 1 || len(in.Entries) != 0 {
			t.Errorf("%s: entries %v, foreign %v, %v", rule, in.Entries, in.Foreign, err)
		}
	}
	_ = ft
}

func containsRule(rules []routes.IPRule, prio int) bool {
	for _, r := range rules {
		if r.Priority == prio {
			return true
		}
	}
	return false
}
