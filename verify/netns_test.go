package verify_test

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/verify"
)

// checkIn verifies one flow started from inside the lab host.
func checkIn(t *testing.T, l *lab.Lab, s verify.Starter, p verify.Promise) verify.Result {
	t.Helper()
	ns, err := netns.GetFromName(l.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var r verify.Result
	if err := lab.Do(l.Host, func() error {
		r, err = verify.Check(s, conntrack.Netlink{Handle: h}, p, nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return r
}

func TestCheckInNamespace(t *testing.T) {
	l := lab.New(t)
	// TCP needs a listener: conntrack deletes an entry whose only reply
	// is a reset at once.
	l.StartProbe(t)
	a := netip.MustParseAddr
	l.Run(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-d", "198.51.100.4", "-s", "192.0.2.250", "-j", "SNAT", "--to-source", "192.0.2.22")
	promise := verify.Promise{Proto: conntrack.UDP, Dst: netip.MustParseAddrPort("198.51.100.4:33434"), Sources: []netip.Addr{a("192.0.2.22")}, By: "test rule"}
	if r := checkIn(t, l, verify.Local{}, promise); !r.Agree || r.Sent.Addr() != a("192.0.2.250") {
		t.Errorf("UDP with the rule working: %s (sent from %s)", r, r.Sent)
	}
	tcp := promise
	tcp.Proto = conntrack.TCP
	tcp.Dst = netip.MustParseAddrPort("198.51.100.4:7000")
	if r := checkIn(t, l, verify.Local{}, tcp); !r.Agree {
		t.Errorf("TCP with the rule working: %s", r)
	}

	cmd := exec.Command("ip", "netns", "exec", l.Host, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader("table ip thief {\n chain post { type nat hook postrouting priority 50; ip daddr 198.51.100.4 snat to 192.0.2.23; }\n}\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	if r := checkIn(t, l, verify.Local{}, promise); r.Agree || r.Got != a("192.0.2.23") {
		t.Errorf("with a thief at priority 50: %s, want it to leave with 192.0.2.23", r)
	}

	// A rule for one uid's traffic, judged with a socket of that uid.
	l.Run(t, "iptables", "-t", "nat", "-I", "POSTROUTING", "-d", "203.0.113.7", "-m", "owner", "--uid-owner", "65534", "-j", "SNAT", "--to-source", "192.0.2.23")
	byUID := verify.Promise{Proto: conntrack.UDP, Dst: netip.MustParseAddrPort("203.0.113.7:33434"), Sources: []netip.Addr{a("192.0.2.23")}, By: "uid rule"}
	nobody := uint32(65534)
	if r := checkIn(t, l, verify.Local{UID: &nobody}, byUID); !r.Agree {
		t.Errorf("as uid 65534: %s", r)
	}
	if r := checkIn(t, l, verify.Local{}, byUID); r.Agree || r.Got != a("192.0.2.250") {
		t.Errorf("as root the uid rule must not apply: %s", r)
	}
}

func TestForwardedInNamespace(t *testing.T) {
	l := lab.New(t)
	a := netip.MustParseAddr
	before := l.Run(t, "ip", "-o", "link") + l.Run(t, "ip", "route", "show", "table", "all")
	promise := verify.Promise{Proto: conntrack.UDP, Dst: netip.MustParseAddrPort("198.51.100.4:33434"), Sources: []netip.Addr{a("192.0.2.23")}, By: "from rule"}
	ns, err := netns.GetFromName(l.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	check := func(s verify.Starter) (verify.Result, error) {
		var r verify.Result
		err := lab.Do(l.Host, func() error {
			var err error
			r, err = verify.Check(s, conntrack.Netlink{Handle: h}, promise, nil)
			return err
		})
		return r, err
	}
	if _, err := check(verify.Forwarded{From: a("10.77.0.9")}); err == nil || !strings.Contains(err.Error(), "does not forward") {
		t.Errorf("with forwarding off: err = %v, want it to say the host does not forward", err)
	}
	l.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	l.Run(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.77.0.0/24", "-o", "eth0", "-j", "SNAT", "--to-source", "192.0.2.23")
	r, err := check(verify.Forwarded{From: a("10.77.0.9")})
	if err != nil || !r.Agree || r.Sent.Addr() != a("10.77.0.9") {
		t.Fatalf("forwarded from 10.77.0.9: %s, %v (sent from %s)", r, err, r.Sent)
	}
	l.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=0")
	if after := l.Run(t, "ip", "-o", "link") + l.Run(t, "ip", "route", "show", "table", "all"); after != before {
		t.Errorf("links or routes changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}
