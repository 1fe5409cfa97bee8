package nft

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netns"

	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// Kernel tests: each builds a lab (namespaces H and G, see package lab),
// writes our table into H over netlink, and asks G's probe which source
// each connection arrived from.

// openIn opens a Conn in the lab's host namespace, closed at t's cleanup.
func openIn(t *testing.T, l *lab.Lab) *Conn {
	t.Helper()
	ns, err := netns.GetFromName(l.Host)
	if err != nil {
		t.Fatalf("open netns %s: %v", l.Host, err)
	}
	t.Cleanup(func() { ns.Close() })
	c, err := Open(WithNetNS(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// apply makes our table in the kernel what entries render to, planning
// against what Read finds, and checks that Read then finds exactly that.
// It returns the program it ran.
func apply(t *testing.T, c *Conn, entries []snat.Entry) Program {
	t.Helper()
	want := mustRender(t, entries)
	have, _, err := c.Read()
	if err != nil {
		t.Fatal(err)
	}
	p := Plan(have, want)
	if _, err := c.Run(p); err != nil {
		t.Fatalf("run:\n%s\n%v", p.Show(), err)
	}
	wantRead(t, c, want)
	return p
}

func wantRead(t *testing.T, c *Conn, want *Table) {
	t.Helper()
	got, _, err := c.Read()
	if err != nil {
		t.Fatal(err)
	}
	if got != nil && len(got.Foreign) > 0 {
		t.Errorf("read back foreign things: %q", got.Foreign)
	}
	if diff := cmp.Diff(want, got, tableOpts); diff != "" {
		t.Errorf("read back (-want +got):\n%s", diff)
	}
}

func wantSource(t *testing.T, l *lab.Lab, dst, want string) {
	t.Helper()
	if got := l.SourceSeen(t, dst); got != want {
		t.Errorf("connection to %s left with %q, want %q", dst, got, want)
	}
}

// fillers are n /bits destinations in 198.18.0.0/15, which the lab routes
// but nothing answers: they make groups into sets.
func fillers(n, bits int, natural, to string) []snat.Entry {
	var es []snat.Entry
	for i := range n {
		a := netip.AddrFrom4([4]byte{198, 18 + byte(i>>16&1), byte(i >> 8), byte(i)})
		if bits == 24 {
			a = netip.AddrFrom4([4]byte{198, 18 + byte(i>>8&1), byte(i), 0})
		}
		p, _ := a.Prefix(bits)
		es = append(es, entry(p.String(), natural, to))
	}
	return es
}

func TestWireHost(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	apply(t, c, []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")})
	wantSource(t, l, "198.51.100.4", "192.0.2.22")
	wantSource(t, l, "198.51.100.5", "192.0.2.250")
	// An application that binds another address keeps it.
	if got := l.SourceSeenFrom(t, "198.51.100.4", "192.0.2.23"); got != "192.0.2.23" {
		t.Errorf("bound to 192.0.2.23: left with %q", got)
	}
	// The rule's counter counted the one connection it translated.
	got, _, err := c.ReadShape()
	if err != nil {
		t.Fatal(err)
	}
	if r := got.Chain(ChainNAT).Rules[0]; r.Packets != 1 {
		t.Errorf("counter: %d packets, want 1 (the first packet of the one connection)", r.Packets)
	}
}

// TestWireLongestPrefixAcrossSets: a /32 in one set wins over its /24 in
// another, which wins over the rule for every destination; a miss in a set
// falls through to the next prefix length.
func TestWireLongestPrefixAcrossSets(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	es := fillers(10, 32, "192.0.2.250", "192.0.2.23")
	es = append(es, entry("198.51.100.5", "192.0.2.250", "192.0.2.23"))
	es = append(es, fillers(10, 24, "192.0.2.250", "192.0.2.22")...)
	es = append(es, entry("198.51.100.0/24", "192.0.2.250", "192.0.2.22"))
	es = append(es, entry("0.0.0.0/0", "192.0.2.250", "198.18.0.10"))
	apply(t, c, snat.Normalize(es))
	tbl, _, _ := c.ReadShape()
	if len(tbl.Sets) != 2 {
		t.Fatalf("want the /32s and the /24s in a set each:\n%s", tbl)
	}
	wantSource(t, l, "198.51.100.5", "192.0.2.23")
	wantSource(t, l, "198.51.100.4", "192.0.2.22")
	wantSource(t, l, "203.0.113.7", "198.18.0.10")
}

func TestWireKeepNatural(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	apply(t, c, snat.Normalize([]snat.Entry{
		entry("198.51.100.0/24", "192.0.2.250", "192.0.2.22"),
		entry("198.51.100.5", "192.0.2.250", "192.0.2.250"), // its natural source: a carve-out
	}))
	wantSource(t, l, "198.51.100.4", "192.0.2.22")
	wantSource(t, l, "198.51.100.5", "192.0.2.250")
}

func TestWireSpread(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	apply(t, c, []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22", "192.0.2.23")})
	l.ResetSeen()
	for range 10 {
		l.SourceSeen(t, "198.51.100.4")
	}
	if seen := l.Seen(); seen["192.0.2.22"] != 5 || seen["192.0.2.23"] != 5 {
		t.Errorf("10 connections came from %v, want 5 from each address in turn", seen)
	}
}

// TestWireWeightedSpread: a weighted spread's map gives each address its
// turns: 3:1 over 40 connections is 30 and 10, exactly.
func TestWireWeightedSpread(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	to, err := snat.Weigh(addrs("192.0.2.22", "192.0.2.23"), []int{3, 1})
	if err != nil {
		t.Fatal(err)
	}
	e := entry("198.51.100.4", "192.0.2.250")
	e.To = to
	apply(t, c, []snat.Entry{e})
	l.ResetSeen()
	for range 40 {
		l.SourceSeen(t, "198.51.100.4")
	}
	if seen := l.Seen(); seen["192.0.2.22"] != 30 || seen["192.0.2.23"] != 10 {
		t.Errorf("40 connections came from %v, want 30 from .22 and 10 from .23", seen)
	}
	have, _, err := c.Read()
	if err != nil {
		t.Fatal(err)
	}
	if es := have.entries(snat.IPv4, routes.State{}); len(es) != 1 || !es[0].Equal(e) {
		t.Errorf("read back %v, want %v", es, e)
	}
}

func TestWireIPv6(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	apply(t, c, []snat.Entry{{Match: snat.Match{Dst: pfx("2001:db8:ffff::/48"), Out: "eth0"}, Natural: addr("2001:db8::250"), To: addrs("2001:db8::22")}})
	wantSource(t, l, "2001:db8:ffff::4", "2001:db8::22")
	wantSource(t, l, "198.51.100.4", "192.0.2.250")
}

// TestWireHold: a rule standing by translates the connections conntrack
// knows and drops the clients' new ones; activated, it lets them through,
// translated. The hold reads back as held entries.
func TestWireHold(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	cl := l.AddClient(t, lab.ClientOptions{})
	c := openIn(t, l)
	held := senderEntry(snat.From(cl.Subnet4), "0.0.0.0/0", "", "192.0.2.23")
	held.Hold = true
	apply(t, c, []snat.Entry{held})
	if got := cl.SourceSeen(t, "198.51.100.4"); got != "" {
		t.Errorf("standing by, a new connection got through, from %q", got)
	}
	have, _, err := c.Read()
	if err != nil {
		t.Fatal(err)
	}
	es := have.entries(snat.IPv4, routes.State{})
	if len(es) != 1 || !es[0].Hold {
		t.Fatalf("read back %v, want the one held entry", es)
	}
	if r := have.Chain(ChainHold).Rules[0]; r.Packets == 0 {
		t.Errorf("the hold counted no dropped packet")
	}
	held.Hold = false
	apply(t, c, []snat.Entry{held})
	if got := cl.SourceSeen(t, "198.51.100.4"); got != "192.0.2.23" {
		t.Errorf("activated: %q, want 192.0.2.23", got)
	}
}

// TestWireFrom: forwarded traffic from a client's prefix is translated;
// the host's own traffic from an address inside that prefix is not.
func TestWireFrom(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	cl := l.AddClient(t, lab.ClientOptions{})
	c := openIn(t, l)
	apply(t, c, []snat.Entry{
		senderEntry(snat.From(cl.Subnet4), "198.51.100.4", "", "192.0.2.23"),
		senderEntry(snat.From(cl.Subnet6), "2001:db8:ffff::/48", "", "2001:db8::23"),
	})
	if got := cl.SourceSeen(t, "198.51.100.4"); got != "192.0.2.23" {
		t.Errorf("client to 198.51.100.4: %q, want 192.0.2.23", got)
	}
	if got := cl.SourceSeen(t, "2001:db8:ffff::4"); got != "2001:db8::23" {
		t.Errorf("client to 2001:db8:ffff::4: %q, want 2001:db8::23", got)
	}
	if got := cl.SourceSeen(t, "198.51.100.5"); got != "" {
		t.Errorf("client to 198.51.100.5, which no rule takes, got an answer from %q", got)
	}
	// H's own address in the client's subnet is local: no rewrite, so G
	// cannot answer it.
	if got := l.SourceSeenFrom(t, "198.51.100.4", "10.88.0.1"); got != "" {
		t.Errorf("H bound to 10.88.0.1 was rewritten to %q", got)
	}
}

func TestWireUID(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	apply(t, c, []snat.Entry{senderEntry(snat.UID(4242), "198.51.100.4", "192.0.2.250", "192.0.2.22")})
	if got := l.SourceSeenAsUID(t, 4242, "198.51.100.4"); got != "192.0.2.22" {
		t.Errorf("uid 4242: %q, want 192.0.2.22", got)
	}
	if got := l.SourceSeenAsUID(t, 4243, "198.51.100.4"); got != "192.0.2.250" {
		t.Errorf("uid 4243: %q, want 192.0.2.250", got)
	}
}

func TestWireCgroup(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	cg := lab.NewCgroup(t)
	apply(t, c, []snat.Entry{senderEntry(snat.Cgroup(cg), "198.51.100.4", "192.0.2.250", "192.0.2.23")})
	if got := l.SourceSeenInCgroup(t, cg, "198.51.100.4"); got != "192.0.2.23" {
		t.Errorf("in cgroup %s: %q, want 192.0.2.23", cg, got)
	}
	wantSource(t, l, "198.51.100.4", "192.0.2.250")
}

// TestWireMarks: a uid's traffic marked out of eth1 leaves by eth1 with
// eth1's address; everyone else's still leaves by eth0. The routes the
// mark selects are package routes' (added here as it would).
func TestWireMarks(t *testing.T) {
	l := lab.New(t, lab.WithSecondUplink())
	l.StartProbe(t)
	c := openIn(t, l)
	l.Run(t, "ip", "rule", "add", "pref", "7422", "fwmark", "0x1000000/0x7f000000", "lookup", "7422")
	l.Run(t, "ip", "route", "add", "default", "via", "203.0.113.129", "dev", "eth1", "table", "7422")
	e := senderEntry(snat.UID(4242), "198.51.100.0/24", "192.0.2.250", "203.0.113.130")
	e.Out, e.Via, e.Replies, e.Marked = "eth1", addr("203.0.113.129"), true, true
	apply(t, c, []snat.Entry{e})
	var uid, root string
	ways := l.Arrivals(t, "tcp dst port 7000 and tcp[tcpflags] & tcp-syn != 0", func() {
		uid = l.SourceSeenAsUID(t, 4242, "198.51.100.4")
	})
	if uid != "203.0.113.130" || ways["eth1"] != 1 || ways["eth0"] != 0 {
		t.Errorf("uid 4242: left with %q, SYNs by interface %v; want 203.0.113.130 by eth1", uid, ways)
	}
	ways = l.Arrivals(t, "tcp dst port 7000 and tcp[tcpflags] & tcp-syn != 0", func() {
		root = l.SourceSeen(t, "198.51.100.4")
	})
	if root != "192.0.2.250" || ways["eth0"] != 1 || ways["eth1"] != 0 {
		t.Errorf("root: left with %q, SYNs by interface %v; want 192.0.2.250 by eth0", root, ways)
	}
}

// TestWireOneElementChange: moving one destination of ten thousand (three
// element messages a set) from one address to another is one element
// deleted and one added, in one transaction, and takes effect.
func TestWireOneElementChange(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	c := openIn(t, l)
	es := append(fillers(10000, 32, "192.0.2.250", "192.0.2.22"), entry("198.51.100.4", "192.0.2.250", "192.0.2.22"))
	for i := range 20 {
		es = append(es, entry(fmt.Sprintf("198.19.200.%d", i), "192.0.2.250", "192.0.2.23"))
	}
	es = append(es, entry("198.51.100.5", "192.0.2.250", "192.0.2.23"))
	apply(t, c, es)
	wantSource(t, l, "198.51.100.4", "192.0.2.22")
	moved := slices.Clone(es)
	moved[10000].To = addrs("192.0.2.23")
	p := apply(t, c, moved)
	if got := showSteps(p); got != "nft.DeleteElements nft.AddElements" {
		t.Errorf("steps of the change: %s\n%s", got, p.Show())
	}
	wantSource(t, l, "198.51.100.4", "192.0.2.23")
}

// TestWireGeneration: the generation is the canary. Our write moves it by
// one; anyone's commit moves it; a program run at a stale generation is
// refused whole.
func TestWireGeneration(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	g0, err := c.Generation()
	if err != nil {
		t.Fatal(err)
	}
	g1, err := c.Run(Plan(nil, mustRender(t, []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")})))
	if err != nil {
		t.Fatal(err)
	}
	if now, _ := c.Generation(); g1 != g0+1 || now != g1 {
		t.Errorf("generation %d before, %d returned, %d now; want one more", g0, g1, now)
	}
	l.Run(t, "nft", "add", "table", "ip", "someone-else")
	if now, _ := c.Generation(); now == g1 {
		t.Errorf("generation %d unchanged by another table", now)
	}
	have, _, _ := c.Read()
	err = c.RunAt(Plan(have, mustRender(t, []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.23")})), g1)
	if !errors.Is(err, ErrChanged) {
		t.Errorf("run at a stale generation: %v, want ErrChanged", err)
	}
	wantRead(t, c, have)
}

// TestWireStalePlan: a plan made against a table that is not the kernel's
// (an element to delete that is not there) fails whole with ErrChanged,
// naming the step, and changes nothing.
func TestWireStalePlan(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	es := fillers(20, 32, "192.0.2.250", "192.0.2.22")
	apply(t, c, es)
	have, _, _ := c.Read()
	believed := mustRender(t, append(slices.Clone(es), entry("198.51.100.9", "192.0.2.250", "192.0.2.22")))
	p := Plan(believed, mustRender(t, es[:10]))
	_, err := c.Run(p)
	var se *StepError
	if !errors.Is(err, ErrChanged) || !errors.As(err, &se) || !strings.Contains(se.Step, "delete element") {
		t.Errorf("stale plan: %v, want ErrChanged naming the element deletion", err)
	}
	wantRead(t, c, have)
}

// TestWireDeleteLeavesRulesetAsBefore: with foreign rules around, writing
// our table and deleting it leaves nft list ruleset as it was, and a
// second delete is no error.
func TestWireDeleteLeavesRulesetAsBefore(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	l.Run(t, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
	l.Run(t, "nft", "add", "table", "inet", "mine")
	before := l.Run(t, "nft", "list", "ruleset")
	e := senderEntry(snat.UID(4242), "198.51.100.0/24", "192.0.2.250", "192.0.2.22")
	apply(t, c, append(fillers(20, 32, "192.0.2.250", "192.0.2.23"), e))
	if err := c.Delete(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(before, l.Run(t, "nft", "list", "ruleset")); diff != "" {
		t.Errorf("ruleset after delete (-before +after):\n%s", diff)
	}
	if err := c.Delete(); err != nil {
		t.Errorf("second delete: %v", err)
	}
	if got, _, err := c.Read(); got != nil || err != nil {
		t.Errorf("read after delete: %v, %v", got, err)
	}
}

// TestWireAheadOfIptablesNFT: at priority 90 our chain decides before
// iptables-nft's nat POSTROUTING (100) for the traffic our rules take;
// other traffic, and traffic we keep, goes on to it.
func TestWireAheadOfIptablesNFT(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	cl := l.AddClient(t, lab.ClientOptions{Masquerade: true})
	c := openIn(t, l)
	l.Run(t, "iptables-nft", "-t", "nat", "-I", "POSTROUTING", "1", "-s", "192.0.2.250", "-o", "eth0", "-j", "SNAT", "--to-source", "198.18.0.10")
	apply(t, c, snat.Normalize([]snat.Entry{
		entry("198.51.100.0/24", "192.0.2.250", "192.0.2.22"),
		entry("198.51.100.5", "192.0.2.250"), // kept: goes on to theirs
		senderEntry(snat.From(cl.Subnet4), "198.51.100.4", "", "192.0.2.23"),
	}))
	wantSource(t, l, "198.51.100.4", "192.0.2.22")
	wantSource(t, l, "198.51.100.5", "198.18.0.10")
	wantSource(t, l, "203.0.113.7", "198.18.0.10")
	if got := cl.SourceSeen(t, "198.51.100.4"); got != "192.0.2.23" {
		t.Errorf("client to 198.51.100.4: %q, want ours, 192.0.2.23, ahead of the MASQUERADE", got)
	}
	if got := cl.SourceSeen(t, "203.0.113.7"); got != "192.0.2.250" {
		t.Errorf("client to 203.0.113.7: %q, want the MASQUERADE's 192.0.2.250", got)
	}
}

// TestWireShowIsNftInput: the program's text, given to nft -f, makes the
// same table as the program sent over netlink (all but the cgroup match,
// which nft cannot write).
func TestWireShowIsNftInput(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	marked := senderEntry(snat.UID(4242), "198.51.100.0/24", "192.0.2.250", "192.0.2.23")
	marked.Marked, marked.Replies = true, true
	es := snat.Normalize(append(fillers(20, 24, "192.0.2.250", "192.0.2.22"),
		entry("198.51.100.4", "192.0.2.250", "192.0.2.22", "192.0.2.23"),
		entry("198.51.100.0/24", "192.0.2.250"),
		entry("0.0.0.0/0", "192.0.2.250", "192.0.2.24"),
		marked,
		senderEntry(snat.From(pfx("10.88.0.0/24")), "198.51.100.4", "", "192.0.2.23"),
		snat.Entry{Match: snat.Match{Dst: pfx("2001:db8:ffff::/48"), Out: "eth0"}, Natural: addr("2001:db8::250"), To: addrs("2001:db8::22")},
	))
	p := Plan(nil, mustRender(t, es))
	if _, err := c.Run(p); err != nil {
		t.Fatal(err)
	}
	ours := l.Run(t, "nft", "list", "table", "inet", TableName)
	if err := c.Delete(); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := l.RunErr("sh", "-c", "nft -f - <<'EOF'\n"+p.Show()+"EOF\n")
	if code != 0 {
		t.Fatalf("nft -f of the program: exit %d\n%s%s\n%s", code, stdout, stderr, p.Show())
	}
	theirs := l.Run(t, "nft", "list", "table", "inet", TableName)
	// nft writes the table's comment only when given one.
	ours = regexp.MustCompile(`(?m)^\tcomment .*\n`).ReplaceAllString(ours, "")
	if diff := cmp.Diff(theirs, ours); diff != "" {
		t.Errorf("nft list table (-nft -f +netlink):\n%s", diff)
	}
}

// echoServer listens on G at port 7100 and, for each connection, writes
// the peer's address, then echoes lines until the connection ends.
func echoServer(t *testing.T, l *lab.Lab) {
	t.Helper()
	var ln net.Listener
	if err := lab.Do(l.Gateway, func() (err error) {
		ln, err = net.Listen("tcp4", "0.0.0.0:7100")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				fmt.Fprintf(conn, "%s\n", conn.RemoteAddr().(*net.TCPAddr).IP)
				r := bufio.NewReader(conn)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					conn.Write([]byte(line))
				}
			}()
		}
	}()
}

// liveConnection opens a TCP connection from H to G's echo server through
// our rule for 198.51.100.4 (to 192.0.2.22), and returns a function that
// sends a line and reads its echo.
func liveConnection(t *testing.T, l *lab.Lab, c *Conn) func(string) (string, error) {
	t.Helper()
	echoServer(t, l)
	apply(t, c, []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")})
	var conn net.Conn
	if err := lab.Do(l.Host, func() (err error) {
		conn, err = net.DialTimeout("tcp4", "198.51.100.4:7100", 2*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r := bufio.NewReader(conn)
	if peer, err := r.ReadString('\n'); err != nil || strings.TrimSpace(peer) != "192.0.2.22" {
		t.Fatalf("the connection arrived from %q (%v), want 192.0.2.22", peer, err)
	}
	echo := func(msg string) (string, error) {
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := fmt.Fprintln(conn, msg); err != nil {
			return "", err
		}
		line, err := r.ReadString('\n')
		return strings.TrimSpace(line), err
	}
	if got, err := echo("one"); got != "one" || err != nil {
		t.Fatalf("echo: %q, %v", got, err)
	}
	return echo
}

// afterRelease waits for the kernel to release what a transaction
// deleted: it does so after the commit, in a work queue, after an RCU
// grace period, and only then does the last nat statement give up
// conntrack. Right after the commit, a connection would still be
// translated either way.
func afterRelease() { time.Sleep(time.Second) }

// TestWireConnectionsOutliveTheRules: a live TCP connection NATed by our
// rule stays translated when the rule goes, because the nat chain stays
// with its keeper rule; when the table goes (and no other nat chain and
// conntrack user is in the namespace), its packets leave untranslated and
// the far side resets it.
func TestWireConnectionsOutliveTheRules(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	echo := liveConnection(t, l, c)
	apply(t, c, nil)
	afterRelease()
	if got, err := echo("two"); got != "two" || err != nil {
		t.Errorf("echo with no rule but the keeper: %q, %v; want the connection alive", got, err)
	}
	if err := c.Delete(); err != nil {
		t.Fatal(err)
	}
	if got, err := echo("three"); err == nil {
		t.Errorf("echo with the table deleted: %q; want the connection reset", got)
	}
}

// TestWireKeeperIsNeeded: the reason for the keeper. With the nat chain
// left empty, conntrack, whose last user the nat statement was, is off in
// the namespace, and the connection is reset just the same.
func TestWireKeeperIsNeeded(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	echo := liveConnection(t, l, c)
	if _, err := c.Run(Program{Steps: []Step{FlushChain{Chain: ChainNAT}}}); err != nil {
		t.Fatal(err)
	}
	afterRelease()
	if got, err := echo("two"); err == nil {
		t.Errorf("echo with an empty nat chain: %q; want the connection reset (did the kernel change?)", got)
	}
}

// TestWireCountsCanary: the kernel's element counts, read without a dump,
// tell a set that lost an element behind our back.
func TestWireCountsCanary(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	es := fillers(5000, 32, "192.0.2.250", "192.0.2.22")
	apply(t, c, es)
	want := mustRender(t, es)
	got, _, err := c.ReadShape()
	if err != nil {
		t.Fatal(err)
	}
	if got.Set(want.Sets[0].Name).Elems.Len() != 0 {
		t.Errorf("ReadShape dumped elements")
	}
	if !got.CountsMatch(want) {
		t.Fatalf("counts of a table just written differ: %+v", got.Sets)
	}
	l.Run(t, "nft", "delete", "element", "inet", TableName, want.Sets[0].Name, "{ 198.18.0.7 }")
	if got, _, _ = c.ReadShape(); got.CountsMatch(want) {
		t.Errorf("counts match after an element was deleted by hand: %+v", got.Sets)
	}
}

// TestWirePool: a pool's rule of each stickiness reads back from the
// kernel as written, and its connections leave from the pool (the lab's G
// does not route the pool back, so only the source is checked: probe
// answers never arrive; see cmd/egress-snat's TestPoolSpread for the
// whole round trip).
func TestWirePool(t *testing.T) {
	l := lab.New(t)
	c := openIn(t, l)
	var entries []snat.Entry
	for i, s := range snat.Stickies {
		for j, p := range []string{"2001:db8:1::/64", "2001:db8:2::/100", "2001:db8:3::/124"} {
			e := snat.Entry{Match: snat.Match{Dst: pfx(fmt.Sprintf("2001:db8:ff%d%d::/48", i, j)), Out: "eth0"}, Natural: addr("2001:db8::250"), Pool: pfx(p), Sticky: s}
			if s == snat.StickyPeriod {
				e.To = []netip.Addr{snat.PoolAddr(pfx(p), 7)}
			}
			entries = append(entries, e)
		}
	}
	snat.SortEntries(entries)
	apply(t, c, entries)
}

// TestWireRepairKnowsTheElements: a chain flushed by hand while every set
// keeps its count is read, knowing the last plan, without dumping a set,
// and the repair rewrites the chain alone; a set whose count changed is
// read whole.
func TestWireRepairKnowsTheElements(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	b := &Backend{Conn: openIn(t, l)}
	es := append(fillers(5000, 32, "192.0.2.250", "192.0.2.22"), entry("198.51.100.4", "192.0.2.250", "192.0.2.22"))
	empty, err := b.Read(nil)
	if err != nil {
		t.Fatal(err)
	}
	written := b.Plan(empty, snat.Want{Entries: es})
	runAll(t, written)
	l.Run(t, "nft", "flush", "chain", "inet", TableName, ChainNAT)

	have, err := b.Read(written)
	if err != nil {
		t.Fatal(err)
	}
	tbl := have.(*Snapshot).Table
	if n := tbl.Chain(ChainNAT); n == nil || len(n.Rules) != 0 {
		t.Fatalf("the flushed chain as read: %+v", n)
	}
	if tbl.Elements() != written.(*Change).want.Elements() {
		t.Errorf("read %d elements, want the %d written", tbl.Elements(), written.(*Change).want.Elements())
	}
	repair := b.Plan(have, snat.Want{Entries: es})
	for _, s := range repair.(*Change).prog.Steps {
		if _, ok := s.(AddElements); ok {
			t.Errorf("the repair adds elements: %s", repair.(*Change).prog.Show())
		}
	}
	runAll(t, repair)
	wantSource(t, l, "198.51.100.4", "192.0.2.22")

	// A count that changed is the full read's.
	l.Run(t, "nft", "delete", "element", "inet", TableName, written.(*Change).want.Sets[0].Name, "{ 198.18.0.7 }")
	l.Run(t, "nft", "flush", "chain", "inet", TableName, ChainNAT)
	if have, err = b.Read(repair); err != nil {
		t.Fatal(err)
	}
	if got, want := have.(*Snapshot).Table.Elements(), written.(*Change).want.Elements()-1; got != want {
		t.Errorf("after a hand delete, read %d elements, want %d (a full read)", got, want)
	}
}

// runAll runs a plan's one transaction.
func runAll(t *testing.T, p snat.NATPlan) {
	t.Helper()
	c := p.(*Change)
	if _, err := c.conn.Run(c.prog); err != nil {
		t.Fatalf("run:\n%s\n%v", c.prog.Show(), err)
	}
}
