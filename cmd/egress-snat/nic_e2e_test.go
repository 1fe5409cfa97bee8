package main

// Tests on the wire for another NIC (#10): which way a connection leaves H is
// judged by capture on each of G's interfaces (lab.Arrivals), and from which
// address by the probe, the way the acceptance run judges it.

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// ourRouting returns egress-snat's ip rules (priorities 7419-7423) and
// routes (proto 83) of both families.
func ourRouting(t *testing.T, l *lab.Lab) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []string{"-4", "-6"} {
		for line := range strings.Lines(l.Run(t, "ip", fam, "rule")) {
			if p, _, ok := strings.Cut(line, ":"); ok && p >= "7419" && p <= "7423" {
				b.WriteString(line)
			}
		}
		b.WriteString(l.Run(t, "ip", fam, "route", "show", "table", "all", "proto", "83"))
	}
	return b.String()
}

// wantWay checks that a new connection from H to dst:lab.TCPPort (bound
// to bind unless it is "") reaches the far side from src, and that it
// came in on G's dev and not on G's other interface.
func wantWay(t *testing.T, l *lab.Lab, dst, bind, src, dev string) {
	t.Helper()
	var seen string
	got := l.Arrivals(t, fmt.Sprintf("tcp dst port %d and dst host %s", lab.TCPPort, dst), func() {
		seen = l.SourceSeenFrom(t, dst, bind)
	})
	if seen != src || got[dev] == 0 || len(got) > 1 && got[other(dev)] != 0 {
		t.Errorf("new connection to %s (bind %q): far side saw source %q, want %q; packets in on G's interfaces %v, want only on %s",
			dst, bind, seen, src, got, dev)
	}
}

func other(dev string) string {
	if dev == "eth0" {
		return "eth1"
	}
	return "eth0"
}

// replyPort is where hostServer listens in H.
const replyPort = 7100

// hostServer listens in H on addr:replyPort and answers each connection
// with "hi\n", until t's cleanup: a service on H that G's side connects to.
func hostServer(t *testing.T, l *lab.Lab, addr string) {
	t.Helper()
	var ln net.Listener
	if err := lab.Do(l.Host, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(addr, fmt.Sprint(replyPort)))
		return err
	}); err != nil {
		t.Fatalf("listen in %s on %s: %v", l.Host, addr, err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetWriteDeadline(time.Now().Add(2 * time.Second))
			c.Write([]byte("hi\n"))
			c.Close()
		}
	}()
}

// farDial connects from G, bound to from (a far host on G's lo), to
// to:replyPort in H, and returns an error unless H's answer came back
// within timeout.
func farDial(l *lab.Lab, from, to string, timeout time.Duration) error {
	d := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(from), 0))}
	var c net.Conn
	if err := lab.Do(l.Gateway, func() (err error) {
		c, err = d.Dial("tcp", net.JoinHostPort(to, fmt.Sprint(replyPort)))
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "hi\n" {
		return fmt.Errorf("answer %q, want \"hi\"", line)
	}
	return nil
}

// wantReplyWay connects from G (bound to from) to H's to and checks that
// H's replies came in on G's dev and not on G's other interface.
func wantReplyWay(t *testing.T, l *lab.Lab, from, to, dev string) {
	t.Helper()
	var err error
	got := l.Arrivals(t, fmt.Sprintf("tcp src port %d and src host %s", replyPort, to), func() {
		err = farDial(l, from, to, 2*time.Second)
	})
	if err != nil || got[dev] == 0 || got[other(dev)] != 0 {
		t.Errorf("connection from G's %s to H's %s: %v; H's replies in on G's interfaces %v, want only on %s", from, to, err, got, dev)
	}
}

// localSource dials dst:lab.TCPPort from H and returns the socket's own
// address (getsockname), what the application itself sees.
func localSource(t *testing.T, l *lab.Lab, dst string) string {
	t.Helper()
	var c net.Conn
	if err := lab.Do(l.Host, func() (err error) {
		c, err = net.DialTimeout("tcp", net.JoinHostPort(dst, fmt.Sprint(lab.TCPPort)), 2*time.Second)
		return err
	}); err != nil {
		t.Errorf("dial %s from %s: %v", dst, l.Host, err)
		return ""
	}
	defer c.Close()
	return netip.MustParseAddrPort(c.LocalAddr().String()).Addr().Unmap().String()
}

// wantSameState fails with a diff when H's state is not before.
func wantSameState(t *testing.T, l *lab.Lab, what, before string) {
	t.Helper()
	if diff := cmp.Diff(before, l.HostState(t)); diff != "" {
		t.Errorf("%s: rules, routes or ruleset changed (-before +after):\n%s", what, diff)
	}
}

// TestNICEgress: a destination set to eth1's address leaves by eth1 from
// it while the rest still leaves by eth0; explain names the path, check
// is in sync; moving the destination back to an eth0 address takes it to
// eth0 and removes our routes and rules; clear restores everything.
func TestNICEgress(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	addForeignRules(t, l)
	before := l.HostState(t)
	beforeRouting := l.Routing(t)
	wantWay(t, l, "198.51.100.4", "", "192.0.2.250", "eth0")

	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	wantWay(t, l, "198.51.100.4", "", "203.0.113.130", "eth1")
	wantWay(t, l, "203.0.113.7", "", "192.0.2.250", "eth0")
	wantWay(t, l, "198.51.100.5", "", "192.0.2.250", "eth0")

	ours := ourRouting(t, l)
	for _, w := range []string{
		"7419:\tfrom all fwmark 0x7e5a7420 goto 7423",
		"7420:\tfrom 0.0.0.0 lookup 7420",
		"7423:\tfrom all nop",
		"7421:\tfrom all lookup main suppress_prefixlength 0",
		"7422:\tfrom 203.0.113.130 lookup 7422",
		"198.51.100.4 via 203.0.113.129 dev eth1 table 7420 src 203.0.113.130",
		"default via 203.0.113.129 dev eth1 table 7422",
	} {
		if !strings.Contains(ours, w) {
			t.Errorf("after set --to 203.0.113.130: want %q among our rules and routes:\n%s", w, ours)
		}
	}
	if rules := chainRules(l.Ruleset(t)); len(rules) != 0 {
		t.Errorf("a destination sent out of eth1 by route needs no SNAT rule, got %q", rules)
	}

	out := mustES(t, l, "explain", "--dst", "198.51.100.4")
	for _, w := range []string{"7420", "eth1", "203.0.113.130", "203.0.113.129"} {
		if !strings.Contains(out, w) {
			t.Errorf("explain --dst 198.51.100.4 after the set: want it to name %s:\n%s", w, out)
		}
	}
	if got := explain(t, l, "198.51.100.4"); got.Interface != "eth1" || got.Effective != "203.0.113.130" {
		t.Errorf("explain --json --dst 198.51.100.4: interface %q effective source %q, want eth1 and 203.0.113.130", got.Interface, got.Effective)
	}
	if out := mustES(t, l, "list"); !strings.Contains(out, "203.0.113.130") || !strings.Contains(out, "eth1") {
		t.Errorf("list after the set: want it to show 198.51.100.4 leaving by eth1 from 203.0.113.130:\n%s", out)
	}
	if r := es(t, l, "check"); r.code != checkInSync {
		t.Errorf("check right after the set: exit %d, want %d\n%s%s", r.code, checkInSync, r.stdout, r.stderr)
	}

	// The same set again changes nothing.
	mid := l.HostState(t)
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	wantSameState(t, l, "repeating the set", mid)

	// Back to an address of eth0.
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	wantWay(t, l, "198.51.100.4", "", "192.0.2.22", "eth0")
	if ours := ourRouting(t, l); ours != "" {
		t.Errorf("after moving 198.51.100.4 to 192.0.2.22 (eth0), rules and routes of ours remain:\n%s", ours)
	}
	if diff := cmp.Diff(beforeRouting, l.Routing(t)); diff != "" {
		t.Errorf("after moving 198.51.100.4 to eth0, rules and routes differ from before (-before +after):\n%s", diff)
	}

	mustES(t, l, "clear")
	wantSameState(t, l, "clear", before)
	wantWay(t, l, "198.51.100.4", "", "192.0.2.250", "eth0")
}

// TestNICReplies: traffic already carrying eth1's address (replies to a
// connection that came in on eth1, an application bound to it) leaves by
// eth1 once egress-snat sends a destination out of eth1. Without it, H's
// default route takes it out of eth0, where a strict upstream drops it.
func TestNICReplies(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	hostServer(t, l, "203.0.113.130")

	// G reaches H's 203.0.113.130 by eth1 (connected), from a far host
	// whose address H routes by its default route, eth0.
	wantReplyWay(t, l, "198.51.100.4", "203.0.113.130", "eth0")
	wantWay(t, l, "203.0.113.7", "203.0.113.130", "203.0.113.130", "eth0")

	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.5")
	wantReplyWay(t, l, "198.51.100.4", "203.0.113.130", "eth1")
	wantWay(t, l, "203.0.113.7", "203.0.113.130", "203.0.113.130", "eth1")
	// Traffic with eth0's addresses is unaffected, bound or not.
	wantWay(t, l, "203.0.113.7", "", "192.0.2.250", "eth0")
	wantWay(t, l, "203.0.113.7", "192.0.2.22", "192.0.2.22", "eth0")
	// ... and traffic from eth1's address to eth1's own subnet stays on it.
	wantWay(t, l, "203.0.113.129", "203.0.113.130", "203.0.113.130", "eth1")

	// Now G's upstream is strict: an asymmetric reply would be dropped.
	if out, err := runGateway(l, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"); err != nil {
		t.Fatalf("sysctl in %s: %v\n%s", l.Gateway, err, out)
	}
	wantReplyWay(t, l, "198.51.100.4", "203.0.113.130", "eth1")
	mustES(t, l, "clear")
	// The lab's round trip is microseconds: half a second is a loss.
	if err := farDial(l, "198.51.100.4", "203.0.113.130", 500*time.Millisecond); err == nil {
		t.Errorf("after clear, with G's strict rp_filter, the connection to H's 203.0.113.130 still got answers: the replies would have to leave by eth0 (is the lab still asymmetric?)")
	}
}

// TestNICKeepsOtherSourcesPaths: a destination sent out of eth1 takes eth1
// only for new connections that bound nothing. Traffic that already has an
// eth0 address (replies to connections to it, applications bound to it)
// keeps eth0, and traffic bound to eth1's address keeps eth1 even to a
// destination that a route of ours sends out of eth0.
func TestNICKeepsOtherSourcesPaths(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	hostServer(t, l, "192.0.2.250")
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.7", "--method", "route")
	wantWay(t, l, "198.51.100.4", "", "203.0.113.130", "eth1")
	wantReplyWay(t, l, "198.51.100.4", "192.0.2.250", "eth0")
	wantWay(t, l, "198.51.100.4", "192.0.2.22", "192.0.2.22", "eth0")
	wantWay(t, l, "203.0.113.7", "", "192.0.2.22", "eth0")
	wantWay(t, l, "203.0.113.7", "203.0.113.130", "203.0.113.130", "eth1")
	mustES(t, l, "clear")
}

// TestNICSenders: a sender's traffic (a client routed through H, a uid)
// leaves by eth1 from eth1's address when --to is on eth1, marked in the
// mangle table and routed by its mark; other senders and the host's own
// traffic keep eth0; clear restores rules, routes and every table.
func TestNICSenders(t *testing.T) {
	iptablesOnly(t, "its drift is a flushed mangle PREROUTING")
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	c := l.AddClient(t, lab.ClientOptions{Masquerade: true})
	other := l.AddClient(t, lab.ClientOptions{Masquerade: true})
	before := l.HostState(t)
	if got := c.SourceSeen(t, "198.51.100.4"); got != "192.0.2.250" {
		t.Fatalf("lab: the client leaves with %q before any rule", got)
	}
	mustES(t, l, "set", "--to", "203.0.113.130", "--from", c.Subnet4.String(), "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "203.0.113.130", "--uid", "4242", "--dst", "198.51.100.4")
	var seen string
	got := l.Arrivals(t, fmt.Sprintf("tcp dst port %d and dst host 198.51.100.4", lab.TCPPort), func() {
		seen = c.SourceSeen(t, "198.51.100.4")
	})
	if seen != "203.0.113.130" || got["eth1"] == 0 || got["eth0"] != 0 {
		t.Errorf("client with a --from rule for eth1's address: far side saw %q, packets in on %v; want 203.0.113.130 on eth1 only", seen, got)
	}
	got = l.Arrivals(t, fmt.Sprintf("tcp dst port %d and dst host 198.51.100.4", lab.TCPPort), func() {
		seen = l.SourceSeenAsUID(t, 4242, "198.51.100.4")
	})
	if seen != "203.0.113.130" || got["eth1"] == 0 || got["eth0"] != 0 {
		t.Errorf("uid 4242 with a --uid rule for eth1's address: far side saw %q, packets in on %v; want 203.0.113.130 on eth1 only", seen, got)
	}
	if got := other.SourceSeen(t, "198.51.100.4"); got != "192.0.2.250" {
		t.Errorf("another client: far side saw %q, want 192.0.2.250", got)
	}
	if got := c.SourceSeen(t, "203.0.113.7"); got != "192.0.2.250" {
		t.Errorf("the client to another destination: far side saw %q, want 192.0.2.250", got)
	}
	wantWay(t, l, "198.51.100.4", "", "192.0.2.250", "eth0")
	if r := es(t, l, "check"); r.code != 0 {
		t.Errorf("check right after the sets: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if out := mustES(t, l, "set", "--to", "203.0.113.130", "--from", c.Subnet4.String(), "--dst", "198.51.100.4"); !strings.Contains(out, "nothing to change") {
		t.Errorf("repeating the set: %s", out)
	}
	// Drift: a firewall that flushes mangle is repaired by the next write.
	l.Run(t, iptablesCmd(4), "-t", "mangle", "-F", "PREROUTING")
	if r := es(t, l, "check"); r.code != 1 {
		t.Errorf("check after mangle PREROUTING was flushed: exit %d, want 1\n%s", r.code, r.stdout)
	}
	mustES(t, l, "unset", "--from", c.Subnet4.String(), "--dst", "198.51.100.4")
	if got := c.SourceSeen(t, "198.51.100.4"); got != "192.0.2.250" {
		t.Errorf("after unset: the client left with %q, want 192.0.2.250", got)
	}
	mustES(t, l, "clear")
	after := l.HostState(t)
	if os.Getenv("EGRESS_SNAT_IPTABLES") == "legacy" {
		// As with nat: a legacy table egress-snat caused to be loaded
		// cannot be unloaded from a namespace, and stays listed, empty.
		after = strings.Replace(after, "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n", "", 1)
	}
	if after != before {
		t.Errorf("clear did not restore rules, routes and tables (-before +after):\n%s", cmp.Diff(before, after))
	}
}

// runGateway runs a command in G.
func runGateway(l *lab.Lab, name string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", l.Gateway, name}, args...)...).CombinedOutput()
	return string(out), err
}

// TestNICVia: --via names the gateway when the host has no route through
// the interface, or several; without it those cases are refused with exit
// 2, asking for --via, and nothing changes.
func TestNICVia(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondNIC()) // no route through eth1 at all
	before := l.HostState(t)

	refused := func(what string, want []string, args ...string) {
		t.Helper()
		r := es(t, l, args...)
		if r.code != exitUsage {
			t.Errorf("%s: egress-snat %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", what, strings.Join(args, " "), r.code, exitUsage, r.stdout, r.stderr)
		}
		for _, w := range want {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("%s: stderr %q, want it to name %q", what, r.stderr, w)
			}
		}
		wantSameState(t, l, what, before)
	}
	refused("no gateway on eth1", []string{"203.0.113.130", "eth1", "--via"}, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	refused("--via not on-link", []string{"192.0.2.1", "eth1"}, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4", "--via", "192.0.2.1")
	refused("--via nowhere", []string{"198.51.100.77", "eth1"}, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4", "--via", "198.51.100.77")
	wantWay(t, l, "198.51.100.4", "", "192.0.2.250", "eth0")

	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4", "--via", "203.0.113.129")
	wantWay(t, l, "198.51.100.4", "", "203.0.113.130", "eth1")
	if ours := ourRouting(t, l); !strings.Contains(ours, "198.51.100.4 via 203.0.113.129 dev eth1 table 7420") {
		t.Errorf("after --via 203.0.113.129: our routes:\n%s", ours)
	}

	// Two gateways through eth1: which one is meant is a guess.
	if out, err := runGateway(l, "ip", "addr", "add", "203.0.113.132/25", "dev", "eth1"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	l.Run(t, "ip", "route", "add", "default", "via", "203.0.113.129", "dev", "eth1", "metric", "500")
	l.Run(t, "ip", "route", "add", "198.51.100.128/25", "via", "203.0.113.132", "dev", "eth1")
	before = l.HostState(t)
	refused("two gateways on eth1", []string{"203.0.113.129", "203.0.113.132", "--via"}, "set", "--to", "203.0.113.131", "--dst", "203.0.113.7")
	mustES(t, l, "set", "--to", "203.0.113.131", "--dst", "203.0.113.7", "--via", "203.0.113.132")
	wantWay(t, l, "203.0.113.7", "", "203.0.113.131", "eth1")
	ours := ourRouting(t, l)
	for _, w := range []string{"203.0.113.7 via 203.0.113.132 dev eth1 table 7420", "from 203.0.113.131 lookup", "default via 203.0.113.132 dev eth1 table"} {
		if !strings.Contains(ours, w) {
			t.Errorf("after --via 203.0.113.132: want %q among our rules and routes:\n%s", w, ours)
		}
	}
	if neigh := l.Run(t, "ip", "neigh", "show", "203.0.113.132"); !strings.Contains(neigh, "lladdr") {
		t.Errorf("H never resolved the gateway 203.0.113.132 that --via named: %q", neigh)
	}
	wantWay(t, l, "198.51.100.4", "", "203.0.113.130", "eth1")
}

// TestNICIPv6: the same for IPv6, eth1's 2001:db8:1::/64.
func TestNICIPv6(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	gwAddrAdd(t, l, "2001:db8:ffff::5/128")
	addForeignRules(t, l)
	before := l.HostState(t)
	wantWay(t, l, "2001:db8:ffff::4", "", "2001:db8::250", "eth0")
	hostServer(t, l, "2001:db8:1::130")
	wantReplyWay(t, l, "2001:db8:ffff::4", "2001:db8:1::130", "eth0")

	mustES(t, l, "set", "--to", "2001:db8:1::130", "--dst", "2001:db8:ffff::4")
	wantWay(t, l, "2001:db8:ffff::4", "", "2001:db8:1::130", "eth1")
	wantWay(t, l, "2001:db8:ffff::5", "", "2001:db8::250", "eth0")
	wantWay(t, l, "198.51.100.4", "", "192.0.2.250", "eth0")
	wantWay(t, l, "2001:db8:ffff::5", "2001:db8:1::130", "2001:db8:1::130", "eth1")
	wantReplyWay(t, l, "2001:db8:ffff::4", "2001:db8:1::130", "eth1")
	ours := ourRouting(t, l)
	for _, w := range []string{
		"7420:\tfrom all lookup 7420",
		"7422:\tfrom 2001:db8:1::130 lookup 7422",
		"2001:db8:ffff::4 via 2001:db8:1::129 dev eth1 table 7420 src 2001:db8:1::130",
	} {
		if !strings.Contains(ours, w) {
			t.Errorf("after set --to 2001:db8:1::130: want %q among our rules and routes:\n%s", w, ours)
		}
	}
	out := mustES(t, l, "explain", "--dst", "2001:db8:ffff::4")
	for _, w := range []string{"7420", "eth1", "2001:db8:1::130"} {
		if !strings.Contains(out, w) {
			t.Errorf("explain --dst 2001:db8:ffff::4: want it to name %s:\n%s", w, out)
		}
	}

	mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")
	wantWay(t, l, "2001:db8:ffff::4", "", "2001:db8::22", "eth0")
	if ours := ourRouting(t, l); ours != "" {
		t.Errorf("after moving 2001:db8:ffff::4 to eth0, rules and routes of ours remain:\n%s", ours)
	}
	mustES(t, l, "clear")
	wantSameState(t, l, "clear", before)
}

// TestMethodRoute: --method route sends a destination from the chosen
// address by a route with src, the article's method one: the far side sees
// it, the application's own socket has it (no NAT), the nat chain holds
// nothing for it, and clear removes it.
func TestMethodRoute(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	addForeignRules(t, l)
	before := l.HostState(t)

	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4", "--method", "route")
	mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4", "--method", "route")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "203.0.113.7", "--method", "auto")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.5") // snat, for contrast
	wantSeen(t, l, map[string]string{
		"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22",
		"203.0.113.7": "192.0.2.23", "198.51.100.5": "192.0.2.23",
	})
	for dst, want := range map[string]string{
		"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22", "203.0.113.7": "192.0.2.23",
		"198.51.100.5": "192.0.2.250", // SNAT rewrites after the socket chose
	} {
		if got := localSource(t, l, dst); got != want {
			t.Errorf("socket connected to %s: getsockname %s, want %s", dst, got, want)
		}
	}
	rules := chainRules(l.Ruleset(t))
	for _, r := range rules {
		for _, d := range []string{"198.51.100.4", "2001:db8:ffff::4", "203.0.113.7"} {
			if strings.Contains(r, d) {
				t.Errorf("nat chain rule %q for %s, which a route handles", r, d)
			}
		}
	}
	if len(rules) != 1 || !strings.Contains(rules[0], "198.51.100.5") {
		t.Errorf("nat chain %q, want one SNAT rule, for 198.51.100.5", rules)
	}
	ours := ourRouting(t, l)
	for _, w := range []string{
		"198.51.100.4 via 192.0.2.1 dev eth0 table 7420 src 192.0.2.22",
		"203.0.113.7 via 192.0.2.1 dev eth0 table 7420 src 192.0.2.23",
		"2001:db8:ffff::4 via 2001:db8::1 dev eth0 table 7420 src 2001:db8::22",
	} {
		if !strings.Contains(ours, w) {
			t.Errorf("want %q among our routes:\n%s", w, ours)
		}
	}
	if strings.Contains(ours, "7422") {
		t.Errorf("a route on the same interface needs no reply rule or table:\n%s", ours)
	}
	if r := es(t, l, "check"); r.code != checkInSync {
		t.Errorf("check after --method route: exit %d, want %d\n%s%s", r.code, checkInSync, r.stdout, r.stderr)
	}
	out := mustES(t, l, "explain", "--dst", "198.51.100.4")
	for _, w := range []string{"7420", "192.0.2.22"} {
		if !strings.Contains(out, w) {
			t.Errorf("explain --dst 198.51.100.4: want it to name %s:\n%s", w, out)
		}
	}

	mustES(t, l, "clear")
	wantSameState(t, l, "clear", before)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"})
	if got := localSource(t, l, "198.51.100.4"); got != "192.0.2.250" {
		t.Errorf("after clear, getsockname %s, want 192.0.2.250", got)
	}
}

// TestNICClear: clear restores ip rule, ip -6 rule, every routing table
// and the ruleset exactly, after every kind of rule of #10 at once.
func TestNICClear(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	addForeignRules(t, l)
	before := l.HostState(t)
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "203.0.113.131", "--dst", "198.51.100.5", "--via", "203.0.113.129")
	mustES(t, l, "set", "--to", "2001:db8:1::130", "--dst", "2001:db8:ffff::4")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.7", "--method", "route")
	mustES(t, l, "set", "--to", "192.0.2.23")
	if strings.Count(ourRouting(t, l), "\n") < 10 {
		t.Fatalf("expected rules and routes of ours of both families:\n%s", ourRouting(t, l))
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "203.0.113.130", "198.51.100.5": "203.0.113.131", "2001:db8:ffff::4": "2001:db8:1::130", "203.0.113.7": "192.0.2.22"})
	mustES(t, l, "clear")
	wantSameState(t, l, "clear", before)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "198.51.100.5": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250", "203.0.113.7": "192.0.2.250"})
}

// TestNICBadInput: each bad input around another NIC, --via and --method
// exits 2, names the bad value, and changes no rule, route or ruleset.
func TestNICBadInput(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	addForeignRules(t, l)
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.5", "--method", "route")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "203.0.113.0/24")
	dir := t.TempDir()
	file := func(name, content string) string { return writeConfig(t, dir, name, content) }
	before := l.HostState(t)

	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"--via not on-link", []string{"set", "--to", "203.0.113.131", "--dst", "203.0.113.7", "--via", "192.0.2.1"}, []string{"192.0.2.1", "eth1"}},
		{"--via nowhere", []string{"set", "--to", "203.0.113.131", "--dst", "203.0.113.7", "--via", "198.51.100.77"}, []string{"198.51.100.77"}},
		{"--via of the other family", []string{"set", "--to", "203.0.113.131", "--dst", "203.0.113.7", "--via", "2001:db8:1::129"}, []string{"2001:db8:1::129"}},
		{"--via not an address", []string{"set", "--to", "203.0.113.131", "--dst", "203.0.113.7", "--via", "gw1"}, []string{"gw1"}},
		{"--via with a zone", []string{"set", "--to", "2001:db8:1::131", "--dst", "2001:db8:ffff::4", "--via", "fe80::1%eth1"}, []string{"fe80::1%eth1"}},
		{"--via another gateway on the same interface", []string{"set", "--to", "192.0.2.22", "--dst", "203.0.113.7", "--via", "192.0.2.2"}, []string{"192.0.2.2"}},
		{"unknown --method", []string{"set", "--to", "192.0.2.22", "--dst", "203.0.113.7", "--method", "bogus"}, []string{"bogus"}},
		{"--method route --spread", []string{"set", "--to", "192.0.2.22,192.0.2.23", "--spread", "--dst", "203.0.113.7", "--method", "route"}, []string{"route"}},
		{"--method route --from", []string{"set", "--to", "192.0.2.22", "--from", "10.77.0.0/24", "--dst", "203.0.113.7", "--method", "route"}, []string{"route"}},
		{"--method route --uid", []string{"set", "--to", "192.0.2.22", "--uid", "0", "--dst", "203.0.113.7", "--method", "route"}, []string{"route"}},
		{"another NIC for --from with --method route", []string{"set", "--to", "203.0.113.131", "--from", "10.77.0.0/24", "--dst", "203.0.113.7", "--method", "route"}, []string{"10.77.0.0/24", "route"}},
		{"another NIC with --spread", []string{"set", "--to", "203.0.113.130,203.0.113.131", "--spread", "--dst", "203.0.113.7"}, []string{"eth1"}},
		{"another NIC with --out", []string{"set", "--to", "203.0.113.131", "--dst", "203.0.113.7", "--out", "eth0"}, []string{"203.0.113.131", "eth0"}},
		{"another NIC, no route for the destination", []string{"set", "--to", "203.0.113.131", "--dst", "203.0.113.7", "--out", "nope0"}, []string{"nope0"}},
		{"file: via not on-link", []string{"apply", "-f", file("via.yaml", "rules:\n  - to: 203.0.113.131\n    dst: [203.0.113.7]\n    via: 192.0.2.1\n")}, []string{"192.0.2.1"}},
		{"file: via of the other family", []string{"apply", "-f", file("via6.yaml", "rules:\n  - to: 203.0.113.131\n    dst: [203.0.113.7]\n    via: 2001:db8:1::129\n")}, []string{"2001:db8:1::129"}},
		{"file: unknown method", []string{"apply", "-f", file("method.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [203.0.113.7]\n    method: nat\n")}, []string{"nat"}},
		{"file: method route for --from", []string{"apply", "-f", file("from.yaml", "rules:\n  - to: 192.0.2.22\n    from: [10.77.0.0/24]\n    dst: [203.0.113.7]\n    method: route\n")}, []string{"route"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantRefused(t, l, tt.args, tt.want)
			wantSameState(t, l, "egress-snat "+strings.Join(tt.args, " "), before)
		})
	}
	// A dry run of a good one changes nothing either.
	out := mustES(t, l, "set", "--dry-run", "--to", "203.0.113.131", "--dst", "203.0.113.7")
	if !strings.Contains(out, "7420") {
		t.Errorf("set --dry-run for another NIC: want the plan to show the route in table 7420:\n%s", out)
	}
	wantSameState(t, l, "set --dry-run", before)
	wantSeen(t, l, map[string]string{"198.51.100.4": "203.0.113.130", "198.51.100.5": "192.0.2.22", "203.0.113.7": "192.0.2.23"})
}

// TestNICCheck: check (no -f, and -f) reports a deleted rule or a flushed
// table of ours as drift.
func TestNICCheck(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondUplink())
	path := writeConfig(t, t.TempDir(), "nic.yaml", "rules:\n  - to: 203.0.113.130\n    dst: [198.51.100.4]\n")
	applyOK(t, l, path)
	for _, args := range [][]string{{"check"}, {"check", "-f", path}} {
		if r := es(t, l, args...); r.code != checkInSync {
			t.Errorf("%s right after apply: exit %d, want %d\n%s%s", strings.Join(args, " "), r.code, checkInSync, r.stdout, r.stderr)
		}
	}
	for _, drift := range []struct {
		name string
		ip   []string
	}{
		{"rule 7420 deleted", []string{"rule", "del", "pref", "7420"}},
		{"rule 7422 deleted", []string{"rule", "del", "pref", "7422"}},
		{"table 7420 flushed", []string{"route", "flush", "table", "7420"}},
		{"table 7422 flushed", []string{"route", "flush", "table", "7422"}},
	} {
		t.Run(drift.name, func(t *testing.T) {
			l.Run(t, "ip", drift.ip...)
			for _, args := range [][]string{{"check"}, {"check", "-f", path}} {
				r := es(t, l, args...)
				if r.code != checkDrift {
					t.Errorf("%s after %s: exit %d, want %d\n%s%s", strings.Join(args, " "), drift.name, r.code, checkDrift, r.stdout, r.stderr)
				} else {
					t.Logf("%s after %s:\n%s", strings.Join(args, " "), drift.name, r.stdout)
				}
			}
			applyOK(t, l, path)
			if r := es(t, l, "check", "-f", path); r.code != checkInSync {
				t.Errorf("check -f after apply repaired %s: exit %d\n%s%s", drift.name, r.code, r.stdout, r.stderr)
			}
		})
	}
}

// TestNICWatchRepairs: watch -f FILE repairs drift of our rules and routes
// (a deleted rule, a flushed table) within 2s, judged on the wire.
// Not parallel: the bound is on watch's latency, which other tests' load
// would stretch.
func TestNICWatchRepairs(t *testing.T) {
	l := newLab(t, lab.WithSecondUplink())
	path := writeConfig(t, t.TempDir(), "nic.yaml", `rules:
  - to: 203.0.113.130
    dst: [198.51.100.4]
  - to: 192.0.2.22
    dst: [198.51.100.5]
    method: route
`)
	w := relStartWatch(t, l, path)
	// way reports whether a new connection to dst (bound to bind) reaches
	// the far side from src by G's dev, and only by it.
	way := func(t *testing.T, dst, bind, src, dev string) bool {
		var seen string
		got := l.Arrivals(t, fmt.Sprintf("tcp dst port %d and dst host %s", lab.TCPPort, dst), func() {
			seen = l.SourceSeenFrom(t, dst, bind)
		})
		return seen == src && got[dev] > 0 && got[other(dev)] == 0
	}
	good := func(t *testing.T) bool {
		return way(t, "198.51.100.4", "", "203.0.113.130", "eth1") &&
			way(t, "203.0.113.7", "203.0.113.130", "203.0.113.130", "eth1") &&
			localSource(t, l, "198.51.100.5") == "192.0.2.22"
	}
	if !good(t) {
		t.Fatalf("watch -f: not as the file says at the start\nour rules and routes:\n%s", ourRouting(t, l))
	}
	want := ourRouting(t, l)
	for _, drift := range []struct {
		name string
		ip   []string
		// the way it shows: a connection that leaves wrongly meanwhile
		dst, bind, src, dev string
	}{
		{"rule 7420 deleted", []string{"rule", "del", "pref", "7420"}, "198.51.100.4", "", "192.0.2.250", "eth0"},
		{"table 7420 flushed", []string{"route", "flush", "table", "7420"}, "198.51.100.4", "", "192.0.2.250", "eth0"},
		{"rule 7422 deleted", []string{"rule", "del", "pref", "7422"}, "203.0.113.7", "203.0.113.130", "203.0.113.130", "eth0"},
		{"table 7422 flushed", []string{"route", "flush", "table", "7422"}, "203.0.113.7", "203.0.113.130", "203.0.113.130", "eth0"},
	} {
		t.Run(drift.name, func(t *testing.T) {
			w.freeze(t)
			l.Run(t, "ip", drift.ip...)
			wantWay(t, l, drift.dst, drift.bind, drift.src, drift.dev) // the drift is real
			start := time.Now()
			w.thaw(t)
			for !good(t) {
				if time.Since(start) > 5*time.Second {
					t.Fatalf("%s: not repaired after 5s\nour rules and routes:\n%s\nwatch log:\n%s", drift.name, ourRouting(t, l), w.p.stderr.String())
				}
			}
			took := time.Since(start)
			relFigure(t, "nic_watch_repair_ms", took.Milliseconds())
			if took > relReconverge {
				t.Errorf("%s: repaired on the wire after %s, want within %s", drift.name, took.Round(time.Millisecond), relReconverge)
			}
			if diff := cmp.Diff(want, ourRouting(t, l)); diff != "" {
				t.Errorf("%s: rules and routes after the repair (-want +got):\n%s", drift.name, diff)
			}
			wantWay(t, l, "198.51.100.4", "", "203.0.113.130", "eth1")
		})
	}
}
