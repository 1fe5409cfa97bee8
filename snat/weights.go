package snat

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Weights of a spread list (--to 192.0.2.22=3,192.0.2.23=1 --spread): new
// connections are shared in that ratio, exactly, by turns. An entry holds
// them in its To as repetition: each address appears as many times as its
// weight (reduced by the weights' greatest common divisor), interleaved,
// so that both backends, which spread over To round-robin (iptables' nth
// statistic, nftables' numgen inc map), give every address its share over
// each cycle of the sum of the weights. Nothing else in an entry changes:
// a weighted entry reads back from the kernel as the same To, and compares
// equal to the one rendered.
//
// An address given with no weight weighs 1. Why repetition rather than a
// weight field: the kernel has no weighted round-robin of its own; the
// statistic match and numgen count connections one by one, so the weight
// can only be expanded into turns, and To is what both backends already
// expand into rules and map elements.

// MaxWeight is the largest weight one address may have.
const MaxWeight = 100

// MaxWeightTurns bounds the sum of a list's weights after reduction: the
// iptables backend writes one rule per turn, the nftables one a map
// element, for each destination group.
const MaxWeightTurns = 256

// ParseWeighted reads one item of a source list: an address, or
// ADDRESS=WEIGHT with a whole weight from 1 to MaxWeight. weighted says an
// explicit weight was given. Errors name the item.
func ParseWeighted(item string) (a netip.Addr, weight int, weighted bool, err error) {
	s, w, weighted := strings.Cut(item, "=")
	s = strings.TrimSpace(s)
	a, perr := netip.ParseAddr(s)
	if perr != nil || a.Zone() != "" {
		return a, 0, false, fmt.Errorf("%s is not an IP address", quoteItem(s))
	}
	if !weighted {
		return a, 1, false, nil
	}
	w = strings.TrimSpace(w)
	n, perr := strconv.Atoi(w)
	switch {
	case perr != nil:
		return a, 0, true, fmt.Errorf("%s: weight %s is not a whole number (want 1 to %d)", quoteItem(item), quoteItem(w), MaxWeight)
	case n < 1 || n > MaxWeight:
		return a, 0, true, fmt.Errorf("%s: weight %d is out of range (want a whole number from 1 to %d)", quoteItem(item), n, MaxWeight)
	}
	return a, n, true, nil
}

// quoteItem quotes what the operator typed for an error message, as
// config.Excerpt does: Go-quoted, on one line, cut to 40 characters.
func quoteItem(s string) string {
	n := 0
	for i := range s {
		if n == 40 {
			return strconv.Quote(s[:i]) + "…"
		}
		n++
	}
	return strconv.Quote(s)
}

// Weigh expands addrs with their weights into the spread order that an
// entry's To holds: the weights divided by their greatest common divisor,
// each address repeated that often, interleaved by smooth weighted
// round-robin (nginx's), so that every window of a cycle is near the
// ratio, not a run of one address. Equal weights give addrs unchanged.
// The addresses must be distinct and the weights positive.
func Weigh(addrs []netip.Addr, weights []int) ([]netip.Addr, error) {
	if len(addrs) != len(weights) {
		return nil, fmt.Errorf("%d addresses and %d weights", len(addrs), len(weights))
	}
	g := 0
	for i, w := range weights {
		if w < 1 {
			return nil, fmt.Errorf("%s: weight %d is not positive", addrs[i], w)
		}
		g = gcd(g, w)
	}
	turns := 0
	reduced := make([]int, len(weights))
	for i, w := range weights {
		reduced[i] = w / g
		turns += reduced[i]
	}
	if turns > MaxWeightTurns {
		return nil, fmt.Errorf("weights %s take %d turns (the weights divided by their greatest common divisor, added up); at most %d: use smaller weights", weightList(addrs, weights), turns, MaxWeightTurns)
	}
	if turns == len(addrs) {
		return slices.Clone(addrs), nil
	}
	out := make([]netip.Addr, 0, turns)
	current := make([]int, len(addrs))
	for range turns {
		best := 0
		for i := range current {
			current[i] += reduced[i]
			if current[i] > current[best] {
				best = i
			}
		}
		current[best] -= turns
		out = append(out, addrs[best])
	}
	return out, nil
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// Weights collapses a To back into its distinct addresses, in the order
// they first appear, and how many turns each has. Weighted reports whether
// any address has more than one.
func Weights(to []netip.Addr) (addrs []netip.Addr, weights []int, weighted bool) {
	for _, a := range to {
		i := slices.Index(addrs, a)
		if i < 0 {
			addrs = append(addrs, a)
			weights = append(weights, 1)
			continue
		}
		weights[i]++
		weighted = true
	}
	return addrs, weights, weighted
}

// weightList renders addresses with weights: "192.0.2.22=3,192.0.2.23=1".
func weightList(addrs []netip.Addr, weights []int) string {
	s := make([]string, len(addrs))
	for i, a := range addrs {
		s[i] = a.String() + "=" + strconv.Itoa(weights[i])
	}
	return strings.Join(s, ",")
}

// ParseSpread reads the items of a spread or failover list (--to, a rule's
// to:): addresses, each named once, each with an optional =WEIGHT. That
// they are of one family is the caller's to check, with its own words. It returns the addresses in To's form (Weigh), and whether any
// weight was given; a weight on a list that is not spread is the caller's
// to refuse (a failover list takes one address at a time). Errors name the
// item at fault.
func ParseSpread(items []string) (to []netip.Addr, weighted bool, err error) {
	var addrs []netip.Addr
	var weights []int
	for _, it := range items {
		a, w, explicit, err := ParseWeighted(it)
		if err != nil {
			return nil, false, err
		}
		if slices.Contains(addrs, a) {
			// One named twice would get twice the share, silently.
			return nil, false, fmt.Errorf("the list names %s twice", a)
		}
		addrs, weights = append(addrs, a), append(weights, w)
		weighted = weighted || explicit
	}
	if len(addrs) == 0 {
		return nil, false, errors.New("no address given")
	}
	to, err = Weigh(addrs, weights)
	return to, weighted, err
}
