package iptables

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// A pool (snat's pool.go) is SNAT to a --to-source range. The kernel picks
// an address of a range by hashing the connection's original source and
// destination addresses (nf_nat_core.c, find_best_ips_proto): never its
// ports, whatever --random says (--random and --random-fully pick the
// port). Measured in a lab, 200 connections from one host to one server
// through a /64 range all left from one address, with or without --random;
// to 200 servers, from 197 to 200. With --persistent the hash is of the
// source alone.
//
// But first the kernel reuses the address of a connection it already
// translated from the same source address and port (find_appropriate_src),
// if that address lies in the range: a client's source port used again
// toward another destination kept the old destination's address (measured:
// 3 connections to one destination left from 2 or 3 addresses once earlier
// connections had used their ports). --random skips that step (it is
// NF_NAT_RANGE_PROTO_RANDOM), so every range rule takes it; it also picks
// the source port at random. So:
//
//	destination  one rule, --to-source PREFIX::1-LAST --random
//	sender       the same, --persistent
//	connection   16 rules taking new connections by turns (the nth
//	             statistic, as a spread list), each a sixteenth of the
//	             prefix: a sender talking to one destination gets 16
//	             addresses in turn, and 16 × as many as it has
//	             destinations. The kernel has nothing per connection to
//	             hash (the nftables backend has numgen: every connection
//	             its own address).
//
// One more thing measured: the kernel walks the range 32 bits at a time,
// and a word of the range that spans all of 0-0xffffffff gets a distance
// of 2^32, which its 32-bit arithmetic makes 0: that word of every address
// picked is its minimum. A /64 range (PREFIX::1 to
// PREFIX:ffff:ffff:ffff:ffff) therefore only ever varied its last 32
// bits. Its range ends at PREFIX:ffff:fffe:ffff:ffff instead, one 2^32nd
// short, and all 64 bits vary; the slices of a connection pool span 2^28
// in that word, and need no such care.

// A period (one address of the pool until the next rotate) is one rule,
// SNAT to that address, like any address's. What makes it the pool's is
// its comment, "egress-snat pool 2001:db8:1::/64 per period" instead of
// "egress-snat": without it, it would read back as a rule to an address
// the host does not have.

// periodWords frame a period rule's comment around its pool.
const (
	periodPrefix = Comment + " pool "
	periodSuffix = " per period"
)

// periodComment is the comment of a period's rule for pool p.
func periodComment(p netip.Prefix) string { return periodPrefix + p.String() + periodSuffix }

// parsePeriodComment reads the pool back from a period rule's comment.
func parsePeriodComment(c string) (netip.Prefix, bool) {
	rest, ok := strings.CutPrefix(c, periodPrefix)
	if !ok {
		return netip.Prefix{}, false
	}
	rest, ok = strings.CutSuffix(rest, periodSuffix)
	if !ok {
		return netip.Prefix{}, false
	}
	p, err := netip.ParsePrefix(rest)
	if err != nil || snat.CheckPool(p) != nil {
		return netip.Prefix{}, false
	}
	return p, true
}

// poolSlices is how many rules a pool per connection takes.
const poolSlices = 16

// addrRange is one --to-source range.
type addrRange struct{ lo, hi netip.Addr }

// poolRanges are the --to-source ranges of a pool's rules, in rule order,
// and whether they take --persistent.
func poolRanges(p netip.Prefix, s snat.Sticky) ([]addrRange, bool) {
	h := 128 - p.Bits()
	last := hostMask(h)
	switch s {
	case snat.StickyDestination, snat.StickySender:
		hi := last
		if h == 64 {
			hi = 0xffff_fffe_ffff_ffff // see the comment above: the kernel's overflow
		}
		return []addrRange{{at(p, 1), at(p, hi)}}, s == snat.StickySender
	}
	size := uint64(1) << (h - 4) // h >= 4: a pool is /124 at most
	var out []addrRange
	for i := range uint64(poolSlices) {
		lo, hi := i*size, i*size+size-1
		if lo == 0 {
			lo = 1 // never the zero address
		}
		if lo > hi {
			continue // a /124's first slice is its zero address alone
		}
		out = append(out, addrRange{at(p, lo), at(p, hi)})
	}
	return out, false
}

// hostMask is the largest offset of h host bits.
func hostMask(h int) uint64 {
	if h >= 64 {
		return ^uint64(0)
	}
	return 1<<h - 1
}

// at is the address at offset off in p (as snat.PoolAddr).
func at(p netip.Prefix, off uint64) netip.Addr { return snat.PoolAddr(p, off) }

// poolOf reads a pool back from the ranges of an entry's rules: the
// prefix they cover and the stickiness they give, when they are exactly
// what poolRanges writes for it.
func poolOf(ranges []addrRange, persistent bool) (netip.Prefix, snat.Sticky, bool) {
	if len(ranges) == 0 || !ranges[0].lo.Is6() {
		return netip.Prefix{}, "", false
	}
	lo, hi := ranges[0].lo.As16(), ranges[len(ranges)-1].hi.As16()
	common := 0
	for i := 0; i < 16; i += 8 {
		x := binary.BigEndian.Uint64(lo[i:]) ^ binary.BigEndian.Uint64(hi[i:])
		common += bits.LeadingZeros64(x)
		if x != 0 {
			break
		}
	}
	p, err := ranges[0].lo.Prefix(common)
	if err != nil || snat.CheckPool(p) != nil {
		return netip.Prefix{}, "", false
	}
	sticky := snat.StickyConnection
	if len(ranges) == 1 {
		sticky = snat.StickyDestination
		if persistent {
			sticky = snat.StickySender
		}
	}
	want, wantPersistent := poolRanges(p, sticky)
	if !slices.Equal(want, ranges) || wantPersistent != persistent {
		return netip.Prefix{}, "", false
	}
	return p, sticky, true
}
