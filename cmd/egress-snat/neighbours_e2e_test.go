package main

// Truth beside neighbours (#20): live connections outlive the rules that
// made them, a foreign ip rule is seen and never taken for ours, a source
// the kernel will not use is refused, marked rules are explained and
// verified, verify sends only where it may, a flush takes only the rotated
// sender's flows, and watch's log does not grow with the rules. Each is
// judged on the wire: by long-lived connections to the far side, by what
// the far side saw, and by the kernel's own listings.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// flowPair is a long-lived TCP connection and a UDP flow to one far host.
type flowPair struct {
	dst string
	tcp *lab.TCPFlow
	udp *lab.UDPFlow
}

func openFlows(t *testing.T, l *lab.Lab, dst, want string) flowPair {
	t.Helper()
	p := flowPair{dst: dst, tcp: l.TCPFlow(t, dst), udp: l.UDPFlow(t, dst)}
	p.want(t, "before", want)
	return p
}

// want checks that both flows still work and still leave with src.
func (p flowPair) want(t *testing.T, when, src string) {
	t.Helper()
	if got, err := p.tcp.Ask(); err != nil || got != src {
		t.Errorf("%s: TCP connection to %s: far side saw %q (err %v), want %s", when, p.dst, got, err, src)
	}
	if got, err := p.udp.Ask(); err != nil || got != src {
		t.Errorf("%s: UDP flow to %s: far side saw %q (err %v), want %s", when, p.dst, got, err, src)
	}
}

// keepAsking checks the flows every 250 ms for d: a connection reset by the
// far side (its source no longer translated) fails within that time.
func (p flowPair) keepAsking(t *testing.T, when, src string, d time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		p.want(t, when, src)
		if t.Failed() {
			return
		}
	}
}

// nftRuleset is H's nft list ruleset, without the handles and counters
// that differ between two listings of one ruleset.
func nftRuleset(t *testing.T, l *lab.Lab) string {
	t.Helper()
	out, _, code := l.RunErr("nft", "list", "ruleset")
	if code != 0 {
		return "" // no nft: the legacy backend's host
	}
	return regexp.MustCompile(`counter packets \d+ bytes \d+`).ReplaceAllString(out, "counter")
}

// hostTruth is everything of H a neighbour owns or egress-snat leaves
// behind: iptables, ipsets, nftables, ip rules and every route. With the
// legacy backend the nat tables are loaded first: a legacy table cannot be
// unloaded from a namespace, so the first run's leaves them listed, empty.
func hostTruth(t *testing.T, l *lab.Lab) string {
	t.Helper()
	if backend(t) == "legacy" {
		l.Run(t, iptablesCmd(4), "-t", "nat", "-S")
		l.Run(t, iptablesCmd(6), "-t", "nat", "-S")
	}
	return l.Ruleset(t) + nftRuleset(t, l) + l.Run(t, "ip", "-4", "rule") + l.Run(t, "ip", "-6", "rule") +
		l.Run(t, "ip", "-4", "route", "show", "table", "all") + l.Run(t, "ip", "-6", "route", "show", "table", "all")
}

// endFlows closes p's connection and deletes its UDP flow's conntrack
// entry, which (UDP having no end) conntrack would keep up to two minutes.
func endFlows(t *testing.T, l *lab.Lab, p flowPair) {
	t.Helper()
	p.tcp.Close()
	p.udp.Close()
	l.RunErr("conntrack", "-D", "-p", "udp", "-d", p.dst)
	time.Sleep(300 * time.Millisecond) // the FIN exchange: TIME_WAIT is not live
}

// TestConnectionsOutliveRules: a TCP connection and a UDP flow translated
// by a rule keep working, with the source they started with, when the rule
// goes: unset, clear, rotate back to the natural source, in both families.
// New connections take the natural source at once. What was kept for them
// is listed, is no drift, and goes on the first run after they end; then
// the host is exactly as before egress-snat ran (iptables, ipsets, nft
// ruleset, ip rules, routes).
func TestConnectionsOutliveRules(t *testing.T) {
	for _, tc := range []struct {
		name   string
		remove func(t *testing.T, l *lab.Lab) string
	}{
		{"unset", func(t *testing.T, l *lab.Lab) string {
			mustES(t, l, "unset", "--dst", "198.51.100.4")
			return mustES(t, l, "unset", "--dst", "2001:db8:ffff::4")
		}},
		{"clear", func(t *testing.T, l *lab.Lab) string { return mustES(t, l, "clear") }},
		{"rotate to the natural source", func(t *testing.T, l *lab.Lab) string {
			mustES(t, l, "rotate", "--pool", "192.0.2.250", "--dst", "198.51.100.4")
			return mustES(t, l, "rotate", "--pool", "2001:db8::250", "--dst", "2001:db8:ffff::4")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			before := hostTruth(t, l)
			mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
			mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")
			v4 := openFlows(t, l, "198.51.100.4", "192.0.2.22")
			v6 := openFlows(t, l, "2001:db8:ffff::4", "2001:db8::22")
			out := tc.remove(t, l)
			v4.keepAsking(t, "after "+tc.name, "192.0.2.22", 1500*time.Millisecond)
			v6.keepAsking(t, "after "+tc.name, "2001:db8::22", 1500*time.Millisecond)
			wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"})
			if !strings.Contains(out, "kept until the connections using it end") {
				t.Errorf("%s did not say what it keeps:\n%s", tc.name, out)
			}
			if list := mustES(t, l, "list"); !strings.Contains(list, "kept for live connections") {
				t.Errorf("list does not show what is kept:\n%s", list)
			}
			if r := es(t, l, "check"); r.code != checkInSync {
				t.Errorf("check while connections live: exit %d, want in sync\n%s", r.code, r.stdout)
			}
			endFlows(t, l, v4)
			endFlows(t, l, v6)
			mustES(t, l, "clear")
			if after := hostTruth(t, l); after != before {
				t.Errorf("once the connections ended, clear left the host different (-before +after):\n%s", cmp.Diff(before, after))
			}
		})
	}
}

// TestClearNowBreaksWhatIsKept: clear --now takes what is kept for live
// connections at once, as documented: the TCP connection is then reset,
// and the host is as before.
func TestClearNowBreaksWhatIsKept(t *testing.T) {
	l := newLab(t)
	before := hostTruth(t, l)
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	tcp := l.TCPFlow(t, "198.51.100.4")
	if got, err := tcp.Ask(); err != nil || got != "192.0.2.22" {
		t.Fatalf("TCP connection: far side saw %q (%v), want 192.0.2.22", got, err)
	}
	mustES(t, l, "clear", "--now")
	time.Sleep(300 * time.Millisecond)
	if got, err := tcp.Ask(); err == nil {
		t.Errorf("after clear --now the connection still answers (%s): want it reset, as documented", got)
	}
	time.Sleep(300 * time.Millisecond)
	if after := hostTruth(t, l); after != before {
		t.Errorf("clear --now left the host different (-before +after):\n%s", cmp.Diff(before, after))
	}
}

// TestReplyRouteOutlivesItsRule: a connection that leaves by another NIC
// from that NIC's address keeps working after its rule is unset: the
// address's reply rule and table stay while the connection lives (G drops
// packets of that address that arrive on the wrong interface, as an
// upstream's reverse path filter does), and go on the first run after.
func TestReplyRouteOutlivesItsRule(t *testing.T) {
	l := newLab(t, lab.WithSecondUplink())
	runIn(t, l.Gateway, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.eth0.rp_filter=1", "net.ipv4.conf.eth1.rp_filter=1")
	before := ourRouting(t, l)
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	tcp := l.TCPFlow(t, "198.51.100.4")
	if got, err := tcp.Ask(); err != nil || got != "203.0.113.130" {
		t.Fatalf("TCP connection by eth1: far side saw %q (%v), want 203.0.113.130", got, err)
	}
	mustES(t, l, "unset", "--dst", "198.51.100.4")
	for range 6 {
		time.Sleep(250 * time.Millisecond)
		if got, err := tcp.Ask(); err != nil || got != "203.0.113.130" {
			t.Fatalf("after unset: the connection from 203.0.113.130 answered %q (%v): it broke", got, err)
		}
	}
	wantWay(t, l, "198.51.100.4", "", "192.0.2.250", "eth0")
	if r := es(t, l, "check"); r.code != checkInSync {
		t.Errorf("check while the connection lives: exit %d\n%s", r.code, r.stdout)
	}
	tcp.Close()
	time.Sleep(300 * time.Millisecond)
	mustES(t, l, "clear")
	if after := ourRouting(t, l); after != before {
		t.Errorf("once the connection ended, our routing is not as before (-before +after):\n%s", cmp.Diff(before, after))
	}
}

// runIn runs a command in namespace ns, failing the test if it fails.
func runIn(t *testing.T, ns string, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("in %s: %s %s: %v\n%s", ns, name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// ipRules is H's ip rules of both families, as ip prints them.
func ipRules(t *testing.T, l *lab.Lab) string {
	t.Helper()
	return l.Run(t, "ip", "-4", "rule") + l.Run(t, "ip", "-6", "rule")
}

// TestForeignRuleAtOurPriority: another tool's ip rule at one of our
// priorities is never ours: set, clear and watch succeed beside it, never
// delete or re-tag it, and a dry run never names it.
func TestForeignRuleAtOurPriority(t *testing.T) {
	l := newLab(t, lab.WithSecondUplink())
	l.Run(t, "ip", "rule", "add", "priority", "7420", "from", "10.99.0.0/16", "lookup", "100")
	l.Run(t, "ip", "rule", "add", "priority", "7422", "from", "10.98.0.0/16", "lookup", "101")
	foreignLines := func() []string {
		var out []string
		for line := range strings.Lines(ipRules(t, l)) {
			if strings.Contains(line, "10.99.0.0/16") || strings.Contains(line, "10.98.0.0/16") {
				out = append(out, line)
			}
		}
		return out
	}
	want := foreignLines()
	if len(want) != 2 {
		t.Fatalf("foreign rules not installed: %q", want)
	}
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	wantWay(t, l, "198.51.100.4", "", "203.0.113.130", "eth1")
	if r := mustES(t, l, "clear", "--dry-run"); strings.Contains(r, "10.99.0.0") || strings.Contains(r, "10.98.0.0") {
		t.Errorf("clear --dry-run names the foreign rules:\n%s", r)
	}
	if r := es(t, l, "check"); r.code != checkInSync {
		t.Errorf("check beside the foreign rules: exit %d\n%s", r.code, r.stdout)
	}
	mustES(t, l, "clear")
	if got := foreignLines(); !slices.Equal(got, want) {
		t.Errorf("after set and clear the foreign rules are %q, want %q byte for byte", got, want)
	}
	path := relWrite(t, t.TempDir(), "rules.yaml", "rules:\n  - to: 203.0.113.130\n    dst: [198.51.100.4]\n")
	w := relStartWatch(t, l, path)
	if _, ok := awaitSeen(t, l, "198.51.100.4", "203.0.113.130", time.Now(), 5*time.Second); !ok {
		t.Errorf("watch beside the foreign rules did not converge\n%s", w.p.stderr.String())
	}
	time.Sleep(1500 * time.Millisecond)
	if n := strings.Count(w.p.stderr.String(), `"level":"ERROR"`); n > 0 {
		t.Errorf("watch logged %d errors beside the foreign rules:\n%s", n, w.p.stderr.String())
	}
	if got := foreignLines(); !slices.Equal(got, want) {
		t.Errorf("under watch the foreign rules are %q, want %q", got, want)
	}
}

// TestForeignRuleAheadIsSeen: an ip rule added without a priority lands
// ahead of ours and sends a destination we route out of another way.
// check reports ip-rule-ahead naming it, explain says it decides, verify
// compares with our rule's promise and names it as the cause, and the
// far side confirms the promise is broken.
func TestForeignRuleAheadIsSeen(t *testing.T) {
	l := newLab(t, lab.WithSecondUplink())
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	wantSeen(t, l, map[string]string{"198.51.100.4": "203.0.113.130"})
	l.Run(t, "ip", "route", "add", "198.51.100.4", "via", "192.0.2.1", "table", "100")
	l.Run(t, "ip", "rule", "add", "to", "198.51.100.4", "lookup", "100")
	rules := l.Run(t, "ip", "rule")
	if !strings.Contains(rules, "7418:") {
		t.Fatalf("the rule without pref did not land ahead of ours:\n%s", rules)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})

	r := es(t, l, "check", "--json")
	if r.code != checkDrift || !strings.Contains(r.stdout, "ip-rule-ahead") || !strings.Contains(r.stdout, "lookup 100") {
		t.Errorf("check with a foreign rule ahead: exit %d, want %d naming ip-rule-ahead and the rule\n%s", r.code, checkDrift, r.stdout)
	}
	if out := mustES(t, l, "explain", "--dst", "198.51.100.4"); !strings.Contains(out, "decided by") || !strings.Contains(out, "7418") {
		t.Errorf("explain does not name the rule that decides:\n%s", out)
	}
	r = es(t, l, "verify", "--dst", "198.51.100.4")
	if r.code != exitFailure || !strings.Contains(r.stdout, "DIFFER") || !strings.Contains(r.stdout, "7418") {
		t.Errorf("verify with a foreign rule ahead: exit %d, want 1 with DIFFER naming the rule\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// TestRouteSrcChangeIsNotOK: a src on the main default route changes the
// natural source under a SNAT rule for every destination: the rule no
// longer matches, and verify says so instead of "ok".
func TestRouteSrcChangeIsNotOK(t *testing.T) {
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22")
	l.Run(t, "ip", "route", "change", "default", "via", "192.0.2.1", "src", "192.0.2.23")
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23"})
	r := es(t, l, "verify")
	if r.code != exitFailure || !strings.Contains(r.stdout, "DIFFER") || !strings.Contains(r.stdout, "192.0.2.23") {
		t.Errorf("verify after the natural source changed: exit %d, want 1 with DIFFER\n%s%s", r.code, r.stdout, r.stderr)
	}
	if r := es(t, l, "check"); r.code != checkDrift || !strings.Contains(r.stdout, "natural-source-changed") {
		t.Errorf("check after the natural source changed: exit %d\n%s", r.code, r.stdout)
	}
}

// TestUnusableIPv6Sources: a tentative (DAD running) or dadfailed address
// is refused by set (exit 2, naming why), shown as not usable by list and
// check, and a file's rule for it stands by under watch until DAD ends.
// A deprecated one works, with a note.
func TestUnusableIPv6Sources(t *testing.T) {
	l := newLab(t)
	before := l.Ruleset(t)
	// DAD on eth0, slow enough to watch it run (10 probes, a second each).
	runIn(t, l.Host, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1", "net.ipv6.conf.eth0.dad_transmits=5")
	// ::25 is G's too: H's DAD fails.
	runIn(t, l.Gateway, "ip", "addr", "add", "2001:db8::25/64", "dev", "eth0", "nodad")
	l.Run(t, "ip", "addr", "add", "2001:db8::25/64", "dev", "eth0")
	l.Run(t, "ip", "addr", "add", "2001:db8::24/64", "dev", "eth0")
	wantRefused(t, l, []string{"set", "--to", "2001:db8::24", "--dst", "2001:db8:ffff::4"}, []string{"2001:db8::24", "tentative"})
	deadline := time.Now().Add(3 * time.Second)
	for !strings.Contains(l.Run(t, "ip", "addr", "show", "dev", "eth0"), "dadfailed") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	wantRefused(t, l, []string{"set", "--to", "2001:db8::25", "--dst", "2001:db8:ffff::4"}, []string{"2001:db8::25", "dadfailed"})
	if after := l.Ruleset(t); after != before {
		t.Errorf("refused sets changed the rules:\n%s", cmp.Diff(before, after))
	}
	// Deprecated: usable, with a note.
	l.Run(t, "ip", "addr", "change", "2001:db8::22/64", "dev", "eth0", "preferred_lft", "0")
	out := mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")
	if !strings.Contains(out, "deprecated") {
		t.Errorf("set of a deprecated source says nothing of it:\n%s", out)
	}
	wantSeen(t, l, map[string]string{"2001:db8:ffff::4": "2001:db8::22"})
	mustES(t, l, "clear")

	// Under watch, a rule for a tentative address stands by until DAD ends.
	l.Run(t, "ip", "addr", "add", "2001:db8::26/64", "dev", "eth0")
	added := time.Now()
	path := relWrite(t, t.TempDir(), "rules.yaml", "rules:\n  - to: 2001:db8::26\n    dst: [2001:db8:ffff::4]\n")
	w := relStartWatchNoWait(t, l, path)
	time.Sleep(500 * time.Millisecond)
	if strings.Contains(l.Run(t, "ip", "addr", "show", "dev", "eth0"), "2001:db8::26/64 scope global tentative") {
		if got := l.SourceSeen(t, "2001:db8:ffff::4"); got != "2001:db8::250" {
			t.Errorf("while ::26 is tentative the far side saw %s, want the natural 2001:db8::250", got)
		}
		if r := es(t, l, "list"); !strings.Contains(r.stdout+r.stderr, "") {
			t.Logf("list: %s", r.stdout)
		}
		if r := es(t, l, "check", "-f", path); r.code != checkDrift || !strings.Contains(r.stdout, "tentative") {
			t.Errorf("check -f while ::26 is tentative: exit %d, want drift naming tentative\n%s", r.code, r.stdout)
		}
	}
	if took, ok := awaitSeen(t, l, "2001:db8:ffff::4", "2001:db8::26", added, 10*time.Second); !ok {
		t.Errorf("::26 did not take over after DAD ended\n%s", w.p.stderr.String())
	} else {
		t.Logf("::26 in use %s after it was added (DAD takes about 5s)", took.Round(time.Millisecond))
	}
}

// TestExplainVerifyMarkedRules: a --from and a --uid rule whose source is
// on another NIC (a mark sends their traffic there) are explained as the
// rule deciding, and verified as kept, as the far side sees.
func TestExplainVerifyMarkedRules(t *testing.T) {
	l := newLab(t, lab.WithSecondUplink())
	c := l.AddClient(t, lab.ClientOptions{})
	mustES(t, l, "set", "--to", "203.0.113.130", "--from", c.Subnet4.String(), "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "203.0.113.131", "--uid", "4242", "--dst", "198.51.100.4")
	if got := c.SourceSeen(t, "198.51.100.4"); got != "203.0.113.130" {
		t.Fatalf("the client's connection: far side saw %s, want 203.0.113.130", got)
	}
	if got := l.SourceSeenAsUID(t, 4242, "198.51.100.4"); got != "203.0.113.131" {
		t.Fatalf("uid 4242's connection: far side saw %s, want 203.0.113.131", got)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--from", c.Addr4.String()}, "203.0.113.130"},
		{[]string{"--uid", "4242"}, "203.0.113.131"},
	} {
		out := mustES(t, l, append([]string{"explain", "--dst", "198.51.100.4"}, tc.args...)...)
		if strings.Contains(out, "no rule applies") || !strings.Contains(out, "leave with "+tc.want) || !strings.Contains(out, "eth1") {
			t.Errorf("explain %v: want the rule to %s out of eth1:\n%s", tc.args, tc.want, out)
		}
		r := es(t, l, append([]string{"verify", "--dst", "198.51.100.4"}, tc.args...)...)
		if r.code != 0 || !strings.Contains(r.stdout, "ok") || !strings.Contains(r.stdout, tc.want) {
			t.Errorf("verify %v: exit %d, want 0 and ok with %s\n%s%s", tc.args, r.code, tc.want, r.stdout, r.stderr)
		}
	}
}

// TestVerifySendsOnlyToSafeAddresses: verify of a rule for every
// destination sends to a documentation address inside it, never to a
// random routable one; a rule with none is listed as not verified until
// --probe names an address; a route-method rule with no conntrack user is
// verified by its socket's source.
func TestVerifySendsOnlyToSafeAddresses(t *testing.T) {
	l := newLab(t)
	before := hostTruth(t, l)
	mustES(t, l, "set", "--to", "192.0.2.22")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "10.77.0.0/16")
	var r result
	got := l.Arrivals(t, "udp dst port 33434", func() { r = es(t, l, "verify", "--json") })
	var out struct {
		Agree       bool     `json:"agree"`
		NotVerified []string `json:"not_verified"`
		Results     []struct {
			Dst string `json:"dst"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("verify --json: %v\n%s%s", err, r.stdout, r.stderr)
	}
	if r.code != 0 || !out.Agree || len(out.Results) != 1 || !strings.HasPrefix(out.Results[0].Dst, "198.51.100.") && !strings.HasPrefix(out.Results[0].Dst, "192.0.2.") {
		t.Errorf("verify: exit %d, results %+v: want one ok flow to a documentation address\n%s%s", r.code, out, r.stdout, r.stderr)
	}
	if len(out.NotVerified) != 1 || !strings.Contains(out.NotVerified[0], "10.77.0.0/16") {
		t.Errorf("not verified: %q, want the 10.77.0.0/16 rule", out.NotVerified)
	}
	for dev, n := range got {
		if n > 1 {
			t.Errorf("verify sent %d datagrams in on G's %s, want one flow", n, dev)
		}
	}
	r = es(t, l, "verify", "--probe", "10.77.1.1")
	if r.code != 0 || !strings.Contains(r.stdout, "10.77.1.1") {
		t.Errorf("verify --probe 10.77.1.1: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	wantRefused(t, l, []string{"verify", "--dst", "10.77.0.0/16"}, []string{"10.77.0.0/16", "--probe"})
	// verify's flows are its own: it leaves no entry to keep conntrack for.
	mustES(t, l, "clear")
	if after := hostTruth(t, l); after != before {
		t.Errorf("clear after verify left the host different (-before +after):\n%s", cmp.Diff(before, after))
	}

	// Route-method, no NAT anywhere: nothing tracks the flow.
	l2 := newLab(t)
	mustES(t, l2, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4", "--method", "route")
	wantSeen(t, l2, map[string]string{"198.51.100.4": "192.0.2.22"})
	r = es(t, l2, "verify")
	if r.code != 0 || !strings.Contains(r.stdout, "ok") {
		t.Errorf("verify of a route-method rule: exit %d, want 0\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// conntrackLines lists H's conntrack entries to dst, one line each.
func conntrackLines(t *testing.T, l *lab.Lab, dst string) []string {
	t.Helper()
	out, _, _ := l.RunErr("conntrack", "-L", "-d", dst)
	var lines []string
	for line := range strings.Lines(out) {
		if strings.Contains(line, "src=") {
			lines = append(lines, strings.TrimSpace(line))
		}
	}
	return lines
}

// TestRotateFlushIsPerSender: rotating a --from sender with
// --flush-conntrack deletes its flows bound to the old address, and not
// the host's own flow to the same destination bound to the same address.
func TestRotateFlushIsPerSender(t *testing.T) {
	l := newLab(t)
	c := l.AddClient(t, lab.ClientOptions{})
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "192.0.2.22", "--from", c.Subnet4.String(), "--dst", "198.51.100.4")
	host := l.UDPFlow(t, "198.51.100.4")
	if got, err := host.Ask(); err != nil || got != "192.0.2.22" {
		t.Fatalf("host flow: %q %v", got, err)
	}
	c.Run(t, "bash", "-c", fmt.Sprintf("echo x > /dev/udp/198.51.100.4/%d", lab.UDPPort))
	time.Sleep(200 * time.Millisecond)
	before := conntrackLines(t, l, "198.51.100.4")
	hasClient := func(lines []string) bool {
		return slices.ContainsFunc(lines, func(s string) bool {
			return strings.Contains(s, "src="+c.Addr4.String()) && strings.Contains(s, "dst=192.0.2.22")
		})
	}
	if !hasClient(before) {
		t.Fatalf("no conntrack entry of the client's flow:\n%s", strings.Join(before, "\n"))
	}
	out := mustES(t, l, "rotate", "--pool", "192.0.2.22,192.0.2.23", "--from", c.Subnet4.String(), "--dst", "198.51.100.4", "--flush-conntrack")
	after := conntrackLines(t, l, "198.51.100.4")
	if hasClient(after) {
		t.Errorf("the client's flow bound to .22 survived the flush:\n%s\n%s", strings.Join(after, "\n"), out)
	}
	if !slices.ContainsFunc(after, func(s string) bool {
		return strings.Contains(s, "src=192.0.2.250") && strings.Contains(s, "dst=192.0.2.22")
	}) {
		t.Errorf("the host's own flow to the same destination lost its entry:\n%s", strings.Join(after, "\n"))
	}
	if got, err := host.Ask(); err != nil || got != "192.0.2.22" {
		t.Errorf("the host's flow after the client's rotation: far side saw %q (%v), want 192.0.2.22", got, err)
	}
}

// TestWatchLogDoesNotGrowWithRules: while an address flaps, watch logs a
// line per address change with the number of rules it takes out, not a
// line per destination.
func TestWatchLogDoesNotGrowWithRules(t *testing.T) {
	l := newLab(t)
	dir := t.TempDir()
	var dsts strings.Builder
	for i := range 300 {
		fmt.Fprintf(&dsts, "198.18.%d.%d\n", 1+i/250, 1+i%250)
	}
	if err := os.WriteFile(filepath.Join(dir, "dsts.txt"), []byte(dsts.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	path := relWrite(t, dir, "rules.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: dsts.txt\n")
	w := relStartWatch(t, l, path)
	if _, ok := awaitSeen(t, l, "198.51.100.4", "192.0.2.250", time.Now(), 5*time.Second); !ok {
		t.Fatal("lab not answering")
	}
	time.Sleep(500 * time.Millisecond)
	start := strings.Count(w.p.stderr.String(), "\n")
	const flaps = 5
	for range flaps {
		l.HostAddrDel(t, "192.0.2.22/24", "eth0")
		time.Sleep(400 * time.Millisecond)
		l.HostAddrAdd(t, "192.0.2.22/24", "eth0")
		time.Sleep(400 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	log := w.p.stderr.String()
	lines := strings.Count(log, "\n") - start
	if lines > 12*flaps {
		t.Errorf("%d flaps of an address with 300 rules: %d log lines, want at most %d (a few per change, not per rule)\n%s", flaps, lines, 12*flaps, log)
	}
	if n := strings.Count(log, `"rules":300`); n < flaps {
		t.Errorf("the lines do not count the 300 rules taken out (%d lines with rules=300):\n%s", n, log)
	}
}

// wgQuickUp brings up a real wg-quick interface in H with AllowedIPs
// 0.0.0.0/0 and a peer that never answers: wg-quick adds its ip rules
// without a priority ("not from all fwmark 0xca6c lookup 51820" and
// "lookup main suppress_prefixlength 0"), which land ahead of ours, and
// sends everything else into the tunnel. The kernel here has no wireguard
// module, so wg-quick runs wireguard-go. It is taken down, and
// wireguard-go killed, at cleanup.
func wgQuickUp(t *testing.T, l *lab.Lab) string {
	t.Helper()
	for _, cmd := range []string{"wg-quick", "wg", "wireguard-go"} {
		if _, err := exec.LookPath(cmd); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s not found (scripts/lab.sh deps installs wireguard-tools and wireguard-go)", cmd)
			}
			t.Skipf("%s not found", cmd)
		}
	}
	key := func(args ...string) string {
		out, err := exec.Command("sh", "-c", strings.Join(args, " ")).Output()
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		return strings.TrimSpace(string(out))
	}
	// The interface is named after the file: unique, as wireguard-go's
	// socket under /var/run/wireguard is shared by every namespace.
	name := fmt.Sprintf("esw%d", os.Getpid()%100000)
	conf := filepath.Join(t.TempDir(), name+".conf")
	text := fmt.Sprintf("[Interface]\nPrivateKey = %s\nAddress = 10.200.0.2/32\n\n[Peer]\nPublicKey = %s\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n",
		key("wg", "genkey"), key("wg genkey | wg pubkey"))
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		l.RunErr("wg-quick", "down", conf)
		exec.Command("pkill", "-f", "wireguard-go "+name+"$").Run()
		os.Remove("/var/run/wireguard/" + name + ".sock")
	})
	if out, errOut, code := l.RunErr("wg-quick", "up", conf); code != 0 {
		t.Fatalf("wg-quick up: exit %d\n%s%s", code, out, errOut)
	}
	return name
}

// TestWireGuardRulesAhead: a real wg-quick with a default route through
// its tunnel shadows our route for a destination sent out of another NIC.
// check reports ip-rule-ahead naming wg-quick's rule, explain says it
// decides, and verify reports the broken promise with it as the cause.
func TestWireGuardRulesAhead(t *testing.T) {
	l := newLab(t, lab.WithSecondUplink())
	mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
	wantSeen(t, l, map[string]string{"198.51.100.4": "203.0.113.130"})
	if r := es(t, l, "check"); r.code != checkInSync {
		t.Fatalf("check before wg-quick: exit %d\n%s", r.code, r.stdout)
	}
	wg := wgQuickUp(t, l)
	rules := l.Run(t, "ip", "rule")
	if !strings.Contains(rules, "lookup 51820") {
		t.Fatalf("wg-quick added no rule:\n%s", rules)
	}
	r := es(t, l, "check")
	if r.code != checkDrift || !strings.Contains(r.stdout, "ip-rule-ahead") || !strings.Contains(r.stdout, "lookup 51820") || !strings.Contains(r.stdout, wg) {
		t.Errorf("check beside wg-quick: exit %d, want drift ip-rule-ahead naming wg-quick's rule and %s\n%s%s\nip rule:\n%s", r.code, wg, r.stdout, r.stderr, rules)
	}
	if out := mustES(t, l, "explain", "--dst", "198.51.100.4"); !strings.Contains(out, "decided by") || !strings.Contains(out, "51820") {
		t.Errorf("explain beside wg-quick does not name its rule:\n%s", out)
	}
	r = es(t, l, "verify", "--dst", "198.51.100.4")
	if r.code != exitFailure || !strings.Contains(r.stdout, "DIFFER") || !strings.Contains(r.stdout, "51820") {
		t.Errorf("verify beside wg-quick: exit %d, want 1, DIFFER naming wg-quick's rule\n%s%s", r.code, r.stdout, r.stderr)
	}
	before := ipRules(t, l)
	mustES(t, l, "clear")
	if got := ipRules(t, l); strings.Count(got, "51820") != strings.Count(before, "51820") {
		t.Errorf("clear touched wg-quick's rules:\nbefore:\n%s\nafter:\n%s", before, got)
	}
}

// TestWatchDropsWhatWasKept: under watch, a rule taken out of the file
// keeps its live connection working, and watch removes the keep chain by
// itself once the connection ended.
func TestWatchDropsWhatWasKept(t *testing.T) {
	l := newLab(t)
	before := hostTruth(t, l)
	dir := t.TempDir()
	path := relWrite(t, dir, "rules.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	w := relStartWatch(t, l, path)
	tcp := l.TCPFlow(t, "198.51.100.4")
	if got, err := tcp.Ask(); err != nil || got != "192.0.2.22" {
		t.Fatalf("TCP connection: far side saw %q (%v), want 192.0.2.22", got, err)
	}
	relWrite(t, dir, "rules.yaml", "rules: []\n")
	if _, ok := awaitSeen(t, l, "198.51.100.4", "192.0.2.250", time.Now(), 5*time.Second); !ok {
		t.Fatalf("watch did not take the rule out\n%s", w.p.stderr.String())
	}
	if got, err := tcp.Ask(); err != nil || got != "192.0.2.22" {
		t.Errorf("after watch took the rule out, the connection answered %q (%v), want 192.0.2.22", got, err)
	}
	if list := mustES(t, l, "list"); !strings.Contains(list, "kept for live connections") {
		t.Errorf("list shows nothing kept while the connection lives:\n%s", list)
	}
	tcp.Close()
	closed := time.Now()
	for time.Since(closed) < 15*time.Second && hostTruth(t, l) != before {
		time.Sleep(500 * time.Millisecond)
	}
	if after := hostTruth(t, l); after != before {
		t.Errorf("15s after the connection ended, watch left the host different (-before +after):\n%s\n%s", cmp.Diff(before, after), w.p.stderr.String())
	} else {
		t.Logf("watch removed what was kept %s after the connection ended", time.Since(closed).Round(100*time.Millisecond))
	}
}
