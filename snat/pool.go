package snat

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
)

// A pool is a whole IPv6 prefix (--to 2001:db8:1::/64, /64 to /124) that
// new connections take their source from, in the kernel, for every
// application: none of its addresses is on the host. The upstream router
// routes the prefix to the host; egress-snat installs the prefix as an
// AnyIP local route of its own (package routes), so that whatever comes
// to an address of it ends here instead of going back upstream.
// (Replies to translated connections do not need the route: conntrack
// translates them back before routing. A packet that is no connection's,
// a late one or a probe of an unused address, would otherwise bounce
// between the host and its router until its hop limit runs out.)
//
// Which address a connection gets is the pool's stickiness:
//
//	connection   a random address for each new connection
//	destination  the same address for the same sender and destination
//	sender       the same address for the same sender (a --from client's
//	             address; the host's own traffic, one natural source, is
//	             one sender)
//	period       one address for every connection of the sender, until the
//	             next rotate (the cron case)
//
// For the first three the kernel picks the address (see the backends: an
// SNAT range, or nftables' numgen and jhash), so nothing of a pool is kept
// but its rule. A period's address is egress-snat's choice, written into
// the rule (To holds it, one address) and read back from it with the pool
// it belongs to: see settlePeriods for when it changes.
//
// The zero address of the prefix (the subnet-router anycast address) is
// never used: a pool's addresses are prefix::1 to its last.

// Sticky is a pool's stickiness: which connections share an address.
type Sticky string

const (
	StickyConnection  Sticky = "connection"
	StickyDestination Sticky = "destination"
	StickySender      Sticky = "sender"
	StickyPeriod      Sticky = "period"
)

// Stickies lists them in the order help names them.
var Stickies = []Sticky{StickyConnection, StickyDestination, StickySender, StickyPeriod}

// ParseSticky reads --sticky and sticky:; "" is the default, connection.
func ParseSticky(s string) (Sticky, error) {
	if s == "" {
		return StickyConnection, nil
	}
	for _, k := range Stickies {
		if string(k) == s {
			return k, nil
		}
	}
	return "", Invalid("sticky %q: want connection, destination, sender or period", s)
}

// Describe says what the stickiness does, for people: "a random address
// for each new connection".
func (s Sticky) Describe() string {
	switch s {
	case StickyDestination:
		return "the same address for the same sender and destination"
	case StickySender:
		return "the same address for each sender"
	case StickyPeriod:
		return "one address for all connections until the next rotate"
	}
	return "a random address for each new connection"
}

// Pool prefix lengths.
const (
	// PoolMinBits is the largest pool, a /64: a routed /64 is what
	// providers hand out, and a larger one is a mistake more often than
	// a wish (and the kernel's SNAT ranges reach 64 bits at most).
	PoolMinBits = 64
	// PoolMaxBits is the smallest pool, a /124 (15 addresses): below,
	// list the addresses and spread over them.
	PoolMaxBits = 124
)

// CheckPool refuses a prefix that cannot be a pool, naming it: IPv6, /64
// to /124, without host bits.
func CheckPool(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return Invalid("pool %s is not a valid prefix", p)
	case p.Addr().Is4() || p.Addr().Is4In6():
		return Invalid("pool %s: a pool is an IPv6 prefix (for IPv4, list the addresses and --spread over them)", p)
	case p.Addr().Zone() != "":
		return Invalid("pool %s: a prefix has no zone", p)
	case p.Masked() != p:
		return Invalid("pool %s has host bits set; did you mean %s?", p, p.Masked())
	case p.Bits() < PoolMinBits:
		return Invalid("pool %s is larger than a /%d: take a /%d of it", p, PoolMinBits, PoolMinBits)
	case p.Bits() > PoolMaxBits:
		return Invalid("pool %s is smaller than a /%d: list its addresses with --spread instead", p, PoolMaxBits)
	}
	return nil
}

// InPool reports whether a is an address of pool p: inside it, and not its
// zero address.
func InPool(p netip.Prefix, a netip.Addr) bool {
	return p.IsValid() && p.Contains(a) && a != p.Addr()
}

// PoolAddr is the address at offset off of p: p's address with off in its
// host bits (off must fit in them).
func PoolAddr(p netip.Prefix, off uint64) netip.Addr {
	b := p.Addr().As16()
	hi := binary.BigEndian.Uint64(b[8:])
	binary.BigEndian.PutUint64(b[8:], hi|off)
	return netip.AddrFrom16(b)
}

// poolString renders a pool entry's source: "pool 2001:db8:1::/64 (per
// connection)", or with a period's address "pool 2001:db8:1::/64 (per
// period: 2001:db8:1::5)".
func poolString(p netip.Prefix, s Sticky, to []netip.Addr) string {
	if len(to) == 1 {
		return fmt.Sprintf("pool %s (per %s: %s)", p, s, to[0])
	}
	return fmt.Sprintf("pool %s (per %s)", p, s)
}

// RandomPoolAddr is an address of p chosen by rng, never its zero address
// and never avoid (the address a rotate moves away from), unless p has no
// other.
func RandomPoolAddr(p netip.Prefix, avoid netip.Addr, rng *rand.Rand) netip.Addr {
	h := 128 - p.Bits()
	last := ^uint64(0)
	if h < 64 {
		last = 1<<h - 1
	}
	for {
		a := PoolAddr(p, rng.Uint64N(last)+1) // 1 to last
		if a != avoid || last == 1 {
			return a
		}
	}
}

// settlePeriods gives each period entry of desired without an address the
// one its sender's period entry of the same pool has in installed, or else
// a new address of the pool chosen by rng, shared by all its sender's
// entries of that pool (one rule, or one set, instead of one per
// destination). So a set, apply or drift repair that names the pool again
// keeps the period's address, and only a rotate (whose entries come with
// their new address) or a lost rule starts a new period. desired is not
// changed: the entries are copied when one needs an address.
func settlePeriods(installed, desired []Entry, rng *rand.Rand) []Entry {
	return fillPeriods(desired, [][]Entry{installed}, rng)
}

// KeepPeriods gives each period entry of desired without an address the
// one its sender's period entry of the same pool has in the first of
// known that has one: a daemon passes what is installed, then what it
// wrote last, so that a rule lost behind its back comes back with its
// period's address. Entries it finds none for are left without (MakePlan
// gives them a new one).
func KeepPeriods(desired []Entry, known ...[]Entry) []Entry {
	return fillPeriods(desired, known, nil)
}

// fillPeriods is settlePeriods and KeepPeriods: from known in order, then
// from rng when it is not nil.
func fillPeriods(desired []Entry, known [][]Entry, rng *rand.Rand) []Entry {
	need := slices.IndexFunc(desired, func(e Entry) bool { return e.Sticky == StickyPeriod && len(e.To) == 0 })
	if need < 0 {
		return desired
	}
	type period struct {
		Sender Sender
		Pool   netip.Prefix
	}
	now := map[period][]netip.Addr{}
	for _, es := range append([][]Entry{desired}, known...) {
		for _, e := range es {
			k := period{e.Sender, e.Pool}
			if _, ok := e.PeriodAddr(); ok && now[k] == nil {
				now[k] = e.To
			}
		}
	}
	out := slices.Clone(desired)
	for i := need; i < len(out); i++ {
		e := &out[i]
		if e.Sticky != StickyPeriod || len(e.To) > 0 {
			continue
		}
		k := period{e.Sender, e.Pool}
		if now[k] == nil && rng != nil {
			now[k] = []netip.Addr{RandomPoolAddr(e.Pool, netip.Addr{}, rng)}
		}
		e.To = now[k]
	}
	return out
}

// IsPoolSyntax reports whether a source as given (--to, to:) is a prefix,
// a pool, rather than an address.
func IsPoolSyntax(s string) bool { return strings.Contains(s, "/") }

// ParsePool reads a pool as given (--to 2001:db8:1::/64, to:) and checks
// it with CheckPool.
func ParsePool(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		return netip.Prefix{}, Invalid("pool %q is not an IPv6 prefix such as 2001:db8:1::/64", s)
	}
	return p, CheckPool(p)
}
