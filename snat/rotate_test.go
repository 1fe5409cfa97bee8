package snat

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

func TestNextSource(t *testing.T) {
	a, b, c := addr("192.0.2.21"), addr("192.0.2.22"), addr("192.0.2.23")
	natural := addr("192.0.2.250")
	pool := []netip.Addr{a, b, c}
	all := func(netip.Addr) bool { return true }
	notB := func(x netip.Addr) bool { return x != b }
	none := func(netip.Addr) bool { return false }
	tests := []struct {
		name    string
		current netip.Addr
		usable  func(netip.Addr) bool
		want    netip.Addr
		ok      bool
	}{
		{"first call uses the first member", natural, all, a, true},
		{"next after a", a, all, b, true},
		{"wraps around", c, all, a, true},
		{"skips a member gone from the host", a, notB, c, true},
		{"first usable when current is outside the pool", natural, func(x netip.Addr) bool { return x == c }, c, true},
		{"no usable member", a, none, netip.Addr{}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := NextSource(pool, tc.current, tc.usable, OrderNext, nil)
			if got != tc.want || ok != tc.ok {
				t.Errorf("NextSource(current %s) = %s, %v; want %s, %v", tc.current, got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestNextSourceRandomNeverRepeats(t *testing.T) {
	pool := []netip.Addr{addr("192.0.2.21"), addr("192.0.2.22"), addr("192.0.2.23")}
	rng := rand.New(rand.NewPCG(7, 7))
	cur := pool[0]
	seen := map[netip.Addr]int{}
	for range 300 {
		next, ok := NextSource(pool, cur, func(netip.Addr) bool { return true }, OrderRandom, rng)
		if !ok || next == cur {
			t.Fatalf("random order picked %s after %s", next, cur)
		}
		seen[next]++
		cur = next
	}
	for _, a := range pool {
		if seen[a] < 50 {
			t.Errorf("%s picked %d times of 300: not random enough (%v)", a, seen[a], seen)
		}
	}
	if next, ok := NextSource(pool, pool[1], func(x netip.Addr) bool { return x == pool[1] }, OrderRandom, rng); !ok || next != pool[1] {
		t.Errorf("single usable member: got %s, %v; want it to stay", next, ok)
	}
}
