package snat

import (
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestDiffSortedAgreesWithMap holds the one-walk diff of sorted lists to
// the map-based one on random pairs of normalized entry lists.
func TestDiffSortedAgreesWithMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	natural := []string{"192.0.2.250", "192.0.2.251"}
	pool := []string{"192.0.2.22", "192.0.2.23", "192.0.2.24"}
	senders := []Sender{Host(), UID(4242), Cgroup("system.slice"), From(pfx("10.77.0.0/16"))}
	random := func() []Entry {
		seen := map[Match]bool{}
		var es []Entry
		for range rng.IntN(40) {
			a := netip.AddrFrom4([4]byte{198, 18, byte(rng.IntN(4)), byte(rng.IntN(8))})
			p, _ := a.Prefix(24 + rng.IntN(9))
			e := senderEntry(senders[rng.IntN(len(senders))], p.String(), natural[rng.IntN(2)], pool[rng.IntN(len(pool))])
			if !seen[e.Match] {
				seen[e.Match] = true
				es = append(es, e)
			}
		}
		return Normalize(es)
	}
	for round := range 500 {
		a, b := random(), random()
		if diff := cmp.Diff(diffByMap(a, b), diffSorted(a, b)); diff != "" {
			t.Fatalf("round %d: the sorted diff differs from the map diff (-map +sorted):\n%s", round, diff)
		}
	}
}
