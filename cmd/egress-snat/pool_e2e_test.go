package main

// End-to-end tests of a pool (--to 2001:db8:1::/64): G routes the prefix to
// H, and the far side records the sources new connections arrive from.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/internal/lab"
)

const testPool = "2001:db8:1::/64"

// routePool has G route the pool to H, as the upstream router of a routed
// /64 does.
func routePool(t *testing.T, l *lab.Lab) {
	t.Helper()
	args := []string{"-n", l.Gateway, "-6", "route", "add", testPool, "via", "2001:db8::250", "dev", "eth0"}
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// askUnused connects from G to port 9 of an address of the pool that no
// connection uses: H, taking the address as its own (the AnyIP route),
// refuses it (nothing listens); without the route H would send it back.
func askUnused(l *lab.Lab) error {
	return lab.Do(l.Gateway, func() error {
		c, err := net.DialTimeout("tcp6", "[2001:db8:1::abcd]:9", 2*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// poolSources makes n connections from H to dst and returns the sources
// the far side saw, failing the test for a connection that failed or a
// source outside the pool.
func poolSources(t *testing.T, l *lab.Lab, dst string, n int) map[string]int {
	t.Helper()
	pool := netip.MustParsePrefix(testPool)
	seen := map[string]int{}
	failed := 0
	for range n {
		s := l.SourceSeen(t, dst)
		if s == "" {
			failed++
			continue
		}
		if a, err := netip.ParseAddr(s); err != nil || !pool.Contains(a) || a == pool.Addr() {
			t.Errorf("a connection to %s left from %s, not an address of pool %s", dst, s, pool)
		}
		seen[s]++
	}
	if failed > 0 {
		t.Errorf("%d of %d connections to %s failed", failed, n, dst)
	}
	return seen
}

// TestPoolSpread: with --to 2001:db8:1::/64, connections leave from
// addresses of the prefix and their replies come back. Per connection, the
// nftables backend gives each connection its own random address; the
// iptables backends give one sender talking to one destination 16
// addresses in turn (the kernel hashes only the addresses of a connection
// into an SNAT range: backend/iptables/pool.go). Per destination, each
// destination gets one address, and destinations get different ones. The
// pool's AnyIP local route makes H answer for every address of it, and
// unset removes it. list and explain show the pool.
func TestPoolSpread(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	routePool(t, l)
	const conns = 300
	dsts := make([]string, 32)
	for i := range dsts {
		dsts[i] = fmt.Sprintf("2001:db8:ffff::%x", 0x100+i)
		gwAddrAdd(t, l, dsts[i]+"/128")
	}

	mustES(t, l, "set", "--to", testPool, "--dst", "2001:db8:ffff::/48")
	seen := poolSources(t, l, "2001:db8:ffff::4", conns)
	t.Logf("%s, per connection: %d connections from H to 2001:db8:ffff::4 left from %d distinct addresses", backend(t), conns, len(seen))
	if backend(t) == "nftables" {
		if len(seen) < conns*95/100 {
			t.Errorf("per connection: %d connections left from %d addresses, want nearly each its own", conns, len(seen))
		}
	} else if len(seen) != 16 {
		t.Errorf("per connection: %d connections left from %d addresses, want the 16 of the rule's slices: %v", conns, len(seen), seen)
	}

	// The local route of the pool, ours, and H answering for an address
	// no connection uses.
	routing := l.Routing(t)
	if !strings.Contains(routing, "local "+testPool+" dev lo table 7420 proto 83") {
		t.Errorf("routing:\n%s\nwant the pool's local route in table 7420, proto 83", routing)
	}
	if err := askUnused(l); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("a connection from G to 2001:db8:1::abcd, an unused address of the pool: %v, want it refused by H", err)
	}

	// list and explain.
	var got struct {
		Rules []struct {
			Dst    string   `json:"dst"`
			To     []string `json:"to"`
			Pool   string   `json:"pool"`
			Sticky string   `json:"sticky"`
		} `json:"rules"`
	}
	out := mustES(t, l, "list", "--json")
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("list --json: %v\n%s", err, out)
	}
	if len(got.Rules) != 1 || got.Rules[0].Pool != testPool || got.Rules[0].Sticky != "connection" || len(got.Rules[0].To) != 0 {
		t.Errorf("list --json rules %+v, want one for pool %s per connection", got.Rules, testPool)
	}
	if text := mustES(t, l, "list"); !strings.Contains(text, "pool "+testPool+" (per connection)") {
		t.Errorf("list:\n%s\nwant the pool shown", text)
	}
	if text := mustES(t, l, "explain", "--dst", "2001:db8:ffff::4"); !strings.Contains(text, "new connections leave with pool "+testPool+" (per connection)") {
		t.Errorf("explain:\n%s\nwant the pool shown", text)
	}
	// verify reads the translated source back from conntrack: any
	// address of the pool keeps the promise. check finds nothing wrong.
	v := verifyOut(t, l, 0, "--dst", "2001:db8:ffff::4")
	if len(v.Results) != 1 || !v.Results[0].Agree || !strings.HasPrefix(v.Results[0].Got, "2001:db8:1:") {
		t.Errorf("verify: %+v, want a source of the pool, agreeing", v.Results)
	}
	mustES(t, l, "check")
	if out := mustES(t, l, "set", "--to", testPool, "--dst", "2001:db8:ffff::/48"); !strings.Contains(out, "nothing to change") {
		t.Errorf("the same set again:\n%s\nwant nothing to change", out)
	}

	// Per destination: one address each, different ones.
	mustES(t, l, "set", "--to", testPool, "--sticky", "destination", "--dst", "2001:db8:ffff::/48")
	byDst := map[string]string{}
	for _, d := range dsts {
		s := poolSources(t, l, d, 3)
		if len(s) != 1 {
			t.Errorf("per destination: 3 connections to %s left from %v, want one address", d, s)
		}
		for a := range s {
			byDst[d] = a
		}
	}
	distinct := map[string]bool{}
	for _, a := range byDst {
		distinct[a] = true
	}
	t.Logf("%s, per destination: %d destinations got %d distinct addresses", backend(t), len(dsts), len(distinct))
	if len(distinct) < len(dsts)-2 {
		t.Errorf("per destination: %d destinations got %d addresses, want nearly each its own: %v", len(dsts), len(distinct), byDst)
	}
	if text := mustES(t, l, "list"); !strings.Contains(text, "pool "+testPool+" (per destination)") {
		t.Errorf("list:\n%s\nwant the pool per destination", text)
	}
	if text := mustES(t, l, "save", "--dry-run"); !strings.Contains(text, "to: "+testPool+"\n") || !strings.Contains(text, "sticky: destination\n") {
		t.Errorf("save --dry-run:\n%s\nwant the pool and its sticky", text)
	}

	// unset takes the rule and the local route away.
	mustES(t, l, "unset", "--dst", "2001:db8:ffff::/48")
	if routing := l.Routing(t); strings.Contains(routing, testPool) {
		t.Errorf("after unset, routing:\n%s\nstill has the pool's route", routing)
	}
	if s := l.SourceSeen(t, "2001:db8:ffff::4"); s != "2001:db8::250" {
		t.Errorf("after unset, a connection left from %q, want the natural 2001:db8::250", s)
	}
}

// TestPoolFile: pools in the file apply and read back as applied: per
// sender, connections to two destinations share one address; a /124 per
// connection uses its 15 addresses, never its zero one. clear removes the
// pools' routes.
func TestPoolFile(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	routePool(t, l)
	cfg := writeConfig(t, t.TempDir(), "c.yaml", "rules:\n"+
		"  - to: "+testPool+"\n    sticky: sender\n    dst: [2001:db8:ffff::/48]\n"+
		"  - to: 2001:db8:1:0:1::/124\n    dst: [2001:db8:ffff::6]\n")
	applyOK(t, l, cfg)
	gwAddrAdd(t, l, "2001:db8:ffff::5/128", "2001:db8:ffff::6/128")
	seen := poolSources(t, l, "2001:db8:ffff::4", 20)
	for a := range poolSources(t, l, "2001:db8:ffff::5", 20) {
		seen[a]++
	}
	if len(seen) != 1 {
		t.Errorf("per sender: connections to two destinations left from %v, want one address", seen)
	}
	small := poolSources(t, l, "2001:db8:ffff::6", 200)
	t.Logf("%s, a /124 per connection: 200 connections left from %d addresses", backend(t), len(small))
	for a := range small {
		if p := netip.MustParsePrefix("2001:db8:1:0:1::/124"); !p.Contains(netip.MustParseAddr(a)) || a == "2001:db8:1:0:1::" {
			t.Errorf("a connection through pool %s left from %s", p, a)
		}
	}
	if len(small) != 15 {
		t.Errorf("200 connections through a /124 per connection left from %d addresses, want its 15: %v", len(small), small)
	}
	if out := applyOK(t, l, cfg); !strings.Contains(out, "nothing to change") {
		t.Errorf("apply of the same file again:\n%s\nwant nothing to change", out)
	}
	mustES(t, l, "clear")
	if routing := l.Routing(t); strings.Contains(routing, testPool) {
		t.Errorf("after clear, routing:\n%s\nstill has the pool's route", routing)
	}

	// set --permanent writes the pool into the permanent file, which
	// check then holds the host to.
	perm := filepath.Join(t.TempDir(), "egress-snat.yaml")
	mustES(t, l, "--config", perm, "set", "--permanent", "--to", testPool, "--sticky", "destination", "--dst", "2001:db8:fffe::/48")
	if b, err := os.ReadFile(perm); err != nil || !strings.Contains(string(b), "to: "+testPool+"\n") || !strings.Contains(string(b), "sticky: destination\n") {
		t.Errorf("set --permanent wrote %q, %v; want the pool and its sticky", b, err)
	}
	mustES(t, l, "--config", perm, "check")
}

// TestPoolRefused: a prefix larger than a /64, one that holds an address of
// the host, and one on-link on an interface without neighbour proxying
// are bad input (exit 2) naming why, and change nothing. With proxying
// on, the on-link prefix is taken.
func TestPoolRefused(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	// A prefix on eth0's link with no address of H in it.
	l.Run(t, "ip", "-6", "route", "add", "2001:db8:5::/64", "dev", "eth0")
	before := l.HostState(t)
	for _, tt := range []struct {
		to    string
		extra []string
		want  []string
	}{
		{"2001:db8:1::/48", nil, []string{"2001:db8:1::/48", "larger than a /64"}},
		{"2001:db8:1::/125", nil, []string{"smaller than a /124"}},
		{"2001:db8::/64", nil, []string{"2001:db8::/64", "an address of this host on eth0"}},
		{"2001:db8:5::/64", nil, []string{"2001:db8:5::/64", "on-link on eth0", "proxy_ndp"}},
		{"2001:db8:1::1/64", nil, []string{"host bits"}},
		{"192.0.2.0/28", []string{"--dst", "198.51.100.0/24"}, []string{"IPv6"}},
		{testPool, []string{"--spread"}, []string{"--spread"}},
		{testPool + ",2001:db8::22", nil, []string{"one prefix"}},
		{testPool, []string{"--sticky", "hourly"}, []string{"hourly", "period"}},
	} {
		args := append([]string{"set", "--to", tt.to}, tt.extra...)
		if !slices.Contains(tt.extra, "--dst") {
			args = append(args, "--dst", "2001:db8:ffff::/48")
		}
		wantRefused(t, l, args, tt.want)
	}
	wantRefused(t, l, []string{"set", "--to", "2001:db8::22", "--sticky", "sender", "--dst", "2001:db8:ffff::/48"}, []string{"--sticky is for a pool"})
	cfg := writeConfig(t, t.TempDir(), "c.yaml", "rules:\n  - to: 2001:db8:1::/48\n    dst: [2001:db8:ffff::/48]\n")
	wantRefused(t, l, []string{"apply", "-f", cfg}, []string{"line 2", "larger than a /64"})
	if diff := cmp.Diff(before, l.HostState(t)); diff != "" {
		t.Errorf("refused runs changed the host (-before +after):\n%s", diff)
	}
	// With neighbour proxying on, answering for the on-link prefix is
	// the operator's (an NDP proxy's): taken.
	l.Run(t, "sysctl", "-qw", "net.ipv6.conf.eth0.proxy_ndp=1")
	mustES(t, l, "set", "--to", "2001:db8:5::/64", "--dst", "2001:db8:ffff::/48")
}

// TestPoolPeriod: per period, every connection leaves from one address of
// the pool, to every destination, until rotate --pool PREFIX starts a new
// period from another address; set and apply that name the pool again
// keep the period's address, and list, check, stats, save and --permanent
// know it.
func TestPoolPeriod(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	routePool(t, l)
	gwAddrAdd(t, l, "2001:db8:ffff::5/128", "2001:db8:ffff::6/128")
	dsts := []string{"2001:db8:ffff::4", "2001:db8:ffff::5", "2001:db8:ffff::6"}
	// one is the single address every connection to every destination
	// left from.
	one := func(when string) string {
		t.Helper()
		seen := map[string]int{}
		for _, d := range dsts {
			for a, n := range poolSources(t, l, d, 20) {
				seen[a] += n
			}
		}
		if len(seen) != 1 {
			t.Fatalf("%s: connections to %v left from %v, want one address", when, dsts, seen)
		}
		for a := range seen {
			return a
		}
		return ""
	}
	listed := func() (string, string) {
		t.Helper()
		var got struct {
			Rules []struct {
				To     []string `json:"to"`
				Pool   string   `json:"pool"`
				Sticky string   `json:"sticky"`
			} `json:"rules"`
		}
		out := mustES(t, l, "list", "--json")
		if err := json.Unmarshal([]byte(out), &got); err != nil || len(got.Rules) != 1 || len(got.Rules[0].To) != 1 || got.Rules[0].Pool != testPool {
			t.Fatalf("list --json: %v\n%s\nwant one rule of pool %s with its address", err, out, testPool)
		}
		return got.Rules[0].To[0], got.Rules[0].Sticky
	}

	mustES(t, l, "set", "--to", testPool, "--sticky", "period", "--dst", "2001:db8:ffff::/48")
	first := one("first period")
	if to, sticky := listed(); to != first || sticky != "period" {
		t.Errorf("list --json: to %s per %s, want %s per period", to, sticky, first)
	}
	if text := mustES(t, l, "list"); !strings.Contains(text, "pool "+testPool+" (per period: "+first+")") {
		t.Errorf("list:\n%s\nwant the pool and its period's address %s", text, first)
	}
	if out := mustES(t, l, "set", "--to", testPool, "--sticky", "period", "--dst", "2001:db8:ffff::/48"); !strings.Contains(out, "nothing to change") {
		t.Errorf("the same set again:\n%s\nwant nothing to change", out)
	}
	mustES(t, l, "check")
	if text := mustES(t, l, "explain", "--dst", "2001:db8:ffff::4"); !strings.Contains(text, first) {
		t.Errorf("explain:\n%s\nwant the period's address %s", text, first)
	}

	// rotate starts a new period, from another address, for every
	// destination; a second rotate, another.
	out := mustES(t, l, "rotate", "--pool", testPool)
	second := one("after rotate")
	if second == first || !strings.Contains(out, first+" -> "+second) {
		t.Errorf("rotate printed:\n%s\nconnections now leave from %s, before from %s: want a new address, and the move shown", out, second, first)
	}
	var moved struct {
		Moves []struct {
			From, To, Pool string
		} `json:"moves"`
	}
	out = mustES(t, l, "rotate", "--pool", testPool, "--json")
	if err := json.Unmarshal([]byte(out), &moved); err != nil || len(moved.Moves) != 1 || moved.Moves[0].From != second || moved.Moves[0].Pool != testPool {
		t.Fatalf("rotate --json: %v\n%s\nwant one move from %s in pool %s", err, out, second, testPool)
	}
	third := one("after the second rotate")
	if third == second || third != moved.Moves[0].To {
		t.Errorf("the second rotate moved to %s; connections leave from %s (before: %s)", moved.Moves[0].To, third, second)
	}

	// A file naming the pool per period keeps the rotated address: the
	// cron rotate and apply (or watch) agree.
	cfg := writeConfig(t, t.TempDir(), "c.yaml", "rules:\n  - to: "+testPool+"\n    sticky: period\n    dst: [2001:db8:ffff::/48]\n")
	if out := applyOK(t, l, cfg); !strings.Contains(out, "nothing to change") {
		t.Errorf("apply of the pool per period after a rotate:\n%s\nwant nothing to change", out)
	}
	if to, _ := listed(); to != third {
		t.Errorf("after apply, the period's address is %s, want %s", to, third)
	}
	if text := mustES(t, l, "save", "--dry-run"); !strings.Contains(text, "to: "+testPool+"\n") || !strings.Contains(text, "sticky: period\n") || strings.Contains(text, third) {
		t.Errorf("save --dry-run:\n%s\nwant the pool per period, without the period's address", text)
	}
	var stats struct {
		Pools []struct {
			Pool   string `json:"pool"`
			Sticky string `json:"sticky"`
		} `json:"pools"`
	}
	if out := mustES(t, l, "stats", "--json"); json.Unmarshal([]byte(out), &stats) != nil || len(stats.Pools) != 1 || stats.Pools[0].Pool != testPool || stats.Pools[0].Sticky != "period" {
		t.Errorf("stats --json:\n%s\nwant pool %s per period", out, testPool)
	}

	// Refused, with the host unchanged: --order (no next in a /64), a
	// prefix that is no pool.
	before := l.HostState(t)
	wantRefused(t, l, []string{"rotate", "--pool", testPool, "--order", "random"}, []string{"--order", testPool})
	wantRefused(t, l, []string{"rotate", "--pool", "2001:db8:1::/48"}, []string{"2001:db8:1::/48", "larger than a /64"})
	wantRefused(t, l, []string{"rotate", "--pool", testPool + ",2001:db8::22"}, []string{"one prefix"})
	if diff := cmp.Diff(before, l.HostState(t)); diff != "" {
		t.Errorf("refused rotations changed the host (-before +after):\n%s", diff)
	}

	// A UDP flow keeps its period's address across a rotate (conntrack
	// holds it); with --flush-conntrack it moves to the new one.
	flow := l.UDPFlow(t, "2001:db8:ffff::4")
	if got, err := flow.Ask(); err != nil || got != third {
		t.Fatalf("a UDP flow: %q, %v; want the period's %s", got, err, third)
	}
	mustES(t, l, "rotate", "--pool", testPool)
	if got, err := flow.Ask(); err != nil || got != third {
		t.Errorf("the UDP flow after rotate: %q, %v; want it kept on %s", got, err, third)
	}
	out = mustES(t, l, "rotate", "--pool", testPool, "--flush-conntrack")
	now, _ := listed()
	if got, err := flow.Ask(); err != nil || got != now || !strings.Contains(out, "deleted") {
		t.Errorf("the UDP flow after rotate --flush-conntrack: %q, %v; want it moved to the new %s\n%s", got, err, now, out)
	}
	third = now

	// rotate --permanent writes the pool per period, not its address.
	perm := filepath.Join(t.TempDir(), "egress-snat.yaml")
	mustES(t, l, "--config", perm, "rotate", "--permanent", "--pool", testPool, "--dst", "2001:db8:ffff::/48")
	if b, err := os.ReadFile(perm); err != nil || !strings.Contains(string(b), "to: "+testPool+"\n") || !strings.Contains(string(b), "sticky: period\n") {
		t.Errorf("rotate --permanent wrote %q, %v; want the pool per period", b, err)
	}
	mustES(t, l, "--config", perm, "check")
	if fourth := one("after rotate --permanent"); fourth == third {
		t.Errorf("rotate --permanent kept %s", third)
	}

	mustES(t, l, "unset", "--dst", "2001:db8:ffff::/48")
	if routing := l.Routing(t); strings.Contains(routing, testPool) {
		t.Errorf("after unset, routing:\n%s\nstill has the pool's route", routing)
	}
}

// TestPoolPerClient: per sender, each forwarded client of one --from
// prefix keeps one address of the pool to every destination, and two
// clients get two; per period, each --from rule has its own period, and a
// rotate of one client's leaves the other's address alone.
func TestPoolPerClient(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	routePool(t, l)
	gwAddrAdd(t, l, "2001:db8:ffff::5/128", "2001:db8:ffff::6/128")
	c1 := l.AddClient(t, lab.ClientOptions{})
	c2 := l.AddClient(t, lab.ClientOptions{})
	pool := netip.MustParsePrefix(testPool)
	// one is the single pool address c's connections to every
	// destination left from.
	one := func(c *lab.Client, when string) string {
		t.Helper()
		seen := map[string]int{}
		for _, d := range []string{"2001:db8:ffff::4", "2001:db8:ffff::5", "2001:db8:ffff::6"} {
			for range 5 {
				s := c.SourceSeen(t, d)
				if a, err := netip.ParseAddr(s); err != nil || !snatInPool(pool, a) {
					t.Fatalf("%s: a connection of %s to %s left from %q, not an address of %s", when, c.NS, d, s, pool)
				}
				seen[s]++
			}
		}
		if len(seen) != 1 {
			t.Fatalf("%s: connections of %s left from %v, want one address", when, c.NS, seen)
		}
		for a := range seen {
			return a
		}
		return ""
	}

	mustES(t, l, "set", "--to", testPool, "--sticky", "sender", "--from", "fd00:88::/32", "--dst", "2001:db8:ffff::/48")
	a1, a2 := one(c1, "per sender"), one(c2, "per sender")
	t.Logf("%s, per sender: %s from %s, %s from %s", backend(t), c1.NS, a1, c2.NS, a2)
	if a1 == a2 {
		t.Errorf("per sender: both clients left from %s, want one address each", a1)
	}

	mustES(t, l, "clear")
	mustES(t, l, "set", "--to", testPool, "--sticky", "period", "--from", c1.Subnet6.String(), "--from", c2.Subnet6.String(), "--dst", "2001:db8:ffff::/48")
	p1, p2 := one(c1, "per period"), one(c2, "per period")
	if p1 == p2 {
		t.Errorf("per period: both --from rules left from %s, want a period each", p1)
	}
	mustES(t, l, "rotate", "--pool", testPool, "--from", c1.Subnet6.String())
	if n1, n2 := one(c1, "after c1's rotate"), one(c2, "after c1's rotate"); n1 == p1 || n2 != p2 {
		t.Errorf("rotate --from %s: %s moved %s -> %s, %s moved %s -> %s; want the first alone to move", c1.Subnet6, c1.NS, p1, n1, c2.NS, p2, n2)
	}
}

func snatInPool(p netip.Prefix, a netip.Addr) bool { return p.Contains(a) && a != p.Addr() }

// TestPoolPeriodWatch: watch following a file with a pool per period
// puts a rule flushed behind its back back with its period's address,
// keeps the connections of a period when its rule changes (a period's
// address is never the host's, and never "vanishes"), and list calls the
// period's address present.
func TestPoolPeriodWatch(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	routePool(t, l)
	dir := t.TempDir()
	rule := func(sticky string) string {
		return "rules:\n  - to: " + testPool + "\n    sticky: " + sticky + "\n    dst: [2001:db8:ffff::/48]\n"
	}
	path := relWrite(t, dir, "rules.yaml", rule("period"))
	w := relStartWatch(t, l, path)
	flow := l.UDPFlow(t, "2001:db8:ffff::4")
	a, err := flow.Ask()
	if err != nil || !snatInPool(netip.MustParsePrefix(testPool), netip.MustParseAddr(a)) {
		t.Fatalf("a UDP flow through the period: %q, %v", a, err)
	}
	if text := mustES(t, l, "list"); strings.Contains(text, "NO:") {
		t.Errorf("list:\n%s\nwant the period's address present", text)
	}
	var rows struct {
		Rules []struct {
			ToPresent bool `json:"to_present"`
		} `json:"rules"`
	}
	if out := mustES(t, l, "list", "--json"); json.Unmarshal([]byte(out), &rows) != nil || len(rows.Rules) != 1 || !rows.Rules[0].ToPresent {
		t.Errorf("list --json:\n%s\nwant one rule, to_present", out)
	}

	// The rule lost behind watch's back (its chain flushed) comes back
	// with its period's address: the period goes on.
	if backend(t) == "nftables" {
		l.Run(t, "nft", "flush", "chain", "inet", nft.TableName, nft.ChainNAT)
	} else {
		relRestore(t, l, 6, "-F EGRESS-SNAT\n")
	}
	if _, ok := relWaitInSync(t, l, path, 10*time.Second); !ok {
		t.Fatalf("watch did not repair the flushed chain within 10s\nlog:\n%s", w.p.stderr.String())
	}
	if text := mustES(t, l, "list"); !strings.Contains(text, "(per period: "+a+")") {
		t.Errorf("after watch repaired the flushed chain, list:\n%s\nwant the period's address %s again", text, a)
	}

	// The file's rule becomes the pool per destination: watch rewrites
	// it, and the flow keeps its period's address.
	relWrite(t, dir, "rules.yaml", rule("destination"))
	if _, ok := relWaitInSync(t, l, path, 10*time.Second); !ok {
		t.Fatalf("watch did not follow the file within 10s\nlog:\n%s", w.p.stderr.String())
	}
	if got, err := flow.Ask(); err != nil || got != a {
		t.Errorf("the UDP flow after watch rewrote its rule: %q, %v; want it kept on %s\nlog:\n%s", got, err, a, w.p.stderr.String())
	}
}
