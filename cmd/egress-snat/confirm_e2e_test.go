package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// applyInOwnGroup runs apply --confirm in a process group of its own, as
// a login shell's job is, waits for it to return and then kills the whole
// group with SIGKILL: the shell and anything it left behind.
func applyInOwnGroup(t *testing.T, l *lab.Lab, file, timeout string) string {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", l.Host, bin, "apply", "-f", file, "--confirm", timeout)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("apply --confirm: %v\n%s", err, out)
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	return string(out)
}

// waitRuleset waits until H's ruleset is want, at most d.
func waitRuleset(t *testing.T, l *lab.Lab, want string, d time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		if l.Ruleset(t) == want {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestApplyConfirmRevertsAfterKill(t *testing.T) {
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "203.0.113.7")
	before := l.Ruleset(t)
	file := writeFile(t, "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	start := time.Now()
	out := applyInOwnGroup(t, l, file, "3s")
	if !strings.Contains(out, "pending") {
		t.Errorf("apply --confirm does not say it is pending:\n%s", out)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.250"})
	if l.Ruleset(t) == before {
		t.Fatal("apply --confirm changed nothing")
	}
	if !waitRuleset(t, l, before, time.Until(start.Add(5*time.Second))) {
		t.Fatalf("3s + 2s after apply --confirm, the ruleset is not back:\nwant:\n%s\ngot:\n%s", before, l.Ruleset(t))
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "203.0.113.7": "192.0.2.23"})
	if r := es(t, l, "confirm"); r.code != 0 || !strings.Contains(r.stdout, "nothing pending") {
		t.Errorf("confirm after the revert: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

func TestApplyConfirmKept(t *testing.T) {
	l := newLab(t)
	if r := es(t, l, "confirm"); r.code != 0 || !strings.Contains(r.stdout, "nothing pending") {
		t.Errorf("confirm with nothing pending: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	file := writeFile(t, "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	applyInOwnGroup(t, l, file, "2s")
	applied := l.Ruleset(t)

	other := writeFile(t, "rules:\n  - to: 192.0.2.23\n    dst: [198.51.100.4]\n")
	for _, args := range [][]string{{"apply", "-f", other, "--confirm", "10s"}, {"apply", "-f", other}} {
		if r := es(t, l, args...); r.code != 1 || !strings.Contains(r.stderr, "pending") {
			t.Errorf("%v while one is pending: exit %d, want 1 naming the pending apply\n%s%s", args, r.code, r.stdout, r.stderr)
		}
	}
	if l.Ruleset(t) != applied {
		t.Fatal("a refused apply changed the ruleset")
	}
	if r := es(t, l, "confirm"); r.code != 0 || !strings.Contains(r.stdout, "confirmed") {
		t.Fatalf("confirm: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	time.Sleep(3 * time.Second) // past the deadline
	if got := l.Ruleset(t); got != applied {
		t.Errorf("after confirm the applied state did not stay:\nwant:\n%s\ngot:\n%s", applied, got)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})
	// Confirmed, so a new apply goes ahead.
	mustES(t, l, "apply", "-f", other)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23"})
}

func TestApplyConfirmRevertsRoutes(t *testing.T) {
	l := newLab(t, lab.WithSecondNIC())
	l.Run(t, "ip", "route", "add", "default", "via", "203.0.113.129", "dev", "eth1", "metric", "500")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "203.0.113.7")
	before := l.Routing(t) + l.Ruleset(t)
	// A source on eth1: carried by routes and rules of ours, not SNAT.
	file := writeFile(t, "rules:\n  - to: 203.0.113.130\n    dst: [198.51.100.4]\n")
	start := time.Now()
	applyInOwnGroup(t, l, file, "3s")
	wantSeen(t, l, map[string]string{"198.51.100.4": "203.0.113.130"})
	if l.Routing(t)+l.Ruleset(t) == before {
		t.Fatal("apply --confirm changed no route, rule or ruleset")
	}
	for time.Now().Before(start.Add(5 * time.Second)) {
		if l.Routing(t)+l.Ruleset(t) == before {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if after := l.Routing(t) + l.Ruleset(t); after != before {
		t.Fatalf("3s + 2s after apply --confirm, routes, rules and ruleset are not back:\nwant:\n%s\ngot:\n%s", before, after)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "203.0.113.7": "192.0.2.23"})
}
