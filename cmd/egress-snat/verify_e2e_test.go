package main

import (
	"encoding/json"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

func nftIn(t *testing.T, l *lab.Lab, ruleset string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", l.Host, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v\n%s\n%s", err, out, ruleset)
	}
}

const thief = `table ip thief {
  chain post { type nat hook postrouting priority 50; policy accept; ip daddr 198.51.100.4 snat to 192.0.2.23; }
}
`

type verifyJSON struct {
	Agree   bool `json:"agree"`
	Results []struct {
		Dst      string   `json:"dst"`
		Promised []string `json:"promised"`
		Got      string   `json:"left_with"`
		Agree    bool     `json:"agree"`
		Cause    string   `json:"cause"`
	} `json:"results"`
}

func verifyOut(t *testing.T, l *lab.Lab, wantCode int, args ...string) verifyJSON {
	t.Helper()
	r := es(t, l, append([]string{"verify", "--json"}, args...)...)
	if r.code != wantCode {
		t.Fatalf("verify %v: exit %d, want %d\n%s%s", args, r.code, wantCode, r.stdout, r.stderr)
	}
	var v verifyJSON
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatalf("verify --json: %v\n%s", err, r.stdout)
	}
	return v
}

func TestForeignNATChainAhead(t *testing.T) {
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	mustES(t, l, "check")
	v := verifyOut(t, l, 0, "--dst", "198.51.100.4")
	if len(v.Results) != 1 || v.Results[0].Got != "192.0.2.22" {
		t.Fatalf("verify with the rule working: %+v", v)
	}

	nftIn(t, l, thief)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23"}) // the wire agrees with what follows
	r := es(t, l, "check")
	if r.code != 1 || !strings.Contains(r.stdout, "nat-chain-ahead") || !strings.Contains(r.stdout, "thief") || !strings.Contains(r.stdout, "priority 50") {
		t.Errorf("check with a thief at priority 50: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	v = verifyOut(t, l, 1, "--dst", "198.51.100.4")
	if got := v.Results[0]; got.Got != "192.0.2.23" || got.Agree || !strings.Contains(got.Cause, "thief") {
		t.Errorf("verify with a thief: %+v", got)
	}
	text := es(t, l, "verify", "--dst", "198.51.100.4").stdout
	for _, want := range []string{"192.0.2.23", "192.0.2.22", "nat-chain-ahead"} {
		if !strings.Contains(text, want) {
			t.Errorf("verify's text does not name %s:\n%s", want, text)
		}
	}
	if out := mustES(t, l, "explain", "--dst", "198.51.100.4"); !strings.Contains(out, "WARNING") || !strings.Contains(out, "thief") {
		t.Errorf("explain does not warn of the thief:\n%s", out)
	}
	if out := mustES(t, l, "explain", "--dst", "203.0.113.7"); strings.Contains(out, "WARNING") {
		t.Errorf("explain warns for a destination the thief does not take:\n%s", out)
	}
	// A chain after ours binds nothing we promise.
	nftIn(t, l, "table ip late {\n chain post { type nat hook postrouting priority 150; masquerade; }\n}\n")
	l.Run(t, "nft", "delete", "table", "ip", "thief")
	mustES(t, l, "check")
	verifyOut(t, l, 0, "--dst", "198.51.100.4")
}

func TestForeignRuleAheadOfJump(t *testing.T) {
	iptablesOnly(t, "the nftables backend has no jump to be ahead of")
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.0/24")
	foreign(t, l, 4, "-t", "nat", "-I", "POSTROUTING", "-d", "198.51.100.4", "-j", "SNAT", "--to-source", "192.0.2.23")
	r := es(t, l, "check")
	if r.code != 1 || !strings.Contains(r.stdout, "nat-rule-ahead") || !strings.Contains(r.stdout, "198.51.100.0/24") {
		t.Errorf("check with a SNAT ahead of our jump: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	v := verifyOut(t, l, 1, "--dst", "198.51.100.4")
	if got := v.Results[0]; got.Got != "192.0.2.23" || !strings.Contains(got.Cause, "nat-rule-ahead") {
		t.Errorf("verify with a rule ahead: %+v", got)
	}
	// Another destination of the same rule is untouched.
	verifyOut(t, l, 0, "--dst", "198.51.100.5")
}

func TestVerifyEveryRuleAndSenders(t *testing.T) {
	l := newLab(t)
	l.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.0/24")
	mustES(t, l, "set", "--to", "192.0.2.23", "--from", "10.77.0.0/24", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "192.0.2.23", "--uid", "65534", "--dst", "203.0.113.7")
	mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")
	v := verifyOut(t, l, 0)
	if len(v.Results) != 4 {
		t.Fatalf("verify without --dst checked %d flows, want one per rule (4): %+v", len(v.Results), v)
	}
	if got := verifyOut(t, l, 0, "--from", "10.77.0.9", "--dst", "198.51.100.4").Results[0]; got.Got != "192.0.2.23" {
		t.Errorf("forwarded from 10.77.0.9: %+v", got)
	}
	if got := verifyOut(t, l, 0, "--uid", "65534", "--dst", "203.0.113.7").Results[0]; got.Got != "192.0.2.23" {
		t.Errorf("as uid 65534: %+v", got)
	}
	if got := verifyOut(t, l, 0, "--dst", "203.0.113.7").Results[0]; got.Got != "192.0.2.250" {
		t.Errorf("as root, no rule for 203.0.113.7: %+v", got)
	}
	// A thief for forwarded traffic only.
	nftIn(t, l, "table ip thief {\n chain post { type nat hook postrouting priority 50; ip saddr 10.77.0.0/24 masquerade; }\n}\n")
	if got := verifyOut(t, l, 1, "--from", "10.77.0.9", "--dst", "198.51.100.4").Results[0]; got.Got != "192.0.2.250" || !strings.Contains(got.Cause, "thief") {
		t.Errorf("forwarded, with a masquerade ahead: %+v", got)
	}
	verifyOut(t, l, 0, "--dst", "198.51.100.4")

	for _, bad := range [][]string{
		{"--proto", "icmp", "--dst", "198.51.100.4"},
		{"--port", "0", "--dst", "198.51.100.4"},
		{"--dst", "not-an-address"},
		{"--uid", "65534"},
		{"--from", "192.0.2.22", "--dst", "198.51.100.4"},
	} {
		if r := es(t, l, append([]string{"verify"}, bad...)...); r.code != 2 {
			t.Errorf("verify %v: exit %d, want 2\n%s%s", bad, r.code, r.stdout, r.stderr)
		}
	}
}

func TestWatchVerifyEvery(t *testing.T) {
	l := newLab(t)
	file := writeFile(t, "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	p := relStart(t, l, "watch", "-f", file, "--log-format", "json", "--verify-every", "200ms")
	defer func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		if _, ok := p.wait(10 * time.Second); !ok {
			p.cmd.Process.Kill()
			<-p.done
		}
	}()
	waitLog := func(what string) bool {
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if strings.Contains(p.stderr.String(), what) {
				return true
			}
			time.Sleep(50 * time.Millisecond)
		}
		return false
	}
	if !waitLog(`"msg":"converged"`) {
		t.Fatalf("watch did not converge:\n%s", p.stderr.String())
	}
	time.Sleep(500 * time.Millisecond) // a few canaries in sync
	if strings.Contains(p.stderr.String(), "verify: a flow left") {
		t.Fatalf("a mismatch was logged with the rule working:\n%s", p.stderr.String())
	}
	nftIn(t, l, thief)
	if !waitLog(`"level":"ERROR","msg":"verify: a flow left with another source than the rules promise"`) {
		t.Fatalf("no mismatch logged with a thief ahead:\n%s", p.stderr.String())
	}
	if log := p.stderr.String(); !strings.Contains(log, `"left_with":"192.0.2.23"`) || !strings.Contains(log, "thief") {
		t.Errorf("the mismatch does not name the address used and the cause:\n%s", log)
	}
}

// TestVerifyCgroup: the flow of verify --cgroup is sent from a process in
// the cgroup, whether the binary runs under nsenter --net or under ip netns
// exec (which hides the host's cgroup2 mount).
func TestVerifyCgroup(t *testing.T) {
	l := newLab(t)
	cg := lab.NewCgroup(t)
	mustESNet(t, l, "set", "--to", "192.0.2.23", "--cgroup", cg, "--dst", "203.0.113.7")
	for name, run := range map[string]func(t *testing.T, l *lab.Lab, args ...string) result{"nsenter --net": esNet, "ip netns exec": es} {
		r := run(t, l, "verify", "--json", "--cgroup", cg, "--dst", "203.0.113.7")
		var v verifyJSON
		if err := json.Unmarshal([]byte(r.stdout), &v); r.code != 0 || err != nil || v.Results[0].Got != "192.0.2.23" {
			t.Errorf("%s: verify --cgroup %s: exit %d %+v\n%s%s", name, cg, r.code, v, r.stdout, r.stderr)
		}
	}
	if got := verifyOut(t, l, 0, "--dst", "203.0.113.7").Results[0]; got.Got != "192.0.2.250" {
		t.Errorf("outside the cgroup: %+v", got)
	}
	if v := verifyOut(t, l, 0); len(v.Results) != 1 || v.Results[0].Got != "192.0.2.23" {
		t.Errorf("verify of every rule sends the cgroup rule's flow from the cgroup: %+v", v)
	}
}
