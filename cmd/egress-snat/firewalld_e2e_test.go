package main

// A live firewalld (Debian's, nftables backend) in the lab's host
// namespace, next to egress-snat: what its zones and reloads do to our
// rules, judged on the wire.

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// fwRepairLimit is how soon after a reload wiped our rules the far side
// must see our source again while watch runs. The worst case is one canary
// period plus an apply, so the test runs watch with a canary period of
// fwResync; with the default 1s a repair can take a little over 1s.
const (
	fwRepairLimit = time.Second
	fwResync      = "500ms"
)

const fwFile = `# egress-snat's permanent state in the firewalld tests
rules:
  - to: 192.0.2.22
    dst: [198.51.100.4]
  - to: 2001:db8::22
    dst: [2001:db8:ffff::4]
`

// fwLab is a lab with its probe and firewalld running, eth0 in the public
// zone, masquerading (runtime only, as an operator would try it first).
func fwLab(t *testing.T) (*lab.Lab, *lab.Firewalld) {
	t.Helper()
	lab.RequireFirewalld(t)
	l := newLab(t)
	fw := lab.StartFirewalld(t, l)
	fw.Cmd(t, "--zone=public", "--change-interface=eth0")
	fw.Cmd(t, "--zone=public", "--add-masquerade")
	return l, fw
}

// fwWipes reports whether a firewalld reload removes our rules: firewalld
// flushes the tables of the iptables command it runs, which is the nft
// backend on Debian. Rules written with iptables-legacy are in other tables
// and survive.
func fwWipes(t *testing.T) bool { return backend(t) == "nft" }

// wireTrace samples, in the background, the source the far side sees for
// new connections to dst, so a test can say when it went wrong and when it
// was right again.
type wireTrace struct {
	mu      sync.Mutex
	samples []wireSample
	stop    chan struct{}
	done    chan struct{}
}

type wireSample struct {
	at  time.Time // when the connection was started
	src string    // "" when it failed (firewalld drops traffic while it reloads)
}

func startWireTrace(t *testing.T, l *lab.Lab, dst string) *wireTrace {
	t.Helper()
	w := &wireTrace{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			at := time.Now()
			src := dialSeen(l, dst, 200*time.Millisecond)
			w.mu.Lock()
			w.samples = append(w.samples, wireSample{at, src})
			w.mu.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
	}()
	t.Cleanup(w.end)
	return w
}

func (w *wireTrace) end() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
}

// since returns the samples started at or after from.
func (w *wireTrace) since(from time.Time) []wireSample {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []wireSample
	for _, s := range w.samples {
		if !s.at.Before(from) {
			out = append(out, s)
		}
	}
	return out
}

// dialSeen is lab.SourceSeen with a short timeout and no logging, for
// sampling: "" when the connection fails.
func dialSeen(l *lab.Lab, dst string, timeout time.Duration) string {
	var c net.Conn
	err := lab.Do(l.Host, func() (err error) {
		c, err = (&net.Dialer{Timeout: timeout}).Dial("tcp", net.JoinHostPort(dst, fmt.Sprint(lab.TCPPort)))
		return err
	})
	if err != nil {
		return ""
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return ""
	}
	return strings.TrimSpace(line)
}

// nftEvents runs `nft monitor` in the lab's host and stamps each event, so
// a test can tell when a reload removed our chain.
type nftEvents struct {
	mu     sync.Mutex
	events []nftEvent
	cmd    *exec.Cmd
}

type nftEvent struct {
	at   time.Time
	line string
}

func startNFTEvents(t *testing.T, l *lab.Lab) *nftEvents {
	t.Helper()
	n := &nftEvents{cmd: exec.Command("ip", "netns", "exec", l.Host, "nft", "monitor")}
	out, err := n.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := n.cmd.Start(); err != nil {
		t.Fatalf("nft monitor: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			n.mu.Lock()
			n.events = append(n.events, nftEvent{time.Now(), sc.Text()})
			n.mu.Unlock()
		}
		io.Copy(io.Discard, out)
	}()
	t.Cleanup(func() { n.cmd.Process.Kill(); <-done; n.cmd.Wait() })
	return n
}

// first returns the time of the first event at or after from whose line
// contains all of words.
func (n *nftEvents) first(from time.Time, words ...string) (time.Time, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, e := range n.events {
		if e.at.Before(from) {
			continue
		}
		all := true
		for _, w := range words {
			all = all && strings.Contains(e.line, w)
		}
		if all {
			return e.at, true
		}
	}
	return time.Time{}, false
}

// TestFirewalldReloadWatchRepairs: with firewalld masquerading eth0, our
// rule decides the source; each of three `firewall-cmd --reload`s wipes it
// (nft backend) and watch, following the permanent file as the boot unit
// runs it, puts it back within fwRepairLimit, measured
// from the moment the reload deleted our chain to the first new connection
// that the far side sees from our source again.
func TestFirewalldReloadWatchRepairs(t *testing.T) {
	l, fw := fwLab(t)
	file := relWrite(t, t.TempDir(), "egress-snat.yaml", fwFile)
	w := permWatch(t, l, file, "--resync", fwResync)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22"})
	// Masquerade is live: it rewrites a bound source that no rule of ours
	// covers.
	if got := l.SourceSeenFrom(t, "203.0.113.7", "192.0.2.23"); got != "192.0.2.250" {
		t.Errorf("bound to 192.0.2.23 through the masquerading zone: far side saw %q, want 192.0.2.250", got)
	}
	events := startNFTEvents(t, l)
	trace := startWireTrace(t, l, "198.51.100.4")
	for i := 1; i <= 3; i++ {
		start := time.Now()
		fw.Reload(t)
		// The zone's masquerade is runtime state: put it back as an
		// operator's script would.
		fw.Cmd(t, "--zone=public", "--add-masquerade")
		if !fwWipes(t) {
			time.Sleep(300 * time.Millisecond)
			for _, s := range trace.since(start) {
				if s.src != "" && s.src != "192.0.2.22" {
					t.Errorf("reload %d (%s backend, not wiped): far side saw %s at %s", i, backend(t), s.src, s.at.Format(time.StampMilli))
				}
			}
			continue
		}
		wiped, ok := events.first(start, "delete chain", "EGRESS-SNAT")
		if !ok {
			t.Fatalf("reload %d: nft monitor saw no deletion of EGRESS-SNAT; events:\n%s", i, events.dump(start))
		}
		repaired, ok := fwRightAgain(trace, wiped, "192.0.2.22", 10*time.Second)
		if !ok {
			t.Fatalf("reload %d: far side did not see 192.0.2.22 again within 10s of the wipe\nwatch log:\n%s", i, w.stderr.String())
		}
		took := repaired.Sub(wiped)
		relFigure(t, fmt.Sprintf("firewalld_reload%d_repair_ms", i), took.Milliseconds())
		t.Logf("reload %d: reload took %s; our chain deleted %s after it began; far side saw 192.0.2.22 again %s after the wipe (wrong on the wire: %s)",
			i, time.Since(start).Round(time.Millisecond), wiped.Sub(start).Round(time.Millisecond), took.Round(time.Millisecond), trace.wrong(wiped, repaired))
		if took > fwRepairLimit {
			t.Errorf("reload %d: repaired %s after the wipe, want within %s", i, took, fwRepairLimit)
		}
	}
	trace.end()
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22"})
	if code, out := relCheck(t, l, file); code != checkInSync {
		t.Errorf("check -f after the reloads: exit %d, want in sync\n%s", code, out)
	}
}

// fwRightAgain returns the start of the first sampled connection at or
// after from that the far side saw from want, waiting up to limit.
func fwRightAgain(w *wireTrace, from time.Time, want string, limit time.Duration) (time.Time, bool) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		for _, s := range w.since(from) {
			if s.src == want {
				return s.at, true
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Time{}, false
}

// wrong summarises the samples between from and to: how many connections
// saw another source, and how many failed.
func (w *wireTrace) wrong(from, to time.Time) string {
	other, failed := map[string]int{}, 0
	for _, s := range w.since(from) {
		if !s.at.Before(to) {
			break
		}
		if s.src == "" {
			failed++
		} else {
			other[s.src]++
		}
	}
	return fmt.Sprintf("other sources %v, failed %d", other, failed)
}

func (n *nftEvents) dump(from time.Time) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var b strings.Builder
	for _, e := range n.events {
		if !e.at.Before(from) {
			fmt.Fprintf(&b, "%s %s\n", e.at.Format(time.StampMilli), e.line)
		}
	}
	return b.String()
}

// TestFirewalldReloadCheck: without watch, check -f reports what a reload
// did to our rules (exit 1), and apply -f repairs it.
func TestFirewalldReloadCheck(t *testing.T) {
	l, fw := fwLab(t)
	file := relWrite(t, t.TempDir(), "egress-snat.yaml", fwFile)
	mustES(t, l, "apply", "-f", file)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})
	fw.Reload(t)
	code, findings := relCheck(t, l, file)
	if !fwWipes(t) {
		if code != checkInSync {
			t.Errorf("check -f after a reload (%s backend: firewalld does not touch it): exit %d, want in sync\n%s", backend(t), code, findings)
		}
		wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})
		return
	}
	if code != checkDrift {
		t.Errorf("check -f after a reload that wiped our rules: exit %d, want %d (drift)\n%s", code, checkDrift, findings)
	}
	if !strings.Contains(strings.Join(findings, " "), "chain-missing") && !strings.Contains(strings.Join(findings, " "), "jump-missing") {
		t.Errorf("check -f findings %v: want chain-missing or jump-missing", findings)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})
	mustES(t, l, "apply", "-f", file)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})
}

// TestFirewalldClearLeavesItsTables: set and clear leave firewalld's
// nftables ruleset exactly as it was, and firewalld keeps working.
func TestFirewalldClearLeavesItsTables(t *testing.T) {
	l, fw := fwLab(t)
	before := l.Run(t, "nft", "list", "ruleset")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "203.0.113.0/24", "--dst", "198.51.100.5") // two: a set
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.23"})
	mustES(t, l, "clear")
	after := l.Run(t, "nft", "list", "ruleset")
	if after != before {
		t.Errorf("nft list ruleset after set and clear differs (-before +after):\n%s", cmp.Diff(before, after))
	}
	if got := strings.TrimSpace(fw.Cmd(t, "--zone=public", "--query-masquerade")); got != "yes" {
		t.Errorf("firewall-cmd --query-masquerade after clear: %q, want yes", got)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})
}

// TestFirewalldPermanentSurvivesReboot: what --permanent and save wrote
// comes back after a reboot, and only that: the lab host is built afresh
// with firewalld, and what egress-snat.service runs (check, then watch,
// both without -f) brings the far side back to the permanent state. Before
// the reboot, check without -f (the permanent file given by --config)
// reports the reload's wipe, as watch is not running.
func TestFirewalldPermanentSurvivesReboot(t *testing.T) {
	l, fw := fwLab(t)
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	p := func(l *lab.Lab, args ...string) string {
		t.Helper()
		return mustES(t, l, append([]string{"--config", path}, args...)...)
	}
	p(l, "set", "--permanent", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	p(l, "rotate", "--permanent", "--pool", "192.0.2.22,192.0.2.23", "--dst", "198.51.100.4") // -> .23
	p(l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")                          // runtime only ...
	p(l, "save")                                                                              // ... made permanent
	p(l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.5")                                // runtime only, stays so
	permanent := map[string]string{"198.51.100.4": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22", "198.51.100.5": "192.0.2.250"}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22", "198.51.100.5": "192.0.2.22"})

	fw.Reload(t)
	r := es(t, l, "--config", path, "check")
	switch {
	case fwWipes(t) && r.code != checkDrift:
		t.Errorf("check (permanent file) after a reload wiped our rules: exit %d, want %d\n%s%s", r.code, checkDrift, r.stdout, r.stderr)
	case !fwWipes(t) && r.code != checkDrift:
		// Not wiped (legacy): the runtime-only rule is still drift from the file.
		t.Errorf("check (permanent file) with a runtime-only rule: exit %d, want %d\n%s", r.code, checkDrift, r.stdout)
	}
	if fwWipes(t) && !strings.Contains(r.stdout, "chain-missing") {
		t.Errorf("check after the wipe does not name the missing chain:\n%s", r.stdout)
	}

	// Reboot: a fresh host with firewalld starting first, as at boot.
	fw.Stop(t)
	l2, fw2 := fwLab(t)
	if r := es(t, l2, "--config", path, "check"); r.code != checkDrift {
		t.Errorf("check at boot, before watch: exit %d, want %d (nothing installed yet)", r.code, checkDrift)
	}
	permWatch(t, l2, path)
	wantSeen(t, l2, permanent)
	// firewalld reloads once more after boot; watch repairs it.
	fw2.Reload(t)
	deadline := time.Now().Add(5 * time.Second)
	for dialSeen(l2, "198.51.100.4", time.Second) != "192.0.2.23" && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	wantSeen(t, l2, permanent)
}
