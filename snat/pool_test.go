package snat

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/selector"
)

// poolHost is oneNIC with IPv6 (natural source 2001:db8::250 on eth0) and
// what PrefixUse answers.
type poolHost struct {
	oneNIC
	use selector.PrefixUse
}

func (r poolHost) Path(dst netip.Prefix, out string) (string, netip.Addr, netip.Addr, error) {
	if dst.Addr().Is6() {
		return "eth0", addr("2001:db8::1"), addr("2001:db8::250"), nil
	}
	return r.oneNIC.Path(dst, out)
}

func (r poolHost) PrefixUse(netip.Prefix, func(int) bool) (selector.PrefixUse, error) {
	return r.use, nil
}

func TestCheckPool(t *testing.T) {
	for _, ok := range []string{"2001:db8:1::/64", "2001:db8:1::/80", "2001:db8:1::/124"} {
		if err := CheckPool(pfx(ok)); err != nil {
			t.Errorf("CheckPool(%s): %v", ok, err)
		}
	}
	for p, want := range map[string]string{
		"2001:db8::/63":      "larger than a /64",
		"2001:db8:1::/125":   "smaller than a /124",
		"192.0.2.0/28":       "IPv6",
		"2001:db8:1::1/64":   "host bits",
		"2001:db8:1::/128":   "smaller",
		"2001:db8:1:2::/127": "smaller",
	} {
		err := CheckPool(netip.MustParsePrefix(p))
		var inv *InvalidError
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), strings.Split(p, "/")[0][:8]) || !errors.As(err, &inv) {
			t.Errorf("CheckPool(%s): %v, want bad input naming it and %q", p, err, want)
		}
	}
}

func TestResolvePool(t *testing.T) {
	pool := pfx("2001:db8:1::/64")
	in := Intent{Dst: pfx("::/0"), Pool: pool}
	got, err := Resolve(poolHost{}, []Intent{in})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Pool != pool || got[0].Sticky != StickyConnection || len(got[0].To) != 0 || got[0].Natural != addr("2001:db8::250") || got[0].Keep() || !got[0].IsPool() {
		t.Fatalf("resolved %+v, want a pool per connection from the natural source", got)
	}
	if s := got[0].ToString(); s != "pool 2001:db8:1::/64 (per connection)" {
		t.Errorf("ToString %q", s)
	}
	if !got[0].Sources(addr("2001:db8:1::abcd")) || got[0].Sources(addr("2001:db8:1::")) || got[0].Sources(addr("2001:db8:2::1")) {
		t.Error("Sources: wrong")
	}

	refused := []struct {
		name string
		host poolHost
		in   Intent
		want []string
	}{
		{"an IPv4 destination", poolHost{}, Intent{Dst: pfx("198.51.100.0/24"), Pool: pool}, []string{"2001:db8:1::/64", "198.51.100.0/24", "families"}},
		{"larger than a /64", poolHost{}, Intent{Dst: pfx("::/0"), Pool: netip.MustParsePrefix("2001:db8::/48")}, []string{"2001:db8::/48", "larger"}},
		{"method route", poolHost{}, Intent{Dst: pfx("::/0"), Pool: pool, Method: MethodRoute}, []string{"method snat"}},
		{"an address of the host inside", poolHost{use: selector.PrefixUse{Addrs: []selector.PrefixAddr{{Addr: netip.MustParsePrefix("2001:db8:1::5/64"), Iface: "eth1"}}}},
			Intent{Dst: pfx("::/0"), Pool: pool}, []string{"2001:db8:1::5", "eth1", "collide"}},
		{"on-link without proxying", poolHost{use: selector.PrefixUse{OnLink: []selector.OnLinkRoute{{Route: pool, Iface: "eth1", Table: 254}}}},
			Intent{Dst: pfx("::/0"), Pool: pool}, []string{"on-link on eth1", "proxy_ndp", "route the prefix to this host"}},
		{"addresses and a pool", poolHost{}, Intent{Dst: pfx("::/0"), Pool: pool, To: []netip.Addr{addr("2001:db8:1::1")}}, []string{"2001:db8:1::1", "not both"}},
		{"a pool and --spread", poolHost{}, Intent{Dst: pfx("::/0"), Pool: pool, Spread: true}, []string{"--spread"}},
		{"a stickiness unknown", poolHost{}, Intent{Dst: pfx("::/0"), Pool: pool, Sticky: "hourly"}, []string{`"hourly"`, "period"}},
		{"a period's address outside", poolHost{}, Intent{Dst: pfx("::/0"), Pool: pool, Sticky: StickyPeriod, To: []netip.Addr{addr("2001:db8:2::1")}}, []string{"2001:db8:2::1", "not an address of pool 2001:db8:1::/64"}},
		{"a period's zero address", poolHost{}, Intent{Dst: pfx("::/0"), Pool: pool, Sticky: StickyPeriod, To: []netip.Addr{addr("2001:db8:1::")}}, []string{"2001:db8:1::", "not an address of pool"}},
		{"a period of two addresses", poolHost{}, Intent{Dst: pfx("::/0"), Pool: pool, Sticky: StickyPeriod, To: []netip.Addr{addr("2001:db8:1::1"), addr("2001:db8:1::2")}}, []string{"not both"}},
	}
	for _, tt := range refused {
		_, err := Resolve(tt.host, []Intent{tt.in})
		var inv *InvalidError
		if err == nil || !errors.As(err, &inv) {
			t.Errorf("%s: %v, want bad input", tt.name, err)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q, want it to name %q", tt.name, err, w)
			}
		}
	}
	// Neighbour proxying on: the on-link prefix is the operator's to answer for.
	proxied := poolHost{use: selector.PrefixUse{OnLink: []selector.OnLinkRoute{{Route: pool, Iface: "eth1", Table: 254, ProxyNDP: true}}}}
	if _, err := Resolve(proxied, []Intent{in}); err != nil {
		t.Errorf("on-link with proxy_ndp: %v", err)
	}
}

// TestPoolIntentsOf: an installed pool turns back into the intent that
// resolves to it, as check does.
func TestPoolIntentsOf(t *testing.T) {
	e := Entry{Match: Match{Dst: pfx("2001:db8:ffff::/48"), Out: "eth0"}, Natural: addr("2001:db8::250"), Pool: pfx("2001:db8:1::/64"), Sticky: StickyDestination}
	got, err := Resolve(poolHost{}, IntentsOf([]Entry{e}))
	if err != nil || len(got) != 1 || !got[0].Equal(e) {
		t.Errorf("re-resolved %+v, %v; want %+v", got, err, e)
	}
}

// TestPeriod: a period's entry keeps the address installed for its sender
// and pool, one address for all its destinations, and takes a new one
// only when none is installed or its intent brings one (rotate's).
func TestPeriod(t *testing.T) {
	pool := pfx("2001:db8:1::/64")
	rng := rand.New(rand.NewPCG(1, 2))
	resolve := func(ins ...Intent) []Entry {
		t.Helper()
		got, err := Resolve(poolHost{}, ins)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	a, b := Intent{Dst: pfx("2001:db8:ff::/48"), Pool: pool, Sticky: StickyPeriod}, Intent{Dst: pfx("2001:db8:fe::/48"), Pool: pool, Sticky: StickyPeriod}
	fresh := settlePeriods(nil, resolve(a, b), rng)
	if len(fresh) != 2 || len(fresh[0].To) != 1 || !InPool(pool, fresh[0].To[0]) || !slices.Equal(fresh[0].To, fresh[1].To) {
		t.Fatalf("fresh period %v: want one address of the pool for both", fresh)
	}
	if s := fresh[0].ToString(); s != "pool 2001:db8:1::/64 (per period: "+fresh[0].To[0].String()+")" {
		t.Errorf("ToString %q", s)
	}
	// Named again (set, apply, a repair): the installed address stays.
	again := settlePeriods(fresh, resolve(a, b), rng)
	if !slices.EqualFunc(again, fresh, Entry.Equal) {
		t.Errorf("named again: %v, want the installed %v", again, fresh)
	}
	// Checked: the installed entry resolves back to itself.
	back := resolve(IntentsOf(fresh)...)
	if !slices.EqualFunc(back, fresh, Entry.Equal) {
		t.Errorf("IntentsOf resolved to %v, want %v", back, fresh)
	}
	// Rotated: the intent brings the new address, and it wins.
	next := RandomPoolAddr(pool, fresh[0].To[0], rng)
	if next == fresh[0].To[0] || !InPool(pool, next) {
		t.Fatalf("RandomPoolAddr gave %s (avoiding %s)", next, fresh[0].To[0])
	}
	ra := a
	ra.To = []netip.Addr{next}
	rotated := settlePeriods(fresh, resolve(ra), rng)
	if rotated[0].To[0] != next {
		t.Errorf("rotated to %v, want %s", rotated[0].To, next)
	}
	// Another sender's period of the same pool is its own.
	other := Intent{Sender: From(pfx("2001:db8:99::/64")), Dst: a.Dst, Pool: pool, Sticky: StickyPeriod}
	mixed := settlePeriods(fresh, resolve(a, other), rng)
	for _, e := range mixed {
		if e.Sender.Kind == SenderHost && e.To[0] != fresh[0].To[0] || e.Sender.Kind == SenderFrom && e.To[0] == fresh[0].To[0] {
			t.Errorf("mixed senders: %v", mixed)
		}
	}
	// KeepPeriods: the first known list with an address wins; none
	// leaves the entry without (MakePlan gives one).
	kept := KeepPeriods(resolve(a), rotated, fresh)
	if kept[0].To[0] != next {
		t.Errorf("KeepPeriods took %v, want the first list's %s", kept[0].To, next)
	}
	if none := KeepPeriods(resolve(a)); len(none[0].To) != 0 {
		t.Errorf("KeepPeriods with nothing known gave %v", none[0].To)
	}
	// A /124's addresses are 1 to 15, all reached.
	small := pfx("2001:db8:1::/124")
	seen := map[netip.Addr]bool{}
	for range 2000 {
		x := RandomPoolAddr(small, netip.Addr{}, rng)
		if !InPool(small, x) {
			t.Fatalf("%s outside %s", x, small)
		}
		seen[x] = true
	}
	if len(seen) != 15 {
		t.Errorf("a /124 gave %d addresses, want 15", len(seen))
	}
}

// TestPeriodRotation: a rotate moves every destination of the sender's
// period to one new address, a --dst given joins them, and another
// sender's period stays.
func TestPeriodRotation(t *testing.T) {
	pool := pfx("2001:db8:1::/64")
	old := addr("2001:db8:1::5")
	other := From(pfx("2001:db8:99::/64"))
	period := func(s Sender, dst string) Entry {
		return Entry{Match: Match{Sender: s, Dst: pfx(dst), Out: "eth0"}, Natural: addr("2001:db8::250"), Pool: pool, Sticky: StickyPeriod, To: []netip.Addr{old}}
	}
	st := &State{entries: []Entry{period(Host(), "2001:db8:fe::/48"), period(Host(), "2001:db8:ff::/48"), period(other, "2001:db8:ff::/48")}, entriesMade: true}
	rng := rand.New(rand.NewPCG(3, 4))
	moves, intents, err := PlanPeriodRotation(poolHost{}, st, pool, []Sender{Host()}, []netip.Prefix{pfx("2001:db8:ff::/48"), pfx("2001:db8:fd::/48")}, "", rng)
	if err != nil {
		t.Fatal(err)
	}
	var dsts []string
	for i, m := range moves {
		dsts = append(dsts, m.Match.Dst.String())
		if m.To != moves[0].To || m.To == old || !InPool(pool, m.To) || m.Pool != pool || intents[i].To[0] != m.To || intents[i].Sticky != StickyPeriod || intents[i].Sender != Host() {
			t.Errorf("move %+v, intent %+v: want every one to one new address of the pool, the host's", m, intents[i])
		}
	}
	if want := []string{"2001:db8:fe::/48", "2001:db8:ff::/48", "2001:db8:fd::/48"}; !slices.Equal(dsts, want) {
		t.Errorf("moved %v, want the period's two destinations and the --dst that joins them: %v", dsts, want)
	}
	if moves[0].From != old || moves[2].From == old {
		t.Errorf("moves from %s and %s: want the period's %s, then none of it", moves[0].From, moves[2].From, old)
	}
	if _, _, err := PlanPeriodRotation(poolHost{}, st, pfx("2001:db8:1::/48"), []Sender{Host()}, nil, "", rng); err == nil || !strings.Contains(err.Error(), "2001:db8:1::/48") {
		t.Errorf("a prefix that is no pool: %v, want it named", err)
	}
}
