package selector

import (
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// kernelRoute is what `ip route get` prints for one address.
type kernelRoute struct {
	Src, Dev, Via string
}

// routeGet asks ip(8) inside the lab's host namespace, the reference the
// selector must agree with.
func routeGet(t *testing.T, l *lab.Lab, addr string, extra ...string) kernelRoute {
	t.Helper()
	args := append([]string{"-n", l.Host, "route", "get", addr}, extra...)
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	var r kernelRoute
	f := strings.Fields(string(out))
	for i := 0; i+1 < len(f); i++ {
		switch f[i] {
		case "src":
			r.Src = f[i+1]
		case "dev":
			r.Dev = f[i+1]
		case "via":
			r.Via = f[i+1]
		}
	}
	if r.Src == "" || r.Dev == "" {
		t.Fatalf("ip %s: no src or dev in %q", strings.Join(args, " "), out)
	}
	return r
}

// recorder is a Netlink that forwards to a real handle and records every
// address the selector asks the kernel about.
type recorder struct {
	*netlink.Handle
	mu     sync.Mutex
	lookup []netip.Addr
}

func (r *recorder) RouteGetWithOptions(dst net.IP, opts *netlink.RouteGetOptions) ([]netlink.Route, error) {
	a, _ := netip.AddrFromSlice(dst)
	r.mu.Lock()
	r.lookup = append(r.lookup, a.Unmap())
	r.mu.Unlock()
	return r.Handle.RouteGetWithOptions(dst, opts)
}

// newLab builds a lab, runs setup (ip commands run inside the host
// namespace, as `ip ARGS...`) and returns it with a netlink handle in it.
func newLab(t *testing.T, setup [][]string, opts ...lab.Option) (*lab.Lab, *recorder) {
	t.Helper()
	l := lab.New(t, opts...)
	for _, args := range setup {
		l.Run(t, "ip", args...)
	}
	ns, err := netns.GetFromName(l.Host)
	if err != nil {
		t.Fatalf("netns %s: %v", l.Host, err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", l.Host, err)
	}
	t.Cleanup(h.Close)
	return l, &recorder{Handle: h}
}

func split(s string) []string { return strings.Fields(s) }

func TestLookupAgreesWithKernel(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		second     bool
		setup      []string // ip commands in the host namespace
		dst        string
		out        string
		want       string // natural source
		wantReason Reason
		wantRoute  string
	}{
		{
			name:       "one subnet, on-link destination",
			setup:      []string{"addr del 198.18.0.10/15 dev eth0"},
			dst:        "192.0.2.1",
			want:       "192.0.2.250",
			wantReason: ReasonConnected,
			wantRoute:  "192.0.2.0/24",
		},
		{
			name:       "several subnets, destination on the second",
			dst:        "198.18.0.1",
			want:       "198.18.0.10",
			wantReason: ReasonConnected,
			wantRoute:  "198.18.0.0/15",
		},
		{
			name:       "remote via the default route",
			dst:        "198.51.100.4",
			want:       "192.0.2.250",
			wantReason: ReasonSameSubnet,
			wantRoute:  "0.0.0.0/0",
		},
		{
			name:       "route with a src attribute",
			setup:      []string{"route add 203.0.113.0/24 via 192.0.2.1 src 192.0.2.22"},
			dst:        "203.0.113.7",
			want:       "192.0.2.22",
			wantReason: ReasonRouteSrc,
			wantRoute:  "203.0.113.0/24",
		},
		{
			name:       "gateway on no subnet of the interface",
			setup:      []string{"route add 198.51.100.5/32 via 10.9.9.9 dev eth0 onlink"},
			dst:        "198.51.100.5",
			want:       "192.0.2.250",
			wantReason: ReasonPrimary,
			wantRoute:  "198.51.100.5/32",
		},
		{
			name:       "IPv6 via the default route",
			dst:        "2001:db8:ffff::4",
			want:       "2001:db8::250",
			wantReason: ReasonIPv6,
			wantRoute:  "::/0",
		},
		{
			name:       "IPv6 on-link",
			dst:        "2001:db8::1",
			want:       "2001:db8::250",
			wantReason: ReasonIPv6,
			wantRoute:  "2001:db8::/64",
		},
		{
			name:       "second interface, route via its gateway",
			second:     true,
			setup:      []string{"route add 198.51.100.5/32 via 203.0.113.129"},
			dst:        "198.51.100.5",
			want:       "203.0.113.130",
			wantReason: ReasonSameSubnet,
			wantRoute:  "198.51.100.5/32",
		},
		{
			name:       "second interface, on-link",
			second:     true,
			dst:        "203.0.113.129",
			want:       "203.0.113.130",
			wantReason: ReasonConnected,
			wantRoute:  "203.0.113.128/25",
		},
		{
			name:       "second interface, the first still takes the default route",
			second:     true,
			dst:        "203.0.113.7",
			want:       "192.0.2.250",
			wantReason: ReasonSameSubnet,
			wantRoute:  "0.0.0.0/0",
		},
		{
			name:       "out names the interface of a less preferred route",
			second:     true,
			setup:      []string{"route add 198.51.100.4/32 via 203.0.113.129 metric 500"},
			dst:        "198.51.100.4",
			out:        "eth1",
			want:       "203.0.113.130",
			wantReason: ReasonSameSubnet,
			wantRoute:  "198.51.100.4/32",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var opts []lab.Option
			if tt.second {
				opts = append(opts, lab.WithSecondNIC())
			}
			var setup [][]string
			for _, s := range tt.setup {
				setup = append(setup, split(s))
			}
			l, nl := newLab(t, setup, opts...)

			dst := netip.MustParseAddr(tt.dst)
			got, err := New(nl).Lookup(netip.PrefixFrom(dst, dst.BitLen()), tt.out)
			if err != nil {
				t.Fatalf("Lookup(%s, %q): %v", tt.dst, tt.out, err)
			}
			var extra []string
			if tt.out != "" {
				extra = []string{"oif", tt.out}
			}
			k := routeGet(t, l, tt.dst, extra...)
			if got.Source.String() != k.Src || got.Interface != k.Dev || addrString(got.Gateway) != k.Via {
				t.Errorf("Lookup(%s): src %s dev %s via %q; ip route get: src %s dev %s via %q",
					tt.dst, got.Source, got.Interface, addrString(got.Gateway), k.Src, k.Dev, k.Via)
			}
			if got.Source.String() != tt.want {
				t.Errorf("Lookup(%s).Source = %s, want %s", tt.dst, got.Source, tt.want)
			}
			if got.Reason != tt.wantReason {
				t.Errorf("Lookup(%s).Reason = %s, want %s", tt.dst, got.Reason, tt.wantReason)
			}
			if got.Route.String() != tt.wantRoute {
				t.Errorf("Lookup(%s).Route = %s, want %s", tt.dst, got.Route, tt.wantRoute)
			}
			if got.Probe != dst {
				t.Errorf("Lookup(%s).Probe = %s, want the host itself", tt.dst, got.Probe)
			}
			if got.Table != 254 {
				t.Errorf("Lookup(%s).Table = %d, want 254 (main)", tt.dst, got.Table)
			}
			if !slices.ContainsFunc(got.Addresses, func(a Address) bool { return a.Prefix.Addr() == got.Source }) {
				t.Errorf("Lookup(%s).Addresses = %v, want them to include the source %s", tt.dst, got.Addresses, got.Source)
			}
		})
	}
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// TestLookupPrefix checks that a prefix means the route covering it, never
// its first address: 0.0.0.0 in particular is looked up by the kernel as a
// local address.
func TestLookupPrefix(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		setup     []string
		dst       string
		wantRoute string
		wantSrc   string
		wantGw    string
		reason    Reason
		inside    string // the probe must lie in here (default: dst)
	}{
		{name: "IPv4 everything", dst: "0.0.0.0/0", wantRoute: "0.0.0.0/0", wantSrc: "192.0.2.250", wantGw: "192.0.2.1", reason: ReasonSameSubnet},
		{name: "IPv6 everything", dst: "::/0", wantRoute: "::/0", wantSrc: "2001:db8::250", wantGw: "2001:db8::1", reason: ReasonIPv6},
		{name: "prefix under the default route", dst: "198.51.100.0/24", wantRoute: "0.0.0.0/0", wantSrc: "192.0.2.250", wantGw: "192.0.2.1", reason: ReasonSameSubnet},
		{
			name:      "prefix with its own route",
			setup:     []string{"route add 198.51.100.0/24 via 192.0.2.1 src 192.0.2.22"},
			dst:       "198.51.100.0/24",
			wantRoute: "198.51.100.0/24", wantSrc: "192.0.2.22", wantGw: "192.0.2.1", reason: ReasonRouteSrc,
		},
		{
			name:      "prefix partly carved out by a more specific route",
			setup:     []string{"route add 198.51.100.0/25 via 192.0.2.1 src 192.0.2.22"},
			dst:       "198.51.100.0/24",
			wantRoute: "0.0.0.0/0", wantSrc: "192.0.2.250", wantGw: "192.0.2.1", reason: ReasonSameSubnet,
			inside: "198.51.100.128/25",
		},
		{name: "connected subnet as a prefix", dst: "192.0.2.0/24", wantRoute: "192.0.2.0/24", wantSrc: "192.0.2.250", reason: ReasonConnected},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var setup [][]string
			for _, s := range tt.setup {
				setup = append(setup, split(s))
			}
			l, nl := newLab(t, setup)
			dst := netip.MustParsePrefix(tt.dst)
			got, err := New(nl).Lookup(dst, "")
			if err != nil {
				t.Fatalf("Lookup(%s): %v", dst, err)
			}
			if got.Dst != dst {
				t.Errorf("Dst = %s, want %s", got.Dst, dst)
			}
			if got.Route.String() != tt.wantRoute {
				t.Errorf("Route = %s, want %s", got.Route, tt.wantRoute)
			}
			if got.Source.String() != tt.wantSrc {
				t.Errorf("Source = %s, want %s", got.Source, tt.wantSrc)
			}
			if addrString(got.Gateway) != tt.wantGw {
				t.Errorf("Gateway = %q, want %q", addrString(got.Gateway), tt.wantGw)
			}
			if got.Reason != tt.reason {
				t.Errorf("Reason = %s, want %s", got.Reason, tt.reason)
			}
			inside := dst
			if tt.inside != "" {
				inside = netip.MustParsePrefix(tt.inside)
			}
			if !inside.Contains(got.Probe) || special(got.Probe) {
				t.Errorf("Probe = %s, want an ordinary address inside %s", got.Probe, inside)
			}
			for _, a := range nl.lookup {
				if a == dst.Addr() {
					t.Errorf("looked up %s, the prefix's network address (lookups: %v)", a, nl.lookup)
				}
			}
			k := routeGet(t, l, got.Probe.String())
			if got.Source.String() != k.Src || got.Interface != k.Dev || addrString(got.Gateway) != k.Via {
				t.Errorf("Lookup(%s) via probe %s: src %s dev %s via %q; ip route get: src %s dev %s via %q",
					dst, got.Probe, got.Source, got.Interface, addrString(got.Gateway), k.Src, k.Dev, k.Via)
			}
		})
	}
}

func TestLookupErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		setup   []string
		dst     string
		out     string
		noRoute bool   // want errors.Is(err, ErrNoRoute)
		want    string // the error must contain this
	}{
		{name: "out is not the routed interface", dst: "198.51.100.4/32", out: "eth1"},
		{name: "out does not exist", dst: "198.51.100.4/32", out: "nope0", want: "nope0"},
		{name: "no default route", setup: []string{"route del default"}, dst: "198.51.100.4/32", noRoute: true, want: "198.51.100.4"},
		{name: "no default route, everything", setup: []string{"route del default"}, dst: "0.0.0.0/0", noRoute: true, want: "0.0.0.0/0"},
		{name: "no IPv6 default route", setup: []string{"-6 route del default"}, dst: "2001:db8:ffff::4/128", noRoute: true, want: "2001:db8:ffff::4"},
		{name: "unreachable route", setup: []string{"route add unreachable 198.51.100.0/24"}, dst: "198.51.100.4/32", want: "198.51.100.4"},
		{name: "local address", dst: "192.0.2.22/32", want: "local"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var setup [][]string
			for _, s := range tt.setup {
				setup = append(setup, split(s))
			}
			_, nl := newLab(t, setup, lab.WithSecondNIC())
			got, err := New(nl).Lookup(netip.MustParsePrefix(tt.dst), tt.out)
			if err == nil {
				t.Fatalf("Lookup(%s, %q) = %+v, want an error", tt.dst, tt.out, got)
			}
			t.Logf("Lookup(%s, %q): %v", tt.dst, tt.out, err)
			if tt.noRoute && !errors.Is(err, ErrNoRoute) {
				t.Errorf("Lookup(%s, %q) error %q, want ErrNoRoute", tt.dst, tt.out, err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Lookup(%s, %q) error %q, want it to name %q", tt.dst, tt.out, err, tt.want)
			}
		})
	}
}

func TestOwner(t *testing.T) {
	t.Parallel()
	_, nl := newLab(t, nil, lab.WithSecondNIC())
	s := New(nl)
	tests := []struct {
		addr string
		want string // "" means ErrNotLocal
	}{
		{"192.0.2.250", "eth0"},
		{"192.0.2.22", "eth0"},
		{"198.18.0.10", "eth0"},
		{"2001:db8::22", "eth0"},
		{"203.0.113.130", "eth1"},
		{"203.0.113.131", "eth1"},
		{"127.0.0.1", "lo"},
		{"192.0.2.99", ""},
		{"192.0.2.1", ""},    // the gateway's, not ours
		{"2001:db8::99", ""}, // in our prefix, not assigned
	}
	for _, tt := range tests {
		got, err := s.Owner(netip.MustParseAddr(tt.addr))
		switch {
		case tt.want == "" && !errors.Is(err, ErrNotLocal):
			t.Errorf("Owner(%s) = %q, %v; want ErrNotLocal", tt.addr, got, err)
		case tt.want != "" && (err != nil || got != tt.want):
			t.Errorf("Owner(%s) = %q, %v; want %q", tt.addr, got, err, tt.want)
		}
	}
}

// TestDownInterface: an interface set down keeps its addresses, but the
// kernel has deleted its routes and refuses new ones, so OnLink and
// Gateways say ErrNoRoute (a way out to wait for), not a plain false or no
// gateways (bad input); up again, they answer as before.
func TestDownInterface(t *testing.T) {
	t.Parallel()
	l, nl := newLab(t, [][]string{{"route", "add", "default", "via", "203.0.113.129", "dev", "eth1", "metric", "500"}}, lab.WithSecondNIC())
	s := New(nl)
	gw := netip.MustParseAddr("203.0.113.129")
	if ok, err := s.OnLink("eth1", gw); !ok || err != nil {
		t.Fatalf("OnLink(eth1, %s) while up = %v, %v; want true", gw, ok, err)
	}
	l.Run(t, "ip", "link", "set", "eth1", "down")
	if ok, err := s.OnLink("eth1", gw); !errors.Is(err, ErrNoRoute) || err == nil || !strings.Contains(err.Error(), "eth1 is down") {
		t.Errorf("OnLink(eth1, %s) while down = %v, %v; want ErrNoRoute naming eth1 down", gw, ok, err)
	}
	if gws, err := s.Gateways("eth1", true, nil); !errors.Is(err, ErrNoRoute) {
		t.Errorf("Gateways(eth1) while down = %v, %v; want ErrNoRoute", gws, err)
	}
	l.Run(t, "ip", "link", "set", "eth1", "up")
	if ok, err := s.OnLink("eth1", gw); !ok || err != nil {
		t.Errorf("OnLink(eth1, %s) up again = %v, %v; want true", gw, ok, err)
	}
	if gws, err := s.Gateways("eth1", true, nil); err != nil || len(gws) != 0 {
		t.Errorf("Gateways(eth1) up again = %v, %v; want none (the kernel does not put the default route back)", gws, err)
	}
}

func TestCandidates(t *testing.T) {
	tests := []struct {
		prefix string
		want   []string // exact result; nil to check only properties
		count  int      // wanted length when want is nil
	}{
		{prefix: "198.51.100.4/32", want: []string{"198.51.100.4"}},
		{prefix: "2001:db8::4/128", want: []string{"2001:db8::4"}},
		{prefix: "0.0.0.0/32", want: []string{"0.0.0.0"}}, // a host is itself, special or not
		{prefix: "192.0.2.0/31", want: []string{"192.0.2.1", "192.0.2.0"}},
		{prefix: "0.0.0.0/8", want: nil, count: 0},
		{prefix: "127.0.0.0/8", want: nil, count: 0},
		{prefix: "224.0.0.0/4", want: nil, count: 0},
		{prefix: "240.0.0.0/4", want: nil, count: 0},
		{prefix: "fe80::/10", want: nil, count: 0},
		{prefix: "ff00::/8", want: nil, count: 0},
		{prefix: "192.0.2.0/30", count: 4},
		{prefix: "198.51.100.0/24", count: maxCandidates},
		{prefix: "0.0.0.0/0", count: maxCandidates},
		{prefix: "::/0", count: maxCandidates},
		{prefix: "2001:db8::/32", count: maxCandidates},
		{prefix: "2001:db8::/126", count: 4},
	}
	for _, tt := range tests {
		t.Run(tt.prefix, func(t *testing.T) {
			p := netip.MustParsePrefix(tt.prefix)
			got := candidates(p)
			if tt.want != nil {
				var gs []string
				for _, a := range got {
					gs = append(gs, a.String())
				}
				if !slices.Equal(gs, tt.want) {
					t.Fatalf("candidates(%s) = %v, want %v", p, gs, tt.want)
				}
				return
			}
			if len(got) != tt.count {
				t.Errorf("len(candidates(%s)) = %d, want %d: %v", p, len(got), tt.count, got)
			}
			seen := map[netip.Addr]bool{}
			for i, a := range got {
				if !p.Contains(a) {
					t.Errorf("candidate %s is outside %s", a, p)
				}
				if special(a) {
					t.Errorf("candidate %s is a special address", a)
				}
				if seen[a] {
					t.Errorf("candidate %s appears twice", a)
				}
				seen[a] = true
				if a.Is4() != p.Addr().Is4() {
					t.Errorf("candidate %s is not of %s's family", a, p)
				}
				if i == 0 && p.Bits() < p.Addr().BitLen()-1 && a != p.Addr().Next() && !special(p.Addr().Next()) {
					t.Errorf("first candidate of %s = %s, want the first host %s", p, a, p.Addr().Next())
				}
			}
			if again := candidates(p); !slices.Equal(again, got) {
				t.Errorf("candidates(%s) is not deterministic: %v then %v", p, got, again)
			}
		})
	}
}

func TestCandidatesSpread(t *testing.T) {
	// 0.0.0.0/0 must be probed across the address space, not only at its
	// start, so that a prefix carved up by specific routes still finds one
	// address that takes the covering route.
	got := candidates(netip.MustParsePrefix("0.0.0.0/0"))
	firstOctets := map[byte]bool{}
	for _, a := range got {
		firstOctets[a.As4()[0]] = true
	}
	if len(firstOctets) < len(got)/2 {
		t.Errorf("candidates(0.0.0.0/0) use only %d distinct first octets among %d: %v", len(firstOctets), len(got), got)
	}
	halves := map[bool]int{}
	for _, a := range candidates(netip.MustParsePrefix("198.51.100.0/24")) {
		halves[a.As4()[3] >= 128]++
	}
	if halves[false] == 0 || halves[true] == 0 {
		t.Errorf("candidates(198.51.100.0/24) do not cover both halves: %v", halves)
	}
}

// countingNL counts the route listings the selector asks for.
type countingNL struct {
	*recorder
	routeLists int
}

func (c *countingNL) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	c.routeLists++
	return c.recorder.RouteListFiltered(family, filter, mask)
}

// TestPrefixUse: the host's addresses inside a prefix, and the routes that
// put it on-link (not those through a gateway, nor those of skipped
// tables); the answer is remembered until Forget.
func TestPrefixUse(t *testing.T) {
	t.Parallel()
	_, rec := newLab(t, [][]string{
		split("-6 route add 2001:db8:5::/64 dev eth0"),
		split("-6 route add 2001:db8:6::/64 via 2001:db8::1"),
		split("-6 route add 2001:db8:7::/64 dev eth0 table 7420"),
	})
	nl := &countingNL{recorder: rec}
	s := New(nl)
	skip := func(table int) bool { return table == 7420 }
	type onLink struct {
		Route string
		Table int
		Iface string
	}
	for _, tt := range []struct {
		prefix string
		addrs  []string
		onLink []onLink
	}{
		{"2001:db8::/64", []string{"2001:db8::22/64", "2001:db8::23/64", "2001:db8::250/64"}, []onLink{{"2001:db8::/64", 254, "eth0"}}},
		{"2001:db8:5::/64", nil, []onLink{{"2001:db8:5::/64", 254, "eth0"}}},
		{"2001:db8:5::/80", nil, []onLink{{"2001:db8:5::/64", 254, "eth0"}}},
		{"2001:db8:6::/64", nil, nil},
		{"2001:db8:7::/64", nil, nil},
	} {
		u, err := s.PrefixUse(netip.MustParsePrefix(tt.prefix), skip)
		if err != nil {
			t.Fatalf("PrefixUse(%s): %v", tt.prefix, err)
		}
		var addrs []string
		for _, a := range u.Addrs {
			addrs = append(addrs, a.Addr.String())
			if a.Iface != "eth0" {
				t.Errorf("PrefixUse(%s): %s on %s, want eth0", tt.prefix, a.Addr, a.Iface)
			}
		}
		slices.Sort(addrs)
		var links []onLink
		for _, l := range u.OnLink {
			links = append(links, onLink{l.Route.String(), l.Table, l.Iface})
		}
		if !slices.Equal(addrs, tt.addrs) || !slices.Equal(links, tt.onLink) {
			t.Errorf("PrefixUse(%s): addresses %v, on-link %v; want %v, %v", tt.prefix, addrs, links, tt.addrs, tt.onLink)
		}
	}
	n := nl.routeLists
	if _, err := s.PrefixUse(netip.MustParsePrefix("2001:db8:5::/64"), skip); err != nil || nl.routeLists != n {
		t.Errorf("asked again: %d more route listings, %v; want it remembered", nl.routeLists-n, err)
	}
	s.Forget()
	if _, err := s.PrefixUse(netip.MustParsePrefix("2001:db8:5::/64"), skip); err != nil || nl.routeLists != n+1 {
		t.Errorf("after Forget: %d more route listings, %v; want one", nl.routeLists-n, err)
	}
}
