package selector

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/routes"
)

// TestRandomTopologiesAgreeWithKernel builds random topologies (interfaces
// with primary and secondary addresses of both families, routes with and
// without src, metrics, unreachable-like and multipath routes, extra tables
// reached by random policy rules, and sometimes egress-snat's own rules)
// and asks, for random destinations, every way the selector can answer
// (the user-space FIB where it applies, kernel lookups only, the explaining
// Lookup, Excluding with its mark, an output interface) what
// `ip route get` says. One selector of each kind answers all destinations
// of a topology in random order, so that what it remembers between
// lookups is put to the test too.
//
// SELECTOR_SEED=n replays one run; the seed is logged.
func TestRandomTopologiesAgreeWithKernel(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("SELECTOR_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("SELECTOR_SEED=%q: %v", v, err)
		}
	}
	t.Logf("seed %d (replay with SELECTOR_SEED=%d)", seed, seed)
	const topologies, destinations = 20, 50
	sc := newScratch(t)
	rng := rand.New(rand.NewPCG(seed, 0x5e1ec7))
	for i := range topologies {
		g := &generator{rng: rng}
		lines := g.topology()
		sc.reset(t)
		sc.addLinks(t, g.links)
		sc.batch(t, lines, false)
		var failures []string
		for _, is4 := range []bool{true, false} {
			failures = append(failures, checkTopology(t, sc, g, is4, destinations)...)
		}
		if len(failures) > 0 {
			if len(failures) > 20 {
				failures = append(failures[:20], fmt.Sprintf("... and %d more", len(failures)-20))
			}
			t.Errorf("seed %d, topology %d: %d disagreements with the kernel:\n%s\n\ntopology:\n%s\ncommands:\n%s",
				seed, i, len(failures), strings.Join(failures, "\n"), sc.dump(t), strings.Join(lines, "\n"))
		}
	}
}

func checkTopology(t *testing.T, sc *scratch, g *generator, is4 bool, n int) []string {
	t.Helper()
	var failures []string
	fail := func(format string, args ...any) { failures = append(failures, fmt.Sprintf(format, args...)) }
	fast, slow, explain := New(sc.nl), netlinkOnly(sc.nl), New(sc.nl)
	excluding := Excluding(sc.nl, routes.LookupMark, routes.Ours)
	mark := []string{"mark", fmt.Sprintf("%#x", routes.LookupMark)}
	for _, dst := range g.destinations(is4, n) {
		k := sc.routeGet(t, dst)
		for _, c := range []struct {
			name string
			s    *Selector
		}{{"Path", fast}, {"Path, kernel lookups only", slow}} {
			iface, gw, src, err := c.s.Path(host(dst), "")
			if d := disagreement(k, iface, gw, src, err); d != "" {
				fail("%s(%s): %s", c.name, dst, d)
			}
		}
		if c, err := explain.Lookup(host(dst), ""); err != nil {
			if d := disagreement(k, "", netip.Addr{}, netip.Addr{}, err); d != "" {
				fail("Lookup(%s): %s", dst, d)
			}
		} else if d := disagreement(k, c.Interface, c.Gateway, c.Source, nil); d != "" {
			fail("Lookup(%s): %s", dst, d)
		}
		km := sc.routeGet(t, dst, mark...)
		iface, gw, src, err := excluding.Path(host(dst), "")
		if d := disagreement(km, iface, gw, src, err); d != "" {
			fail("Excluding.Path(%s) vs ip route get %s mark: %s", dst, dst, d)
		}

		// With an output interface the selector answers only for routes
		// that leave by it (the kernel, asked with oif, would otherwise
		// assume the destination is on-link there).
		out := fmt.Sprintf("d%d", g.rng.IntN(g.links))
		fm := sc.routeGet(t, dst, "fibmatch", "oif", out)
		ko := kernelAnswer{Err: "no route leaves by " + out + ": " + fm.Err}
		if fm.Err == "" {
			ko = sc.routeGet(t, dst, "oif", out)
		}
		iface, gw, src, err = fast.Path(host(dst), out)
		if d := disagreement(ko, iface, gw, src, err); d != "" {
			fail("Path(%s, %s) vs ip route get %s oif %s: %s", dst, out, dst, out, d)
		}
	}
	// A prefix means the route that covers all of it: the user-space FIB
	// must give the answer the explaining lookup gives.
	for _, p := range g.prefixes(is4, n/5) {
		iface, gw, src, err := fast.Path(p, "")
		c, lerr := explain.Lookup(p, "")
		switch {
		case (err == nil) != (lerr == nil):
			fail("Path(%s) = %s %s %s, %v; Lookup: %+v, %v", p, iface, gw, src, err, c, lerr)
		case err == nil && (iface != c.Interface || gw != c.Gateway || src != c.Source):
			fail("Path(%s) = %s %s %s; Lookup: %s %s %s", p, iface, gw, src, c.Interface, c.Gateway, c.Source)
		}
	}
	if is4 {
		t.Logf("IPv4: user-space FIB usable %v, %d routes remembered (Excluding: %v, %d)",
			fast.fib != nil && fast.fib.usable, len(fast.byRoute), excluding.fib != nil && excluding.fib.usable, len(excluding.byRoute))
	}
	return failures
}

// generator makes one random topology and destinations that exercise it.
type generator struct {
	rng   *rand.Rand
	links int
	// subnets are the interfaces' address prefixes, by interface.
	subnets [][]netip.Prefix
	// locals are the addresses assigned.
	locals []netip.Addr
	// dsts are the routes' destinations.
	dsts []netip.Prefix
}

func (g *generator) chance(p float64) bool { return g.rng.Float64() < p }

func pick[T any](g *generator, xs []T) T { return xs[g.rng.IntN(len(xs))] }

// pool4 and pool6 are where addresses and routes come from: documentation
// ranges and private ones, which exist only inside the namespace.
var (
	pool4 = []netip.Prefix{
		netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.0/24"),
		netip.MustParsePrefix("203.0.113.0/24"), netip.MustParsePrefix("198.18.0.0/15"),
		netip.MustParsePrefix("10.0.0.0/14"), netip.MustParsePrefix("172.16.0.0/14"),
		netip.MustParsePrefix("192.168.0.0/22"),
	}
	pool6 = []netip.Prefix{
		netip.MustParsePrefix("2001:db8::/44"), netip.MustParsePrefix("fd00::/44"),
	}
)

// inside returns a random prefix of length bits inside p (p itself if
// bits is shorter).
func (g *generator) inside(p netip.Prefix, bits int) netip.Prefix {
	if bits < p.Bits() {
		bits = p.Bits()
	}
	return netip.PrefixFrom(g.addrIn(p), bits).Masked()
}

// addrIn returns a random address inside p.
func (g *generator) addrIn(p netip.Prefix) netip.Addr {
	b := p.Addr().As16()
	off := 0
	if p.Addr().Is4() {
		off = 96
	}
	for i := off + p.Bits(); i < 128; i++ {
		if g.chance(0.5) {
			b[i/8] |= 0x80 >> (i % 8)
		} else {
			b[i/8] &^= 0x80 >> (i % 8)
		}
	}
	a := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		a = a.Unmap()
	}
	return a
}

// hostIn returns an address of p that is neither its network nor its
// broadcast address.
func (g *generator) hostIn(p netip.Prefix) netip.Addr {
	for {
		a := g.addrIn(p)
		if p.Addr().BitLen()-p.Bits() < 2 || (a != p.Masked().Addr() && !allOnes(a, p)) {
			return a
		}
	}
}

func allOnes(a netip.Addr, p netip.Prefix) bool {
	b := a.AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		if b[i/8]&(0x80>>(i%8)) == 0 {
			return false
		}
	}
	return true
}

// topology returns the ip commands of a random topology; g.links
// interfaces d0.. must exist first.
func (g *generator) topology() []string {
	g.links = 1 + g.rng.IntN(3)
	g.subnets = make([][]netip.Prefix, g.links)
	var lines []string
	for _, is4 := range []bool{true, false} {
		lines = append(lines, g.addresses(is4)...)
	}
	for _, is4 := range []bool{true, false} {
		lines = append(lines, g.routes(is4)...)
		if g.chance(0.5) {
			lines = append(lines, g.rules(is4)...)
		}
		if g.chance(0.3) {
			lines = append(lines, g.ours(is4)...)
		}
	}
	return lines
}

func (g *generator) addresses(is4 bool) []string {
	var lines []string
	for d := range g.links {
		for range 1 + g.rng.IntN(3) {
			var p netip.Prefix
			mine := g.family(g.subnets[d], is4)
			switch {
			case len(mine) > 0 && g.chance(0.4): // a secondary, or another IPv6 address of the prefix
				p = pick(g, mine)
			case is4:
				p = g.inside(pick(g, pool4), pick(g, []int{16, 22, 24, 24, 24, 25, 26, 28}))
			default:
				p = g.inside(pick(g, pool6), pick(g, []int{48, 56, 64, 64, 64, 64, 96}))
			}
			a := g.hostIn(p)
			g.subnets[d] = append(g.subnets[d], p)
			g.locals = append(g.locals, a)
			line := fmt.Sprintf("addr add %s/%d dev d%d", a, p.Bits(), d)
			if !is4 {
				line += " nodad"
			}
			lines = append(lines, line)
		}
	}
	return lines
}

func (g *generator) family(ps []netip.Prefix, is4 bool) []netip.Prefix {
	return slices.DeleteFunc(slices.Clone(ps), func(p netip.Prefix) bool { return p.Addr().Is4() != is4 })
}

func (g *generator) localsOf(is4 bool) []netip.Addr {
	return slices.DeleteFunc(slices.Clone(g.locals), func(a netip.Addr) bool { return a.Is4() != is4 })
}

// gateway returns a link and an address on one of its subnets.
func (g *generator) gateway(is4 bool) (int, netip.Addr, bool) {
	d := g.rng.IntN(g.links)
	mine := g.family(g.subnets[d], is4)
	if len(mine) == 0 {
		return 0, netip.Addr{}, false
	}
	return d, g.hostIn(pick(g, mine)), true
}

func (g *generator) routes(is4 bool) []string {
	fam := "-4"
	pool, lengths := pool4, []int{0, 8, 12, 16, 20, 24, 24, 25, 26, 28, 30, 32}
	if !is4 {
		fam, pool, lengths = "-6", pool6, []int{0, 32, 44, 48, 56, 64, 64, 96, 120, 128}
	}
	var lines []string
	if d, gw, ok := g.gateway(is4); ok && g.chance(0.5) {
		// A default route in main, for the user-space FIB to remember.
		lines = append(lines, fmt.Sprintf("%s route add default via %s dev d%d", fam, gw, d))
	}
	for range 3 + g.rng.IntN(8) {
		var dst netip.Prefix
		subs := g.family(slices.Concat(g.subnets...), is4)
		if len(subs) > 0 && g.chance(0.3) {
			dst = g.inside(pick(g, subs), pick(g, lengths))
		} else {
			dst = g.inside(pick(g, pool), pick(g, lengths))
		}
		if dst.Bits() == 0 {
			dst = netip.PrefixFrom(dst.Addr(), 0)
		}
		g.dsts = append(g.dsts, dst)
		line := fam + " route add "
		switch r := g.rng.Float64(); {
		case r < 0.12:
			line += pick(g, []string{"unreachable", "blackhole", "prohibit", "throw"}) + " " + dst.String()
		case r < 0.2:
			line += dst.String() + " dev " + fmt.Sprintf("d%d", g.rng.IntN(g.links))
		case r < 0.25 && is4:
			line += fmt.Sprintf("%s via 10.99.%d.%d dev d%d onlink", dst, g.rng.IntN(256), 1+g.rng.IntN(254), g.rng.IntN(g.links))
		case r < 0.32:
			d1, gw1, ok1 := g.gateway(is4)
			d2, gw2, ok2 := g.gateway(is4)
			if !ok1 || !ok2 {
				continue
			}
			line += fmt.Sprintf("%s nexthop via %s dev d%d weight %d nexthop via %s dev d%d weight %d",
				dst, gw1, d1, 1+g.rng.IntN(3), gw2, d2, 1+g.rng.IntN(3))
		default:
			d, gw, ok := g.gateway(is4)
			if !ok {
				continue
			}
			line += fmt.Sprintf("%s via %s dev d%d", dst, gw, d)
		}
		if l := g.localsOf(is4); len(l) > 0 && g.chance(0.3) && !strings.Contains(line, "nexthop") {
			line += " src " + pick(g, l).String()
		}
		if g.chance(0.4) {
			line += " metric " + strconv.Itoa(pick(g, []int{1, 5, 10, 100, 1024, 2048}))
		}
		if g.chance(0.4) {
			line += " table " + strconv.Itoa(100+g.rng.IntN(4))
		}
		lines = append(lines, line)
	}
	return lines
}

// rules returns random policy rules sending lookups to the extra tables.
func (g *generator) rules(is4 bool) []string {
	fam := "-4"
	if !is4 {
		fam = "-6"
	}
	var lines []string
	for range 1 + g.rng.IntN(4) {
		line := fmt.Sprintf("%s rule add priority %d", fam, 1000+g.rng.IntN(30000))
		if g.chance(0.05) {
			line += " not"
		}
		switch r := g.rng.Float64(); {
		case r < 0.4 && len(g.dsts) > 0:
			line += " to " + pick(g, g.dsts).String()
		case r < 0.5:
			if l := g.localsOf(is4); len(l) > 0 {
				line += " from " + pick(g, l).String()
			}
		case r < 0.6:
			line += " fwmark 0x10"
		case r < 0.7:
			line += " iif lo"
		}
		switch r := g.rng.Float64(); {
		case r < 0.6:
			line += " lookup " + pick(g, []string{"100", "101", "102", "103", "main"})
		case r < 0.8:
			line += fmt.Sprintf(" lookup %s suppress_prefixlength %d", pick(g, []string{"main", "100"}), pick(g, []int{0, 8, 16, 24}))
		case strings.Contains(line, " to "):
			// Only for some destinations, or nothing else would be tested.
			line += " " + pick(g, []string{"unreachable", "blackhole", "prohibit"})
		default:
			line += " lookup 101"
		}
		lines = append(lines, line)
	}
	return lines
}

// ours returns the rules egress-snat installs (routes.Rules) with a route
// of its table, which a selector made with Excluding must look past.
func (g *generator) ours(is4 bool) []string {
	fam, from := "-4", " from 0.0.0.0/32"
	if !is4 {
		fam, from = "-6", ""
	}
	lines := []string{
		fmt.Sprintf("%s rule add priority %d fwmark %#x/0xffffffff goto %d", fam, routes.PrioExempt, routes.LookupMark, routes.PrioEnd),
		fmt.Sprintf("%s rule add priority %d%s lookup %d", fam, routes.PrioDestinations, from, routes.Table),
		fmt.Sprintf("%s rule add priority %d lookup main suppress_prefixlength 0", fam, routes.PrioSuppress),
		fmt.Sprintf("%s rule add priority %d nop", fam, routes.PrioEnd),
	}
	if len(g.dsts) == 0 {
		return lines
	}
	for range 1 + g.rng.IntN(3) {
		d, gw, ok := g.gateway(is4)
		dst := pick(g, g.dsts)
		if ok && dst.Addr().Is4() == is4 {
			lines = append(lines, fmt.Sprintf("%s route add %s via %s dev d%d table %d", fam, dst, gw, d, routes.Table))
		}
	}
	return lines
}

// destinations returns n host addresses, most of them inside the
// topology's routes and subnets, some of them its own addresses,
// gateways-to-be and broadcast addresses, some anywhere in the pools.
func (g *generator) destinations(is4 bool, n int) []netip.Addr {
	pool := pool4
	if !is4 {
		pool = pool6
	}
	dsts := slices.DeleteFunc(slices.Clone(g.dsts), func(p netip.Prefix) bool { return p.Addr().Is4() != is4 })
	subs := g.family(slices.Concat(g.subnets...), is4)
	locals := g.localsOf(is4)
	var out []netip.Addr
	for len(out) < n {
		switch r := g.rng.Float64(); {
		case r < 0.4 && len(dsts) > 0:
			out = append(out, g.addrIn(pick(g, dsts)))
		case r < 0.6 && len(subs) > 0:
			out = append(out, g.addrIn(pick(g, subs)))
		case r < 0.65 && len(locals) > 0:
			out = append(out, pick(g, locals))
		case r < 0.7 && is4:
			out = append(out, pick(g, []netip.Addr{
				netip.MustParseAddr("224.0.0.251"), netip.MustParseAddr("239.1.2.3"),
				netip.MustParseAddr("255.255.255.255"), netip.MustParseAddr("0.0.0.7"), netip.MustParseAddr("0.0.0.0"),
			}))
		case r < 0.7:
			out = append(out, pick(g, []netip.Addr{netip.MustParseAddr("ff0e::1"), netip.MustParseAddr("ff02::1")}))
		default:
			out = append(out, g.addrIn(pick(g, pool)))
		}
	}
	return out
}

// prefixes returns n prefixes, inside the routes' destinations or the
// pools, to be resolved as a whole.
func (g *generator) prefixes(is4 bool, n int) []netip.Prefix {
	pool, lengths := pool4, []int{0, 8, 16, 20, 24, 26, 28}
	if !is4 {
		pool, lengths = pool6, []int{0, 32, 48, 64, 96}
	}
	dsts := slices.DeleteFunc(slices.Clone(g.dsts), func(p netip.Prefix) bool { return p.Addr().Is4() != is4 })
	var out []netip.Prefix
	for len(out) < n {
		base := pick(g, pool)
		if len(dsts) > 0 && g.chance(0.6) {
			base = pick(g, dsts)
		}
		p := g.inside(base, pick(g, lengths))
		if p.Bits() == 0 {
			p = netip.PrefixFrom(p.Addr(), 0).Masked()
		}
		out = append(out, p)
	}
	return out
}
