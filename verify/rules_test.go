package verify

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// fakePaths is a host whose traffic leaves by eth0 with the natural source
// 192.0.2.250, but for 198.51.100.128/25, which a route sends by eth1
// with 203.0.113.130; it owns 192.0.2.250, 192.0.2.22 and 172.30.0.254.
type fakePaths struct{}

func (fakePaths) Lookup(dst netip.Prefix, out string) (*selector.Choice, error) {
	c := &selector.Choice{Dst: dst, Probe: dst.Addr(), Table: 254, Interface: "eth0", Source: netip.MustParseAddr("192.0.2.250")}
	if netip.MustParsePrefix("198.51.100.128/25").Contains(dst.Addr()) && dst.Bits() >= 25 {
		c.Interface, c.Source = "eth1", netip.MustParseAddr("203.0.113.130")
	}
	if out != "" && out != c.Interface {
		return nil, fmt.Errorf("%s leaves by %s: %w", dst, c.Interface, selector.ErrNoRoute)
	}
	return c, nil
}

func (fakePaths) Owner(a netip.Addr) (string, error) {
	for _, s := range []string{"192.0.2.250", "192.0.2.22", "172.30.0.254"} {
		if a == netip.MustParseAddr(s) {
			return "eth0", nil
		}
	}
	return "", fmt.Errorf("%s: %w", a, selector.ErrNotLocal)
}

func fakeHost() Host { return Host{Owners: fakePaths{}, Paths: fakePaths{}} }

// TestSafeTarget: verify sends to the rule's own address, or a
// documentation or --probe address inside it that takes the rule's path,
// and to nothing else.
func TestSafeTarget(t *testing.T) {
	p, a := netip.MustParsePrefix, netip.MustParseAddr
	probe := a("10.9.8.7")
	for _, c := range []struct {
		dst, out string
		want     string // "" none
	}{
		{"10.1.2.3/32", "", "10.1.2.3"},                   // named by the operator
		{"198.51.100.0/24", "", "198.51.100.1"},           // documentation, away from the first address
		{"198.51.100.128/25", "eth1", "198.51.100.129"},   // its own path
		{"0.0.0.0/0", "", "192.0.2.1"},                    // the first documentation range inside
		{"10.0.0.0/8", "", "10.9.8.7"},                    // --probe
		{"10.0.0.0/16", "", ""},                           // nobody's address inside: never sent to
		{"2001:db8:ffff::/48", "", "2001:db8:ffff::1"},    // IPv6 documentation
		{"2001:db8::/32", "", "2001:db8::1"},              // the range itself
		{"198.51.100.128/25", "eth0", "error: leaves by"}, // not the rule's path: no lookup of it succeeds
	} {
		choice, ok, err := SafeTarget(fakeHost(), p(c.dst), c.out, []netip.Addr{probe})
		got := ""
		switch {
		case err != nil:
			got = "error: " + err.Error()
		case ok:
			got = choice.Probe.String()
		}
		if got != c.want && !(strings.HasPrefix(c.want, "error: ") && strings.Contains(got, strings.TrimPrefix(c.want, "error: "))) {
			t.Errorf("SafeTarget(%s, out %q) = %q, want %q", c.dst, c.out, got, c.want)
		}
	}
}

// TestRuleProbes: one flow per rule, as its sender; a rule with no safe
// address is named, not sent to; a forwarded rule's client is an address
// of its prefix that is not the host's.
func TestRuleProbes(t *testing.T) {
	p, a := netip.MustParsePrefix, netip.MustParseAddr
	entries := []snat.Entry{
		{Match: snat.Match{Sender: snat.Host(), Dst: p("198.51.100.0/24"), Out: "eth0"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.22")}},
		{Match: snat.Match{Sender: snat.UID(33), Dst: p("203.0.113.7/32"), Out: "eth0"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.22")}},
		{Match: snat.Match{Sender: snat.From(p("172.30.0.0/24")), Dst: p("0.0.0.0/0"), Out: "eth0"}, To: []netip.Addr{a("192.0.2.22")}},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("10.0.0.0/8"), Out: "eth0"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.22")}},
	}
	probes, skipped, err := RuleProbes(fakeHost(), entries, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, pr := range probes {
		got = append(got, fmt.Sprintf("%s %s->%s", SenderName(pr.Packet), pr.Packet.Src, pr.Packet.Dst))
	}
	want := []string{
		"host 192.0.2.250->198.51.100.1",
		"uid 33 192.0.2.250->203.0.113.7",
		// .255 is the broadcast address, .254 the host's own.
		"from 172.30.0.253 172.30.0.253->192.0.2.1",
	}
	if !slices.Equal(got, want) {
		t.Errorf("probes:\n got %q\nwant %q", got, want)
	}
	if len(skipped) != 1 || !strings.Contains(skipped[0], "10.0.0.0/8") {
		t.Errorf("not verified: %q, want the rule for 10.0.0.0/8", skipped)
	}
}

// TestJudge: what the rules promise for a packet, and why.
func TestJudge(t *testing.T) {
	p, a := netip.MustParsePrefix, netip.MustParseAddr
	entries := []snat.Entry{
		{Match: snat.Match{Sender: snat.Host(), Dst: p("198.51.100.0/24"), Out: "eth0"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.22")}},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("198.51.100.4/32"), Out: "eth0"}, Natural: a("192.0.2.250")},
	}
	choice := func(dst string) *selector.Choice {
		c, _ := fakePaths{}.Lookup(netip.PrefixFrom(a(dst), 32), "")
		return c
	}
	pkt := func(dst string) snat.Packet { return snat.Packet{Dst: a(dst), Out: "eth0", Src: a("192.0.2.250")} }
	for _, c := range []struct {
		dst, sources, by string
	}{
		{"198.51.100.9", "[192.0.2.22]", "the rule for 198.51.100.0/24"},
		{"198.51.100.4", "[192.0.2.250]", "the rule for 198.51.100.4/32 keeps the natural source"},
		{"203.0.113.9", "[192.0.2.250]", "no rule applies (host), so the natural source"},
	} {
		j, err := Judge(nil, entries, choice(c.dst), pkt(c.dst))
		if err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(j.Sources); got != c.sources || j.By != c.by || j.Broken != "" || j.Cause() != "" {
			t.Errorf("Judge(%s): sources %s by %q, broken %q; want %s by %q, kept", c.dst, got, j.By, j.Broken, c.sources, c.by)
		}
	}
	// The natural source moved: the rule no longer takes the traffic.
	moved := pkt("198.51.100.9")
	moved.Src = a("192.0.2.251")
	j, err := Judge(nil, entries, choice("198.51.100.9"), moved)
	if err != nil || j.Broken == "" || j.Cause() != j.Broken {
		t.Errorf("Judge with a moved natural source: %+v, %v; want it broken", j, err)
	}
}
