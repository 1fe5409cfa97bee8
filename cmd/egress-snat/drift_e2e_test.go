package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// relReconverge is how fast watch must repair drift: the canary's resync
// period (1s by default) plus the settle delay and one apply.
const relReconverge = 2 * time.Second

// relWatch is `egress-snat watch` running in a lab's host namespace.
type relWatch struct {
	p      *relProc
	frozen bool
}

// relStartWatch starts watch -f path with JSON logs and waits until the host
// is in sync with path. At t's cleanup it stops watch with SIGTERM and checks
// that it exits 0 and leaves the rules as they were; then it records how
// many applies watch made.
func relStartWatch(t *testing.T, l *lab.Lab, path string) *relWatch {
	t.Helper()
	w := relStartWatchNoWait(t, l, path)
	if _, ok := relWaitInSync(t, l, path, 5*time.Second); !ok {
		t.Fatalf("watch -f %s: not in sync after 5s\nlog:\n%s", path, w.p.stderr.String())
	}
	return w
}

// relStartWatchNoWait is relStartWatch for a file the host cannot meet
// yet: it does not wait for check -f to be in sync.
func relStartWatchNoWait(t *testing.T, l *lab.Lab, path string) *relWatch {
	t.Helper()
	w := &relWatch{p: relStart(t, l, "watch", "-f", path, "--log-format", "json")}
	t.Cleanup(func() {
		if w.frozen {
			w.p.cmd.Process.Signal(syscall.SIGCONT)
		}
		if w.p.exited() {
			t.Errorf("watch exited before SIGTERM: %v\nlog:\n%s", w.p.err, w.p.stderr.String())
			return
		}
		before := l.Ruleset(t)
		w.p.cmd.Process.Signal(syscall.SIGTERM)
		code, ok := w.p.wait(10 * time.Second)
		if !ok {
			w.p.cmd.Process.Kill()
			<-w.p.done
			t.Errorf("watch still running 10s after SIGTERM\nlog:\n%s", w.p.stderr.String())
			return
		}
		if code != 0 {
			t.Errorf("watch exited %d after SIGTERM, want 0\nlog:\n%s", code, w.p.stderr.String())
		}
		if after := l.Ruleset(t); after != before {
			t.Errorf("stopping watch changed the rules (-before +after):\n%s", cmp.Diff(before, after))
		}
		converged, applies := w.log(t)
		relFigure(t, "watch_applies", applies)
		if applies != converged {
			t.Errorf("watch logged %d converged events but reports %d applies", converged, applies)
		}
	})
	return w
}

// log counts watch's "converged" lines and reads the applies it reported
// when it stopped.
func (w *relWatch) log(t *testing.T) (converged, applies int) {
	t.Helper()
	for line := range strings.Lines(w.p.stderr.String()) {
		var rec struct {
			Msg     string `json:"msg"`
			Applies int    `json:"applies"`
			// Durations are Go duration strings, never nanoseconds.
			Resync string `json:"resync"`
			Took   string `json:"took"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Errorf("watch log line is not JSON, or a duration in it is not a string: %q: %v", line, err)
			continue
		}
		for _, d := range []string{rec.Resync, rec.Took} {
			if _, err := time.ParseDuration(d); d != "" && err != nil {
				t.Errorf("watch log line %q: duration %q: %v", line, d, err)
			}
		}
		switch rec.Msg {
		case "watch started":
			if rec.Resync != "500ms" {
				t.Errorf("watch started: resync %q, want \"500ms\" (the default, as a duration string)", rec.Resync)
			}
		case "converged":
			if rec.Took == "" {
				t.Errorf("converged without how long it took: %q", line)
			}
			converged++
		case "stopping; rules stay in place":
			applies = rec.Applies
		}
	}
	return converged, applies
}

// awaitRepair polls check -f file until it exits 0 (at most 10s) and
// returns how long after since watch logged the write that repaired the
// drift (its last "converged" record by then), and how long until check saw
// it. Without such a record, repaired is seen.
func (w *relWatch) awaitRepair(t *testing.T, l *lab.Lab, file string, since time.Time) (repaired, seen time.Duration, ok bool) {
	t.Helper()
	_, ok = relWaitInSync(t, l, file, 10*time.Second)
	now := time.Now()
	seen = now.Sub(since)
	repaired = seen
	found := false
	for line := range strings.Lines(w.p.stderr.String()) {
		var rec struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &rec) != nil || rec.Msg != "converged" || !rec.Time.After(since) || rec.Time.After(now) {
			continue
		}
		repaired, found = rec.Time.Sub(since), true
	}
	if !found {
		t.Logf("no repair logged after %s: counting until check saw it", since.Format(time.StampMilli))
	}
	return repaired, seen, ok
}

// freeze stops watch (SIGSTOP) so that drift stays in place to be observed;
// thaw lets it run again.
func (w *relWatch) freeze(t *testing.T) {
	t.Helper()
	if err := w.p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	w.frozen = true
}

func (w *relWatch) thaw(t *testing.T) {
	t.Helper()
	if err := w.p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	w.frozen = false
}

// relWaitInSync polls `check -f path` until it exits 0, at most limit, and
// returns how long that took.
func relWaitInSync(t *testing.T, l *lab.Lab, path string, limit time.Duration) (time.Duration, bool) {
	t.Helper()
	start := time.Now()
	for {
		if code, _ := relCheck(t, l, path); code == checkInSync {
			return time.Since(start), true
		}
		if time.Since(start) > limit {
			return time.Since(start), false
		}
	}
}

const (
	relDriftFull = `rules:
  - to: 192.0.2.22
    dst: [198.51.100.4]
  - to: 192.0.2.23
    dst: [203.0.113.1, 203.0.113.2, 203.0.113.3, 203.0.113.4, 203.0.113.5, 203.0.113.6, 203.0.113.7, 203.0.113.8, 203.0.113.9]
  - to: 2001:db8::22
    dst: [2001:db8:ffff::4]
`
	// relDriftReduced is relDriftFull without the rule of 192.0.2.22: what
	// watch converges on while that address is gone.
	relDriftReduced = `rules:
  - to: 192.0.2.23
    dst: [203.0.113.1, 203.0.113.2, 203.0.113.3, 203.0.113.4, 203.0.113.5, 203.0.113.6, 203.0.113.7, 203.0.113.8, 203.0.113.9]
  - to: 2001:db8::22
    dst: [2001:db8:ffff::4]
`
	// relDriftEdited is the file after an operator's edit.
	relDriftEdited = `rules:
  - to: 192.0.2.23
    dst: [198.51.100.4]
  - to: 192.0.2.22
    dst: [198.51.100.5]
  - to: 192.0.2.23
    dst: [203.0.113.1, 203.0.113.2, 203.0.113.3, 203.0.113.4, 203.0.113.5, 203.0.113.6, 203.0.113.7, 203.0.113.8, 203.0.113.9]
  - to: 2001:db8::22
    dst: [2001:db8:ffff::4]
`
)

var (
	relSeenFull    = map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.250", "203.0.113.7": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22"}
	relSeenReduced = map[string]string{"198.51.100.4": "192.0.2.250", "203.0.113.7": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22"}
	relSeenNatural = map[string]string{"198.51.100.4": "192.0.2.250", "203.0.113.7": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"}
	relSeenEdited  = map[string]string{"198.51.100.4": "192.0.2.23", "198.51.100.5": "192.0.2.22", "203.0.113.7": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22"}
)

// relDriftStep is one way the host drifts away from the file.
type relDriftStep struct {
	name    string
	disrupt func(t *testing.T, l *lab.Lab)
	// kind is the drift check -f full must report before the repair.
	kind string
	// drifted is what the far side sees before the repair (nil: not
	// checked, e.g. a rule still NATs to an address the host lost).
	drifted map[string]string
	// reduced: the converged state is relDriftReduced's.
	reduced bool
	// after cleans up once converged, without causing drift.
	after func(t *testing.T, l *lab.Lab)
}

func relDriftSteps() []relDriftStep {
	both := func(t *testing.T, l *lab.Lab, args ...string) {
		t.Helper()
		foreign(t, l, 4, args...)
		foreign(t, l, 6, args...)
	}
	return []relDriftStep{
		{
			name:    "firewall reload flushes POSTROUTING",
			disrupt: relFirewallReload,
			kind:    "jump-missing", drifted: relSeenNatural,
		},
		{
			name:    "chain flushed",
			disrupt: func(t *testing.T, l *lab.Lab) { relRestoreBoth(t, l, "-F EGRESS-SNAT\n") },
			kind:    "rule-out-of-date", drifted: relSeenNatural,
		},
		{
			name: "chain deleted",
			disrupt: func(t *testing.T, l *lab.Lab) {
				relRestoreBoth(t, l, "-F EGRESS-SNAT\n-D POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT\n-X EGRESS-SNAT\n")
			},
			kind: "chain-missing", drifted: relSeenNatural,
		},
		{
			name: "foreign MASQUERADE inserted first",
			disrupt: func(t *testing.T, l *lab.Lab) {
				both(t, l, "-t", "nat", "-I", "POSTROUTING", "1", "-o", "eth0", "-j", "MASQUERADE")
			},
			kind: "jump-not-first", drifted: relSeenNatural,
			after: func(t *testing.T, l *lab.Lab) {
				both(t, l, "-t", "nat", "-D", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
			},
		},
		{
			name: "set member deleted",
			disrupt: func(t *testing.T, l *lab.Lab) {
				for _, name := range strings.Fields(l.Run(t, "ipset", "list", "-n")) {
					if strings.HasPrefix(name, "egress-snat4-") {
						l.Run(t, "ipset", "del", name, "203.0.113.7")
					}
				}
			},
			kind: "set-out-of-date", drifted: map[string]string{"203.0.113.7": "192.0.2.250", "198.51.100.4": "192.0.2.22"},
		},
		{
			name:    "source address removed",
			disrupt: func(t *testing.T, l *lab.Lab) { l.HostAddrDel(t, "192.0.2.22/24", "eth0") },
			kind:    "to-not-on-host", reduced: true,
		},
		{
			name:    "source address added back",
			disrupt: func(t *testing.T, l *lab.Lab) { l.HostAddrAdd(t, "192.0.2.22/24", "eth0") },
			kind:    "rule-out-of-date", drifted: relSeenReduced,
		},
	}
}

// relFirewallReload does to POSTROUTING what a firewalld reload or a Docker
// restart does: in one transaction per family, flush it and put back the
// tool's own rules, not ours.
func relFirewallReload(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, fam := range []int{4, 6} {
		var b strings.Builder
		b.WriteString("-F POSTROUTING\n")
		for line := range strings.Lines(l.Run(t, iptablesCmd(fam), "-w", "5", "-t", "nat", "-S", "POSTROUTING")) {
			if strings.HasPrefix(line, "-A ") && !isOurs(line) {
				b.WriteString(line)
			}
		}
		relRestore(t, l, fam, b.String())
	}
}

// relRestore applies nat table commands to one family in one transaction
// (iptables-restore --noflush), as other tools do: watch never sees half
// of a drift.
func relRestore(t *testing.T, l *lab.Lab, fam int, commands string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", l.Host, iptablesCmd(fam)+"-restore", "--noflush", "--wait", "5")
	cmd.Stdin = strings.NewReader("*nat\n" + commands + "COMMIT\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s-restore in %s: %v\n%s\ninput:\n%s", iptablesCmd(fam), l.Host, err, out, commands)
	}
}

func relRestoreBoth(t *testing.T, l *lab.Lab, commands string) {
	t.Helper()
	relRestore(t, l, 4, commands)
	relRestore(t, l, 6, commands)
}

// TestDriftWatchRepairs runs watch -f FILE in a lab and makes the host drift
// in every way an operator or another tool can: a firewall reload flushing
// POSTROUTING, the chain flushed, the chain deleted, a foreign rule inserted
// ahead of the jump, a set member deleted, the source address of a rule
// removed from the host and added back.
//
// First with watch frozen (SIGSTOP), so the drift stays: check -f reports
// it (exit 1, the right kind in --json) and the far side sees the drifted
// source; then watch is thawed and must repair it. Then free-running, the
// way it runs in production: each drift is repaired within 2s (check is
// polled until it exits 0; the time from the drift to the write watch logs
// for it is the report's "time to reconverge"),
// and the far side sees the right source after each step; while the address
// is gone, it sees the natural source, not the vanished one.
//
// Then SIGHUP: an edited file is applied within 2s; a bad file is refused,
// watch keeps running, and keeps repairing drift towards the previous file.
// At the end SIGTERM stops watch with exit 0, leaving the rules in place.
//
// Not parallel: the bound is on watch's latency, which other tests' load
// (with iptables-legacy, one xtables lock for every namespace) would
// measure instead.
func TestDriftWatchRepairs(t *testing.T) {
	iptablesOnly(t, "its drifts are iptables' (a flushed POSTROUTING, a displaced jump, an ipset member; TestNFTDriftRepaired)")
	rounds := relEnvInt(t, "EGRESS_SNAT_DRIFT_ROUNDS", 2)
	l := newLab(t)
	addForeignRules(t, l)
	foreignBefore := notOurs(l.Ruleset(t))
	dir := t.TempDir()
	path := relWrite(t, dir, "egress-snat.yaml", relDriftFull)
	full := relWrite(t, dir, "full.yaml", relDriftFull)
	reduced := relWrite(t, dir, "reduced.yaml", relDriftReduced)
	w := relStartWatch(t, l, path)
	wantSeen(t, l, relSeenFull)
	events := 0

	target := func(s relDriftStep) (string, map[string]string) {
		if s.reduced {
			return reduced, relSeenReduced
		}
		return full, relSeenFull
	}

	t.Run("frozen", func(t *testing.T) {
		for _, s := range relDriftSteps() {
			w.freeze(t)
			s.disrupt(t, l)
			events++
			code, kinds := relCheck(t, l, full)
			if code != checkDrift || !slices.Contains(kinds, s.kind) {
				t.Errorf("%s: check -f exit %d, kinds %v; want exit %d and %q", s.name, code, kinds, checkDrift, s.kind)
			}
			if s.drifted != nil {
				wantSeen(t, l, s.drifted)
			}
			thawed := time.Now()
			w.thaw(t)
			file, seen := target(s)
			took, _, ok := w.awaitRepair(t, l, file, thawed)
			if !ok || took > relReconverge {
				t.Errorf("%s: after thawing watch, repaired after %s (in sync %v), want within %s", s.name, took, ok, relReconverge)
			}
			t.Logf("%s: reported as %v; repaired %s after thawing", s.name, kinds, took.Round(time.Millisecond))
			wantSeen(t, l, seen)
			if s.after != nil {
				s.after(t, l)
			}
		}
	})

	// times: until watch logged the repair; pollTimes: until check saw it.
	var times, pollTimes []time.Duration
	t.Run("free-running", func(t *testing.T) {
		for round := range rounds {
			for _, s := range relDriftSteps() {
				s.disrupt(t, l)
				events++
				file, seen := target(s)
				took, polled, ok := w.awaitRepair(t, l, file, time.Now())
				times, pollTimes = append(times, took), append(pollTimes, polled)
				if !ok || took > relReconverge {
					t.Errorf("round %d: %s: repaired after %s (in sync %v), want within %s\nlog:\n%s", round, s.name, took, ok, relReconverge, w.p.stderr.String())
				}
				wantSeen(t, l, seen)
				if s.after != nil {
					s.after(t, l)
				}
			}
		}
	})

	t.Run("SIGHUP", func(t *testing.T) {
		edited := relWrite(t, dir, "edited.yaml", relDriftEdited)
		relWrite(t, dir, "egress-snat.yaml", relDriftEdited)
		// On its own: sent to watch, it would wait for the reload of
		// the file just written.
		if code, kinds := relCheckAlone(t, l, edited); code != checkDrift || !slices.Contains(kinds, "rule-out-of-date") {
			t.Errorf("edited file before SIGHUP: check -f exit %d, kinds %v; want rule-out-of-date", code, kinds)
		}
		hup := time.Now()
		w.p.cmd.Process.Signal(syscall.SIGHUP)
		events++
		took, polled, ok := w.awaitRepair(t, l, edited, hup)
		times, pollTimes = append(times, took), append(pollTimes, polled)
		if !ok || took > relReconverge {
			t.Errorf("SIGHUP with an edited file: applied after %s (in sync %v), want within %s", took, ok, relReconverge)
		}
		wantSeen(t, l, relSeenEdited)

		// A bad file: refused, the previous desired state kept.
		before := l.Ruleset(t)
		relWrite(t, dir, "egress-snat.yaml", "rules:\n  - to: 192.0.2.300\n    dst: [198.51.100.4]\n")
		w.p.cmd.Process.Signal(syscall.SIGHUP)
		events++
		time.Sleep(relReconverge)
		if w.p.exited() {
			t.Fatalf("watch exited on a bad file at SIGHUP: %v\nlog:\n%s", w.p.err, w.p.stderr.String())
		}
		if log := w.p.stderr.String(); !strings.Contains(log, "keeping the previous desired state") || !strings.Contains(log, "192.0.2.300") {
			t.Errorf("watch log after a bad file at SIGHUP: want it to keep the previous state and name 192.0.2.300:\n%s", log)
		}
		if after := l.Ruleset(t); after != before {
			t.Errorf("a bad file at SIGHUP changed the rules:\n%s", cmp.Diff(before, after))
		}
		// It goes on repairing towards the file it had.
		relFirewallReload(t, l)
		events++
		took, polled, ok = w.awaitRepair(t, l, edited, time.Now())
		times, pollTimes = append(times, took), append(pollTimes, polled)
		if !ok || took > relReconverge {
			t.Errorf("drift after a refused SIGHUP: repaired towards the previous file after %s (in sync %v), want within %s", took, ok, relReconverge)
		}
		wantSeen(t, l, relSeenEdited)
		// Put the good file back, so that a restart would load it.
		if err := os.WriteFile(path, []byte(relDriftEdited), 0o644); err != nil {
			t.Fatal(err)
		}
	})

	if got := notOurs(l.Ruleset(t)); got != foreignBefore {
		t.Errorf("foreign rules changed (-before +after):\n%s", relDiff(foreignBefore, got))
	}
	median, maximum := relStats(times)
	pollMedian, pollMax := relStats(pollTimes)
	t.Logf("%d drift events; time to reconverge over %d free-running ones: median %s, max %s (until check saw it: median %s, max %s)",
		events, len(times), median, maximum, pollMedian, pollMax)
	relFigure(t, "drift_events", events)
	relFigure(t, "reconverge_samples", len(times))
	relFigure(t, "reconverge_median_ms", relMS(median))
	relFigure(t, "reconverge_max_ms", relMS(maximum))
	relFigure(t, "reconverge_seen_median_ms", relMS(pollMedian))
	relFigure(t, "reconverge_seen_max_ms", relMS(pollMax))
}
