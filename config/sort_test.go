package config

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// TestSortPrefixes: the packed-integer sort of an IPv4 list orders as the
// comparison sort of any list does, longest prefix first, then address.
func TestSortPrefixes(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	byCompare := func(ps []netip.Prefix) {
		slices.SortFunc(ps, func(a, b netip.Prefix) int {
			if a.Bits() != b.Bits() {
				return b.Bits() - a.Bits()
			}
			return a.Addr().Compare(b.Addr())
		})
	}
	for round := range 50 {
		var ps []netip.Prefix
		for range rng.IntN(300) {
			a := netip.AddrFrom4([4]byte{byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256))})
			p, _ := a.Prefix(rng.IntN(33))
			ps = append(ps, p)
		}
		want := slices.Clone(ps)
		byCompare(want)
		sortPrefixes(ps)
		if !slices.Equal(ps, want) {
			t.Fatalf("round %d: packed sort\n%v\nwant\n%v", round, ps, want)
		}
	}
	mixed := []netip.Prefix{netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("198.51.100.4/32"), netip.MustParsePrefix("2001:db8::1/128")}
	sortPrefixes(mixed)
	if mixed[0].Bits() != 128 || mixed[2].Bits() != 32 || !mixed[1].Addr().Is4() {
		t.Errorf("a mixed list: %v", mixed)
	}
}
