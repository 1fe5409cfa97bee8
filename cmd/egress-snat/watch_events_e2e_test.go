package main

// Tests of watch against host events no other test makes (#16): a route
// change, a link going down and up, a source address leaving the host
// (IPv6, and IPv4 with a long-lived flow in conntrack), and check without a
// file after our chain was flushed or its jump deleted. Each is judged from
// outside the tool: the source the far side sees, iptables-save, ip route,
// conntrack -L, and check's exit status.

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// eventBound is how long watch may take to act on a netlink event here. It
// is a bound, not a speed goal: the figures are logged.
const eventBound = 10 * time.Second

// awaitSeen polls new connections to dst until the far side sees want, at
// most limit after since, and returns how long after since it first did.
func awaitSeen(t *testing.T, l *lab.Lab, dst, want string, since time.Time, limit time.Duration) (time.Duration, bool) {
	t.Helper()
	last := ""
	for time.Since(since) < limit {
		if last = l.SourceSeen(t, dst); last == want {
			return time.Since(since), true
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%s: far side still saw %q after %s, want %q", dst, last, limit, want)
	return time.Since(since), false
}

// natRules returns the -A lines of our chain in one family's nat table.
func natRules(t *testing.T, l *lab.Lab, fam int) []string {
	t.Helper()
	var out []string
	for line := range strings.Lines(l.Run(t, iptablesCmd(fam)+"-save", "-t", "nat")) {
		if strings.HasPrefix(line, "-A EGRESS-SNAT ") {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return out
}

// wantRule fails unless one rule of our chain holds every word.
func wantRule(t *testing.T, l *lab.Lab, fam int, what string, words ...string) {
	t.Helper()
	rules := natRules(t, l, fam)
	for _, r := range rules {
		if all(r, words) {
			return
		}
	}
	t.Errorf("%s: no rule of EGRESS-SNAT (IPv%d) holds %q:\n%s", what, fam, words, strings.Join(rules, "\n"))
}

func all(s string, words []string) bool {
	for _, w := range words {
		if !strings.Contains(s, w) {
			return false
		}
	}
	return true
}

// wantCheckExit runs check (-f file unless it is "") and fails unless it exits
// code naming every kind.
func wantCheckExit(t *testing.T, l *lab.Lab, what, file string, code int, kinds ...string) {
	t.Helper()
	got, gotKinds := relCheck(t, l, file)
	ok := got == code
	for _, k := range kinds {
		ok = ok && slices.Contains(gotKinds, k)
	}
	if !ok {
		r := es(t, l, "check", "-f", file)
		if file == "" {
			r = es(t, l, "check")
		}
		t.Errorf("%s: check -f %q exit %d, kinds %v; want exit %d naming %v\n%s", what, file, got, gotKinds, code, kinds, r.stdout)
	}
}

// ctReplyDsts lists, for each conntrack entry in H whose original
// destination is dst, the destination of its reply tuple: the source the
// flow was translated to. Read with conntrack -L, from outside the tool.
func ctReplyDsts(t *testing.T, l *lab.Lab, dst string) []string {
	t.Helper()
	fam := "ipv4"
	if strings.Contains(dst, ":") {
		fam = "ipv6"
	}
	out, stderr, code := l.RunErr("conntrack", "-L", "-f", fam, "-p", "udp", "--orig-dst", dst)
	if code != 0 {
		t.Fatalf("conntrack -L --orig-dst %s: exit %d\n%s%s", dst, code, out, stderr)
	}
	var got []string
	for line := range strings.Lines(out) {
		var dsts []string
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "dst="); ok {
				dsts = append(dsts, v)
			}
		}
		if len(dsts) == 2 {
			got = append(got, dsts[1])
		}
	}
	slices.Sort(got)
	return got
}

// awaitCT polls conntrack until ok holds for dst's entries, at most limit.
func awaitCT(t *testing.T, l *lab.Lab, dst string, limit time.Duration, ok func([]string) bool) ([]string, bool) {
	t.Helper()
	start := time.Now()
	for {
		got := ctReplyDsts(t, l, dst)
		if ok(got) {
			return got, true
		}
		if time.Since(start) > limit {
			return got, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// logCount counts watch's log records with msg that mention every word.
func logCount(w *relWatch, msg string, words ...string) int {
	n := 0
	for line := range strings.Lines(w.p.stderr.String()) {
		if strings.Contains(line, `"msg":"`+msg+`"`) && all(line, words) {
			n++
		}
	}
	return n
}

// awaitLog waits, at most 2s, until watch has logged more than before
// records with msg that mention every word: watch logs an apply after it
// is written, so the far side may see it first.
func awaitLog(w *relWatch, before int, msg string, words ...string) bool {
	deadline := time.Now().Add(2 * time.Second)
	for logCount(w, msg, words...) <= before {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// TestWatchRouteChange: a route added or changed under watch gives a
// managed destination another natural source, so the rule's -s NATURAL no
// longer matches and traffic leaves from the new natural source. Watch
// hears the route event, resolves again and rewrites the rule's match; the
// far side sees the wanted source again. The time from the route change to
// the far side seeing the wanted source is the figure watch_route_ms.
//
// Not parallel: the bound is on watch's latency.
func TestWatchRouteChange(t *testing.T) {
	iptablesOnly(t, "it reads the rules as iptables-save prints them")
	l := newLab(t)
	path := relWrite(t, t.TempDir(), "rules.yaml", `rules:
  - to: 192.0.2.22
    dst: [198.51.100.4]
  - to: 2001:db8::22
    dst: [2001:db8:ffff::4]
`)
	w := relStartWatch(t, l, path)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22", "198.51.100.5": "192.0.2.250"})
	wantRule(t, l, 4, "at the start", "-s 192.0.2.250/32", "-d 198.51.100.4/32", "--to-source 192.0.2.22")

	steps := []struct {
		name string
		ip   []string
		fam  int
		dst  string
		// natural is the destination's natural source after the change:
		// the rule's -s must follow it.
		natural, want string
	}{
		{"a more specific route with another src", []string{"-4", "route", "add", "198.51.100.4/32", "via", "192.0.2.1", "dev", "eth0", "src", "192.0.2.23"},
			4, "198.51.100.4", "192.0.2.23", "192.0.2.22"},
		{"the route moved to another subnet's gateway", []string{"-4", "route", "replace", "198.51.100.4/32", "via", "198.18.0.1", "dev", "eth0"},
			4, "198.51.100.4", "198.18.0.10", "192.0.2.22"},
		{"the specific route deleted", []string{"-4", "route", "del", "198.51.100.4/32"},
			4, "198.51.100.4", "192.0.2.250", "192.0.2.22"},
		{"an IPv6 route with another src", []string{"-6", "route", "add", "2001:db8:ffff::4/128", "via", "2001:db8::1", "dev", "eth0", "src", "2001:db8::23"},
			6, "2001:db8:ffff::4", "2001:db8::23", "2001:db8::22"},
		{"the IPv6 route deleted", []string{"-6", "route", "del", "2001:db8:ffff::4/128"},
			6, "2001:db8:ffff::4", "2001:db8::250", "2001:db8::22"},
	}
	// Frozen first (SIGSTOP), so the drift stays to be seen: the far side
	// sees the new natural source and check names the drift; then thawed.
	// Then free-running, the way it runs: timed from the route change.
	for _, frozen := range []bool{true, false} {
		mode := map[bool]string{true: "frozen", false: "free-running"}[frozen]
		for _, step := range steps {
			t.Run(mode+" "+step.name, func(t *testing.T) {
				applies := logCount(w, "converged", "route change")
				if frozen {
					w.freeze(t)
				}
				l.Run(t, "ip", step.ip...)
				changed := time.Now()
				if frozen {
					wantSeen(t, l, map[string]string{step.dst: step.natural})
					wantCheckExit(t, l, step.name+", watch frozen", path, checkDrift, "natural-source-changed")
					wantCheckExit(t, l, step.name+", watch frozen (no file)", "", checkDrift, "natural-source-changed")
					changed = time.Now()
					w.thaw(t)
				}
				took, ok := awaitSeen(t, l, step.dst, step.want, changed, eventBound)
				if !ok {
					t.Fatalf("%s: the far side did not see %s again within %s\nrules:\n%s\nwatch log:\n%s",
						step.name, step.want, eventBound, strings.Join(natRules(t, l, step.fam), "\n"), w.p.stderr.String())
				}
				if frozen {
					t.Logf("%s: far side saw %s again %s after thawing watch", step.name, step.want, took.Round(time.Millisecond))
				} else {
					t.Logf("%s: far side saw %s again %s after the route change", step.name, step.want, took.Round(time.Millisecond))
					relFigure(t, "watch_route_ms", took.Milliseconds())
				}
				if !awaitLog(w, applies, "converged", "route change") {
					t.Errorf("%s: watch logged no apply for a route change:\n%s", step.name, w.p.stderr.String())
				}
				wantRule(t, l, step.fam, step.name, "-s "+step.natural+"/", "-d "+step.dst+"/", "--to-source "+step.want)
				wantCheckExit(t, l, step.name, path, checkInSync)
				wantCheckExit(t, l, step.name+" (no file)", "", checkInSync)
			})
		}
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22", "198.51.100.5": "192.0.2.250"})
}

// TestWatchLinkDownUp: the interface of a rule's source (eth1, another NIC)
// goes down and comes back up under watch, twice. Down, the kernel deletes
// every route through eth1, ours in tables 7420 and 7422 included, and
// refuses new ones; eth1's addresses stay. Watch leaves the rule out with a
// warning (its traffic leaves by eth0 from the natural source), check -f
// names it no-route, and watch goes on acting on everything else: the
// source of eth0's rule leaving and coming back meanwhile is followed.
// (Before the fix in selector, the whole reconcile failed on "Nexthop has
// invalid gateway" until eth1 was up, so a rule kept SNATing to that
// vanished address.) Up, the kernel puts back only the subnet's own route;
// watch restores ours from the link and route events: the destination
// leaves by eth1 from eth1's address, our rules and routes are as before,
// and check exits 0. The time from `ip link set eth1 up` to the far side
// seeing the right source by eth1 is the figure watch_link_up_ms.
//
// Not parallel: the bound is on watch's latency.
func TestWatchLinkDownUp(t *testing.T) {
	l := newLab(t, lab.WithSecondNIC())
	path := relWrite(t, t.TempDir(), "rules.yaml", `rules:
  - to: 203.0.113.130
    dst: [198.51.100.4]
    via: 203.0.113.129
  - to: 192.0.2.22
    dst: [198.51.100.5]
`)
	w := relStartWatch(t, l, path)
	wantWay(t, l, "198.51.100.4", "", "203.0.113.130", "eth1")
	wantSeen(t, l, map[string]string{"198.51.100.5": "192.0.2.22"})
	routing := ourRouting(t, l)
	if !strings.Contains(routing, "198.51.100.4 via 203.0.113.129 dev eth1 table 7420") {
		t.Fatalf("at the start: want our route through eth1 among:\n%s", routing)
	}
	good := func(t *testing.T) bool {
		var seen string
		got := l.Arrivals(t, fmt.Sprintf("tcp dst port %d and dst host 198.51.100.4", lab.TCPPort), func() {
			seen = l.SourceSeen(t, "198.51.100.4")
		})
		return seen == "203.0.113.130" && got["eth1"] > 0 && got["eth0"] == 0
	}

	for round := range 2 {
		t.Run(fmt.Sprintf("round %d", round), func(t *testing.T) {
			warned := logCount(w, "rule left out until its address or route returns", "eth1 is down")
			l.Run(t, "ip", "link", "set", "eth1", "down")
			down := time.Now()
			// Down, the kernel has deleted the routes through eth1 and
			// refuses new ones: the rule is left out, with a warning,
			// until eth1 is up, and its traffic leaves by eth0 from the
			// natural source (not into a black hole); check -f names it
			// no-route.
			if !awaitLog(w, warned, "rule left out until its address or route returns", "eth1 is down") {
				t.Errorf("eth1 down: watch logged no warning that it left the rule out:\n%s", w.p.stderr.String())
			}
			if _, ok := awaitSeen(t, l, "198.51.100.4", "192.0.2.250", down, eventBound); !ok {
				t.Errorf("eth1 down: 198.51.100.4 not from the natural source by eth0\nour routing:\n%s\nwatch log:\n%s", ourRouting(t, l), w.p.stderr.String())
			}
			if ours := ourRouting(t, l); ours != "" {
				t.Errorf("eth1 down: our rules and routes remain:\n%s", ours)
			}
			wantCheckExit(t, l, "eth1 down", path, checkDrift, "no-route")
			wantSeen(t, l, map[string]string{"198.51.100.5": "192.0.2.22"})
			if w.p.exited() {
				t.Fatalf("watch exited while eth1 was down: %v\n%s", w.p.err, w.p.stderr.String())
			}
			// A link down must not stop watch from acting on the rest:
			// the source of eth0's rule leaves and comes back meanwhile.
			l.HostAddrDel(t, "192.0.2.22/24", "eth0")
			if took, ok := awaitSeen(t, l, "198.51.100.5", "192.0.2.250", time.Now(), eventBound); !ok {
				t.Errorf("eth1 down, 192.0.2.22 removed: 198.51.100.5 not from the natural source after %s\nrules:\n%s\nwatch log:\n%s",
					eventBound, strings.Join(natRules(t, l, 4), "\n"), w.p.stderr.String())
			} else {
				t.Logf("eth1 down, 192.0.2.22 removed: its rule taken out, far side saw the natural source %s after", took.Round(time.Millisecond))
			}
			l.HostAddrAdd(t, "192.0.2.22/24", "eth0")
			if _, ok := awaitSeen(t, l, "198.51.100.5", "192.0.2.22", time.Now(), eventBound); !ok {
				t.Errorf("eth1 down, 192.0.2.22 back: 198.51.100.5 not from it after %s\nwatch log:\n%s", eventBound, w.p.stderr.String())
			}

			l.Run(t, "ip", "link", "set", "eth1", "up")
			up := time.Now()
			for !good(t) {
				if time.Since(up) > eventBound {
					t.Fatalf("eth1 up again: 198.51.100.4 not by eth1 from 203.0.113.130 after %s\nour routing:\n%s\nwatch log:\n%s",
						eventBound, ourRouting(t, l), w.p.stderr.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			took := time.Since(up)
			t.Logf("eth1 up again: far side saw 203.0.113.130 by eth1 %s after the link came up", took.Round(time.Millisecond))
			relFigure(t, "watch_link_up_ms", took.Milliseconds())
			if diff := cmp.Diff(routing, ourRouting(t, l)); diff != "" {
				t.Errorf("our rules and routes after eth1 came back (-before +after):\n%s", diff)
			}
			// check may race watch's last write: poll it briefly.
			if _, ok := relWaitInSync(t, l, path, 3*time.Second); !ok {
				wantCheckExit(t, l, "eth1 up again", path, checkInSync)
			}
			wantCheckExit(t, l, "eth1 up again (no file)", "", checkInSync)
			wantSeen(t, l, map[string]string{"198.51.100.5": "192.0.2.22"})
		})
	}
}

// TestWatchIPv6AddressRemoved: an IPv6 --to address leaves the host under
// watch. What is intended (watch's description, snat.ResolveAvailable and
// snat.DesiredNow): the rule is taken out with a warning, so nothing is
// SNATed to an address the host no longer has; the conntrack entries of
// flows NATed to it are deleted, so a long-lived flow moves to the natural
// source; check -f keeps reporting to-not-on-host as long as the file
// cannot be met, while check without a file, which judges the installed
// rules, is in sync. The IPv4 rule is untouched. When the address returns
// the file is met again.
//
// Not parallel: the bound is on watch's latency.
func TestWatchIPv6AddressRemoved(t *testing.T) {
	l := newLab(t)
	path := relWrite(t, t.TempDir(), "rules.yaml", `rules:
  - to: 2001:db8::22
    dst: [2001:db8:ffff::4]
  - to: 192.0.2.23
    dst: [203.0.113.7]
`)
	w := relStartWatch(t, l, path)
	wantSeen(t, l, map[string]string{"2001:db8:ffff::4": "2001:db8::22", "203.0.113.7": "192.0.2.23"})
	flow := l.UDPFlow(t, "2001:db8:ffff::4")
	if got := ask(t, flow, "v6"); got != "2001:db8::22" {
		t.Fatalf("UDP flow to 2001:db8:ffff::4: far side saw %s, want 2001:db8::22", got)
	}
	if got := ctReplyDsts(t, l, "2001:db8:ffff::4"); !slices.Equal(got, []string{"2001:db8::22"}) {
		t.Fatalf("conntrack entries to 2001:db8:ffff::4 translated to %v, want [2001:db8::22]", got)
	}
	v4 := natRules(t, l, 4)

	// Frozen first, so the drift stays to be seen: check names it.
	w.freeze(t)
	l.HostAddrDel(t, "2001:db8::22/64", "eth0")
	removed := time.Now()
	wantCheckExit(t, l, "::22 removed, watch frozen", path, checkDrift, "to-not-on-host")
	wantCheckExit(t, l, "::22 removed, watch frozen (no file)", "", checkDrift, "to-not-on-host")
	w.thaw(t)

	took, ok := awaitSeen(t, l, "2001:db8:ffff::4", "2001:db8::250", removed, eventBound)
	if !ok {
		t.Fatalf("::22 removed: new connections not from the natural 2001:db8::250 within %s\nrules:\n%s\nwatch log:\n%s",
			eventBound, strings.Join(natRules(t, l, 6), "\n"), w.p.stderr.String())
	}
	t.Logf("::22 removed: far side saw the natural source %s after the removal (watch frozen meanwhile for the checks)", took.Round(time.Millisecond))
	for _, r := range natRules(t, l, 6) {
		if strings.Contains(r, "2001:db8::22") {
			t.Errorf("::22 removed: a rule still SNATs to it: %s", r)
		}
	}
	if !awaitLog(w, 0, "rule left out until its address or route returns", "2001:db8::22") {
		t.Errorf("::22 removed: watch logged no warning naming it:\n%s", w.p.stderr.String())
	}
	if got, ok := awaitCT(t, l, "2001:db8:ffff::4", eventBound, func(d []string) bool { return !slices.Contains(d, "2001:db8::22") }); !ok {
		t.Errorf("::22 removed: conntrack entries to 2001:db8:ffff::4 still translated to %v", got)
	}
	if !awaitLog(w, 0, "deleted conntrack entries bound to a vanished address", "2001:db8::22") {
		t.Errorf("::22 removed: watch logged no conntrack deletion for it:\n%s", w.p.stderr.String())
	}
	if got := ask(t, flow, "v6"); got != "2001:db8::250" {
		t.Errorf("UDP flow after ::22 left: far side saw %s, want the natural 2001:db8::250", got)
	}
	wantCheckExit(t, l, "::22 gone, rule taken out", path, checkDrift, "to-not-on-host")
	wantCheckExit(t, l, "::22 gone, rule taken out (no file)", "", checkInSync)
	if got := natRules(t, l, 4); !slices.Equal(got, v4) {
		t.Errorf("::22 removed: the IPv4 rules changed:\n%s", cmp.Diff(v4, got))
	}
	wantSeen(t, l, map[string]string{"203.0.113.7": "192.0.2.23"})

	// Back: an IPv6 address added to a prefix becomes its default source
	// (see lab.HostAddrAdd), so the natural source is ::22 itself now and
	// the file is met with or without a rule.
	l.HostAddrAdd(t, "2001:db8::22/64", "eth0")
	back := time.Now()
	if _, ok := relWaitInSync(t, l, path, eventBound); !ok {
		t.Errorf("::22 back: check -f not in sync after %s\nwatch log:\n%s", eventBound, w.p.stderr.String())
	}
	if took, ok := awaitSeen(t, l, "2001:db8:ffff::4", "2001:db8::22", back, eventBound); ok {
		t.Logf("::22 back: far side saw it %s after it was added", took.Round(time.Millisecond))
	}
	wantCheckExit(t, l, "::22 back (no file)", "", checkInSync)
}

// TestWatchVanishedFlowConntrack: an IPv4 --to address leaves the host
// while a long-lived UDP flow is NATed to it. Watch takes the rule out and
// deletes that flow's conntrack entry (and only entries bound to the
// vanished address), so the flow's next datagram is NATed again: it
// leaves from the natural source instead of an address the host no longer
// has. A flow NATed to another address keeps its entry. Judged with
// conntrack -L in H and by the far side.
//
// Not parallel: the bound is on watch's latency.
func TestWatchVanishedFlowConntrack(t *testing.T) {
	l := newLab(t)
	path := relWrite(t, t.TempDir(), "rules.yaml", `rules:
  - to: 192.0.2.22
    dst: [198.51.100.4]
  - to: 192.0.2.23
    dst: [203.0.113.7]
`)
	w := relStartWatch(t, l, path)
	gone := l.UDPFlow(t, "198.51.100.4")
	kept := l.UDPFlow(t, "203.0.113.7")
	if got := ask(t, gone, "to .22"); got != "192.0.2.22" {
		t.Fatalf("UDP flow to 198.51.100.4: far side saw %s, want 192.0.2.22", got)
	}
	if got := ask(t, kept, "to .23"); got != "192.0.2.23" {
		t.Fatalf("UDP flow to 203.0.113.7: far side saw %s, want 192.0.2.23", got)
	}
	if got := ctReplyDsts(t, l, "198.51.100.4"); !slices.Equal(got, []string{"192.0.2.22"}) {
		t.Fatalf("conntrack entries to 198.51.100.4 translated to %v, want [192.0.2.22]", got)
	}
	keptBefore := ctReplyDsts(t, l, "203.0.113.7")
	if !slices.Equal(keptBefore, []string{"192.0.2.23"}) {
		t.Fatalf("conntrack entries to 203.0.113.7 translated to %v, want [192.0.2.23]", keptBefore)
	}

	l.HostAddrDel(t, "192.0.2.22/24", "eth0")
	removed := time.Now()
	// Nothing is sent on the flow meanwhile: its entry must go by watch's
	// doing, not expire or be replaced.
	got, ok := awaitCT(t, l, "198.51.100.4", eventBound, func(d []string) bool { return len(d) == 0 })
	if !ok {
		t.Fatalf(".22 removed: conntrack entries to 198.51.100.4 still translated to %v after %s\nwatch log:\n%s", got, eventBound, w.p.stderr.String())
	}
	t.Logf(".22 removed: its flow's conntrack entry gone %s after the removal", time.Since(removed).Round(time.Millisecond))
	if !awaitLog(w, 0, "deleted conntrack entries bound to a vanished address", "192.0.2.22", `"entries":1`) {
		t.Errorf(".22 removed: watch logged no deletion of 1 conntrack entry bound to it:\n%s", w.p.stderr.String())
	}
	if got := ctReplyDsts(t, l, "203.0.113.7"); !slices.Equal(got, keptBefore) {
		t.Errorf(".22 removed: the flow NATed to .23 lost its conntrack entry: %v, want %v", got, keptBefore)
	}
	if got := ask(t, gone, "to .22"); got != "192.0.2.250" {
		t.Errorf("UDP flow after .22 left: far side saw %s, want the natural 192.0.2.250", got)
	}
	if got := ctReplyDsts(t, l, "198.51.100.4"); !slices.Equal(got, []string{"192.0.2.250"}) {
		t.Errorf("after the next datagram, conntrack entries to 198.51.100.4 translated to %v, want [192.0.2.250]", got)
	}
	if got := ask(t, kept, "to .23"); got != "192.0.2.23" {
		t.Errorf("UDP flow to 203.0.113.7 after .22 left: far side saw %s, want 192.0.2.23", got)
	}
	for _, r := range natRules(t, l, 4) {
		if strings.Contains(r, "192.0.2.22") {
			t.Errorf(".22 removed: a rule still SNATs to it: %s", r)
		}
	}
	wantCheckExit(t, l, ".22 gone", path, checkDrift, "to-not-on-host")

	// Back: the rule returns; the flow keeps its (natural) binding, as
	// any flow does when a rule is added, and new connections take .22.
	l.HostAddrAdd(t, "192.0.2.22/24", "eth0")
	if _, ok := awaitSeen(t, l, "198.51.100.4", "192.0.2.22", time.Now(), eventBound); !ok {
		t.Errorf(".22 back: new connections not from it\nwatch log:\n%s", w.p.stderr.String())
	}
	if _, ok := relWaitInSync(t, l, path, eventBound); !ok {
		wantCheckExit(t, l, ".22 back", path, checkInSync)
	}
}

// TestCheckNoFileChainFlushed: check without a file finds our chain
// flushed while its jump stays (iptables -t nat -F EGRESS-SNAT), a state
// egress-snat never writes: it removes chain and jump when it has no
// rules. Before the fix it said "in sync", since the rules it reads back
// from the chain, now none, were all it compared with. It also finds the
// jump deleted. Both families, one at a time.
func TestCheckNoFileChainFlushed(t *testing.T) {
	iptablesOnly(t, "it flushes the EGRESS-SNAT chain")
	t.Parallel()
	file := "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n  - to: 2001:db8::22\n    dst: [2001:db8:ffff::4]\n"
	for _, fam := range []int{4, 6} {
		for _, tc := range []struct {
			name string
			args []string
			// kinds: without a file, and with one.
			kind, fileKind string
		}{
			{"chain flushed", []string{"-t", "nat", "-F", "EGRESS-SNAT"}, "chain-empty", "rule-out-of-date"},
			{"jump deleted", []string{"-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "egress-snat", "-j", "EGRESS-SNAT"}, "jump-missing", "jump-missing"},
		} {
			t.Run(fmt.Sprintf("IPv%d %s", fam, tc.name), func(t *testing.T) {
				t.Parallel()
				l := newLab(t)
				path := relWrite(t, t.TempDir(), "rules.yaml", file)
				mustES(t, l, "apply", "-f", path)
				wantCheckExit(t, l, "after apply", "", checkInSync)
				foreign(t, l, fam, tc.args...)
				natural := map[int]map[string]string{4: {"198.51.100.4": "192.0.2.250"}, 6: {"2001:db8:ffff::4": "2001:db8::250"}}[fam]
				wantSeen(t, l, natural) // the drift is real
				wantCheckExit(t, l, tc.name, "", checkDrift, tc.kind)
				wantCheckExit(t, l, tc.name, path, checkDrift, tc.fileKind)
				r := es(t, l, "check")
				if !strings.Contains(r.stdout, tc.kind) || !strings.Contains(r.stdout, map[int]string{4: "ipv4", 6: "ipv6"}[fam]) {
					t.Errorf("check after %s in IPv%d: want it to name %s and the family:\n%s", tc.name, fam, tc.kind, r.stdout)
				}
				mustES(t, l, "apply", "-f", path)
				wantCheckExit(t, l, "repaired", "", checkInSync)
				wantCheckExit(t, l, "repaired", path, checkInSync)
			})
		}
	}
}
