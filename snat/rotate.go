package snat

import (
	"math/rand/v2"
	"net/netip"
	"slices"
)

// Order is how rotate picks the next pool member.
type Order string

const (
	OrderNext   Order = "next"
	OrderRandom Order = "random"
)

// NextSource picks the address to move to from current (the address new
// connections leave with now: the rule's, or the natural source when there
// is no rule). usable says which pool members are on the host now.
//
// With OrderNext it is the first usable member after current in pool order,
// wrapping around; when current is not in the pool, the first usable member.
// With OrderRandom it is a usable member other than current, chosen by rng.
// When current is the only usable member it stays. It reports false when no
// member is usable.
func NextSource(pool []netip.Addr, current netip.Addr, usable func(netip.Addr) bool, order Order, rng *rand.Rand) (netip.Addr, bool) {
	var ok []netip.Addr
	for _, a := range pool {
		if usable(a) {
			ok = append(ok, a)
		}
	}
	if len(ok) == 0 {
		return netip.Addr{}, false
	}
	if order == OrderRandom {
		others := slices.DeleteFunc(slices.Clone(ok), func(a netip.Addr) bool { return a == current })
		if len(others) == 0 {
			return current, true
		}
		return others[rng.IntN(len(others))], true
	}
	i := slices.Index(pool, current)
	if i < 0 {
		return ok[0], true
	}
	for step := 1; step <= len(pool); step++ {
		if a := pool[(i+step)%len(pool)]; usable(a) {
			return a, true
		}
	}
	return current, true
}

// Current returns the address new connections to exactly dst leave with
// according to the installed entries: the managed entry's first source, or
// natural when dst has no entry of its own.
func Current(installed []Entry, dst netip.Prefix, natural netip.Addr) netip.Addr {
	for _, e := range installed {
		if e.Dst == dst && !e.Keep() {
			return e.To[0]
		}
	}
	return natural
}
