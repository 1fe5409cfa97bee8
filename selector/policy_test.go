package selector

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/routes"
)

// TestPolicyRoutingAgreesWithKernel checks the selector against `ip route
// get` where the answer comes from more than the main table: policy rules
// (from, to, fwmark, priority) sending lookups to other tables,
// suppress_prefixlength, unreachable, blackhole and prohibit routes and
// rules, route src attributes, primary and secondary addresses, several
// interfaces. Every destination is asked of one selector of each kind in
// turn, so that remembered routes are tested as well.
func TestPolicyRoutingAgreesWithKernel(t *testing.T) {
	sc := newScratch(t)
	base := []string{
		"addr add 192.0.2.250/24 dev d0", "addr add 192.0.2.22/24 dev d0", // primary, secondary
		"addr add 198.18.0.10/15 dev d0",
		"addr add 203.0.113.130/25 dev d1", "addr add 203.0.113.131/25 dev d1",
		"addr add 2001:db8::250/64 dev d0 nodad",
		"addr add 2001:db8:1::130/64 dev d1 nodad",
		"route add default via 192.0.2.1",
		"route add default via 2001:db8::1",
	}
	tests := []struct {
		name  string
		setup []string
		// want maps destinations to the source wanted ("" for a
		// destination the kernel will not send to).
		want map[string]string
		mark uint32 // the lookups' fwmark, for Excluding
	}{
		{
			name: "secondary addresses and a second interface",
			want: map[string]string{"192.0.2.9": "192.0.2.250", "198.19.3.4": "198.18.0.10", "203.0.113.129": "203.0.113.130", "198.51.100.4": "192.0.2.250"},
		},
		{
			name:  "route src names a secondary",
			setup: []string{"route add 198.51.100.0/24 via 192.0.2.1 src 192.0.2.22"},
			want:  map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.250": "192.0.2.22", "203.0.113.7": "192.0.2.250"},
		},
		{
			name: "rule to a prefix, another table via the second interface",
			setup: []string{
				"route add default via 203.0.113.129 table 100",
				"rule add priority 1000 to 198.51.100.0/25 lookup 100",
				"-6 route add default via 2001:db8:1::129 table 100",
				"-6 rule add priority 1000 to 2001:db8:ffff::/48 lookup 100",
			},
			want: map[string]string{
				"198.51.100.4": "203.0.113.130", "198.51.100.200": "192.0.2.250",
				"2001:db8:ffff::4": "2001:db8:1::130", "2001:db8:eeee::4": "2001:db8::250",
			},
		},
		{
			name: "rule from a source never matches a lookup without one",
			setup: []string{
				"route add default via 203.0.113.129 table 100",
				"rule add priority 1000 from 192.0.2.22 lookup 100",
			},
			want: map[string]string{"198.51.100.4": "192.0.2.250"},
		},
		{
			name: "fwmark rule, with and without the mark",
			setup: []string{
				"route add default via 203.0.113.129 table 100",
				"rule add priority 1000 fwmark 0x10 lookup 100",
			},
			want: map[string]string{"198.51.100.4": "192.0.2.250"},
		},
		{
			name: "fwmark rule, lookups with the mark",
			setup: []string{
				"route add default via 203.0.113.129 table 100",
				"rule add priority 1000 fwmark 0x10 lookup 100",
			},
			mark: 0x10,
			want: map[string]string{"198.51.100.4": "203.0.113.130", "192.0.2.9": "203.0.113.130"},
		},
		{
			name: "priority decides between rules",
			setup: []string{
				"route add default via 203.0.113.129 table 100",
				"route add default via 192.0.2.1 src 192.0.2.22 table 101",
				"rule add priority 2000 to 198.51.100.0/24 lookup 100",
				"rule add priority 1500 to 198.51.100.0/26 lookup 101",
			},
			want: map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.100": "203.0.113.130", "203.0.113.7": "192.0.2.250"},
		},
		{
			name: "suppress_prefixlength 0: main's specific routes, another table's default",
			setup: []string{
				"route add 198.51.100.0/24 via 192.0.2.1 src 192.0.2.22",
				"route add default via 203.0.113.129 table 100",
				"rule add priority 1000 lookup main suppress_prefixlength 0",
				"rule add priority 1001 lookup 100",
			},
			want: map[string]string{"198.51.100.4": "192.0.2.22", "192.0.2.9": "192.0.2.250", "203.0.113.7": "203.0.113.130"},
		},
		{
			name: "unreachable, blackhole, prohibit and throw routes",
			setup: []string{
				"route add unreachable 198.51.100.0/26", "route add blackhole 198.51.100.64/26",
				"route add prohibit 198.51.100.128/26", "route add throw 198.51.100.192/26",
				"route add default via 203.0.113.129 table default",
				"-6 route add unreachable 2001:db8:ffff::/64", "-6 route add blackhole 2001:db8:ffff:1::/64",
				"-6 route add prohibit 2001:db8:ffff:2::/64",
			},
			want: map[string]string{
				"198.51.100.4": "", "198.51.100.70": "", "198.51.100.130": "", "198.51.100.200": "203.0.113.130",
				"2001:db8:ffff::4": "", "2001:db8:ffff:1::4": "", "2001:db8:ffff:2::4": "", "2001:db8:ffff:3::4": "2001:db8::250",
			},
		},
		{
			name: "unreachable, blackhole and prohibit rules",
			setup: []string{
				"rule add priority 1000 to 198.51.100.0/26 unreachable", "rule add priority 1001 to 198.51.100.64/26 blackhole",
				"rule add priority 1002 to 198.51.100.128/26 prohibit",
			},
			want: map[string]string{"198.51.100.4": "", "198.51.100.70": "", "198.51.100.130": "", "198.51.100.200": "192.0.2.250"},
		},
		{
			name: "egress-snat's own rules, looked past with its mark",
			setup: []string{
				fmt.Sprintf("rule add priority %d fwmark %#x/0xffffffff goto %d", routes.PrioExempt, routes.LookupMark, routes.PrioEnd),
				fmt.Sprintf("rule add priority %d from 0.0.0.0/32 lookup %d", routes.PrioDestinations, routes.Table),
				fmt.Sprintf("rule add priority %d nop", routes.PrioEnd),
				fmt.Sprintf("route add 198.51.100.0/24 via 203.0.113.129 table %d", routes.Table),
			},
			mark: routes.LookupMark,
			want: map[string]string{"198.51.100.4": "192.0.2.250", "203.0.113.7": "192.0.2.250"},
		},
		{
			name: "egress-snat's own rules, as traffic takes them",
			setup: []string{
				fmt.Sprintf("rule add priority %d fwmark %#x/0xffffffff goto %d", routes.PrioExempt, routes.LookupMark, routes.PrioEnd),
				fmt.Sprintf("rule add priority %d from 0.0.0.0/32 lookup %d", routes.PrioDestinations, routes.Table),
				fmt.Sprintf("rule add priority %d nop", routes.PrioEnd),
				fmt.Sprintf("route add 198.51.100.0/24 via 203.0.113.129 table %d", routes.Table),
			},
			want: map[string]string{"198.51.100.4": "203.0.113.130", "203.0.113.7": "192.0.2.250"},
		},
		{
			name: "multicast and broadcast destinations after a unicast one took the default route",
			want: map[string]string{
				"198.51.100.4": "192.0.2.250", "224.0.0.251": "", "239.1.2.3": "", "255.255.255.255": "",
				"192.0.2.255": "", "192.0.2.250": "", "0.0.0.0": "",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sc.reset(t)
			sc.addLinks(t, 2)
			sc.batch(t, slices.Concat(base, tt.setup), true)
			var extra []string
			sels := map[string]*Selector{"New": New(sc.nl), "kernel lookups only": netlinkOnly(sc.nl)}
			if tt.mark != 0 {
				extra = []string{"mark", fmt.Sprintf("%#x", tt.mark)}
				sels = map[string]*Selector{
					"Excluding":                      Excluding(sc.nl, tt.mark, routes.Ours),
					"Excluding, kernel lookups only": Excluding(sc.nl, tt.mark, func(int) bool { return false }),
				}
			}
			// Unicast destinations first, so that their routes are
			// remembered before the others are asked.
			dsts := make([]string, 0, len(tt.want))
			for d := range tt.want {
				dsts = append(dsts, d)
			}
			slices.SortFunc(dsts, func(a, b string) int {
				if (tt.want[a] == "") != (tt.want[b] == "") {
					if tt.want[a] == "" {
						return 1
					}
					return -1
				}
				return strings.Compare(a, b)
			})
			for _, d := range dsts {
				dst := netip.MustParseAddr(d)
				k := sc.routeGet(t, dst, extra...)
				if got := k.Src; !k.sent() {
					got = ""
					if tt.want[d] != "" {
						t.Errorf("ip route get %s: %s, want source %s", d, k, tt.want[d])
					}
				} else if got != tt.want[d] {
					t.Errorf("ip route get %s: source %s, want %s (the test's expectation is wrong)", d, got, tt.want[d])
				}
				for name, s := range sels {
					iface, gw, src, err := s.Path(host(dst), "")
					if diff := disagreement(k, iface, gw, src, err); diff != "" {
						t.Errorf("%s: Path(%s): %s\n%s", name, d, diff, sc.dump(t))
					}
					c, err := s.Lookup(host(dst), "")
					if err != nil {
						c = &Choice{}
					}
					if diff := disagreement(k, c.Interface, c.Gateway, c.Source, err); diff != "" {
						t.Errorf("%s: Lookup(%s): %s", name, d, diff)
					}
				}
			}
		})
	}
}

// TestMultipathAgreesWithKernel documents what the selector answers for a
// multipath route: the user-space FIB steps aside (fib4 is not usable with
// one), so every destination is a kernel lookup of its own, and the answer
// is the nexthop the kernel hashes that destination to, with that
// nexthop's source: what `ip route get` prints, and what an unbound
// connect() gets as its source (its first lookup has no source either). A
// later packet of the connection is hashed with the chosen source and may
// leave by the other nexthop, still with that source, so only the source
// is the selector's promise; a route whose nexthops share a src (or whose
// nexthops are on one interface) has one answer for all destinations.
func TestMultipathAgreesWithKernel(t *testing.T) {
	sc := newScratch(t)
	base := []string{
		"addr add 192.0.2.250/24 dev d0", "addr add 192.0.2.22/24 dev d0",
		"addr add 203.0.113.130/25 dev d1",
		"addr add 2001:db8::250/64 dev d0 nodad", "addr add 2001:db8:1::130/64 dev d1 nodad",
		"route add default via 192.0.2.1",
	}
	tests := []struct {
		name    string
		setup   []string
		prefix  string
		sources []string // the sources an answer may have
	}{
		{
			name:    "nexthops on two interfaces",
			setup:   []string{"route add 198.51.100.0/24 nexthop via 192.0.2.1 dev d0 weight 1 nexthop via 203.0.113.129 dev d1"},
			prefix:  "198.51.100.0/24",
			sources: []string{"192.0.2.250", "203.0.113.130"},
		},
		{
			name:    "nexthops sharing a src",
			setup:   []string{"route add 198.51.100.0/24 src 192.0.2.22 nexthop via 192.0.2.1 dev d0 nexthop via 192.0.2.2 dev d0"},
			prefix:  "198.51.100.0/24",
			sources: []string{"192.0.2.22"},
		},
		{
			name:    "IPv6 nexthops on two interfaces",
			setup:   []string{"-6 route add 2001:db8:ffff::/48 nexthop via 2001:db8::1 dev d0 nexthop via 2001:db8:1::129 dev d1"},
			prefix:  "2001:db8:ffff::/48",
			sources: []string{"2001:db8::250", "2001:db8:1::130"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sc.reset(t)
			sc.addLinks(t, 2)
			sc.batch(t, slices.Concat(base, tt.setup), true)
			s := New(sc.nl)
			g := &generator{rng: rand.New(rand.NewPCG(1, 2))}
			seen := map[string]int{}
			for range 40 {
				dst := g.addrIn(netip.MustParsePrefix(tt.prefix))
				k := sc.routeGet(t, dst)
				iface, gw, src, err := s.Path(host(dst), "")
				if d := disagreement(k, iface, gw, src, err); d != "" {
					t.Errorf("Path(%s): %s", dst, d)
				}
				c, err := s.Lookup(host(dst), "")
				if err != nil {
					t.Fatalf("Lookup(%s): %v", dst, err)
				}
				if c.Source != src || c.Interface != iface {
					t.Errorf("Lookup(%s) = %s %s, Path: %s %s", dst, c.Interface, c.Source, iface, src)
				}
				if !slices.Contains(tt.sources, src.String()) {
					t.Errorf("Path(%s) source %s, want one of %v", dst, src, tt.sources)
				}
				seen[iface+" "+src.String()]++
			}
			if s.fib != nil && s.fib.usable {
				t.Errorf("the user-space FIB was used with a multipath route")
			}
			t.Logf("answers (interface source: destinations): %v", seen)
		})
	}
}

// TestCarvedPrefixIgnoresRememberedRoute: a prefix whose addresses all take
// more specific routes has no answer (Lookup says to name the narrower
// prefixes), whether or not another destination of its covering route was
// resolved before; and a prefix with a more specific route in part of it
// gets the covering route's answer only from the kernel's probe.
func TestCarvedPrefixIgnoresRememberedRoute(t *testing.T) {
	sc := newScratch(t)
	sc.addLinks(t, 2)
	sc.batch(t, []string{
		"addr add 192.0.2.250/24 dev d0", "addr add 192.0.2.22/24 dev d0", "addr add 203.0.113.130/25 dev d1",
		"route add default via 192.0.2.1",
		"route add 198.51.100.0/25 via 192.0.2.2 src 192.0.2.22", "route add 198.51.100.128/25 via 203.0.113.129",
		"route add 198.18.0.0/24 via 203.0.113.129",
	}, true)
	for _, tt := range []struct {
		prefix string
		want   string // the source, "" for an error
	}{
		{"198.51.100.0/24", ""},
		{"198.51.100.0/23", "192.0.2.250"}, // 198.51.101.0/24 takes the default route
		{"198.18.0.0/16", "192.0.2.250"},
		{"198.18.0.0/24", "203.0.113.130"},
		{"198.51.100.128/26", "203.0.113.130"},
	} {
		for _, first := range []string{"", "203.0.113.7", "198.18.0.1", "198.51.100.129"} {
			s := New(sc.nl)
			if first != "" {
				if _, _, _, err := s.Path(host(netip.MustParseAddr(first)), ""); err != nil {
					t.Fatalf("Path(%s): %v", first, err)
				}
			}
			_, _, src, err := s.Path(netip.MustParsePrefix(tt.prefix), "")
			got := src.String()
			if err != nil {
				got = ""
			}
			if got != tt.want {
				t.Errorf("after Path(%q): Path(%s) = %s, %v; want source %q", first, tt.prefix, src, err, tt.want)
			}
		}
	}
}
