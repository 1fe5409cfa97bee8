package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/internal/lab"
)

// permIntents reads the permanent file as apply -f would, rendered as
// "DST -> TO" lines in file order.
func permIntents(t *testing.T, path string) []string {
	t.Helper()
	f, err := config.Load(path)
	if err != nil {
		t.Fatalf("the permanent file does not load: %v", err)
	}
	in, err := f.Intents()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, i := range in {
		s := fmt.Sprintf("%s -> %s", i.Dst, i.To[0])
		for _, a := range i.To[1:] {
			s += "," + a.String()
		}
		out = append(out, s)
	}
	return out
}

// inSyncWithFile runs check with no -f against the permanent file.
func inSyncWithFile(t *testing.T, l *lab.Lab, path string) {
	t.Helper()
	if r := es(t, l, "--config", path, "check"); r.code != checkInSync {
		t.Errorf("check --config %s: exit %d, want in sync\n%s%s", path, r.code, r.stdout, r.stderr)
	}
}

// TestPermanentCommands: set, rotate, unset and clear with --permanent
// change the kernel and the file in one step; the file's comment survives;
// check without -f compares with the file after each step.
func TestPermanentCommands(t *testing.T) {
	l := newLab(t)
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	if err := os.WriteFile(path, []byte("# kept by hand and by --permanent\nrules: []\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	p := func(args ...string) { t.Helper(); mustES(t, l, append([]string{"--config", path}, args...)...) }

	p("set", "--permanent", "--to", "192.0.2.22", "--dst", "198.51.100.4", "--dst", "198.51.100.5")
	p("set", "--permanent", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::/48")
	if diff := cmp.Diff([]string{"198.51.100.4/32 -> 192.0.2.22", "198.51.100.5/32 -> 192.0.2.22", "2001:db8:ffff::/48 -> 2001:db8::22"}, permIntents(t, path)); diff != "" {
		t.Errorf("file after set --permanent (-want +got):\n%s", diff)
	}
	inSyncWithFile(t, l, path)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22"})

	// Another sender for the same destination is another rule, in the
	// kernel and in the file; unset --permanent of it leaves the host's.
	p("set", "--permanent", "--uid", "0", "--to", "192.0.2.23", "--dst", "198.51.100.4")
	if got := permIntents(t, path); len(got) != 4 {
		t.Errorf("file after a uid rule for the same destination: %v, want 4 intents", got)
	}
	inSyncWithFile(t, l, path)
	p("unset", "--permanent", "--uid", "0", "--dst", "198.51.100.4")
	if diff := cmp.Diff([]string{"198.51.100.4/32 -> 192.0.2.22", "198.51.100.5/32 -> 192.0.2.22", "2001:db8:ffff::/48 -> 2001:db8::22"}, permIntents(t, path)); diff != "" {
		t.Errorf("file after unset --permanent --uid 0 (-want +got):\n%s", diff)
	}
	inSyncWithFile(t, l, path)

	p("rotate", "--permanent", "--pool", "192.0.2.22,192.0.2.23", "--dst", "198.51.100.4")
	if diff := cmp.Diff([]string{"198.51.100.5/32 -> 192.0.2.22", "2001:db8:ffff::/48 -> 2001:db8::22", "198.51.100.4/32 -> 192.0.2.23"}, permIntents(t, path)); diff != "" {
		t.Errorf("file after rotate --permanent (-want +got):\n%s", diff)
	}
	inSyncWithFile(t, l, path)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23", "198.51.100.5": "192.0.2.22"})

	// A runtime-only change is drift from the permanent state.
	p("set", "--to", "192.0.2.23", "--dst", "203.0.113.7")
	if r := es(t, l, "--config", path, "check"); r.code != checkDrift {
		t.Errorf("check after a runtime-only set: exit %d, want %d (drift from the file)\n%s", r.code, checkDrift, r.stdout)
	}
	p("unset", "--dst", "203.0.113.7")

	p("unset", "--permanent", "--dst", "198.51.100.5")
	if diff := cmp.Diff([]string{"2001:db8:ffff::/48 -> 2001:db8::22", "198.51.100.4/32 -> 192.0.2.23"}, permIntents(t, path)); diff != "" {
		t.Errorf("file after unset --permanent (-want +got):\n%s", diff)
	}
	inSyncWithFile(t, l, path)

	// --dry-run changes neither.
	before, _ := os.ReadFile(path)
	p("clear", "--permanent", "--dry-run")
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Errorf("clear --permanent --dry-run changed the file:\n%s", after)
	}
	p("clear", "--permanent")
	got, _ := os.ReadFile(path)
	if string(got) != "# kept by hand and by --permanent\nrules: []\n" {
		t.Errorf("file after clear --permanent: %q", got)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode after the edits: %v, want 0640 kept", fi.Mode().Perm())
	}
	if ours := ourLines(l.Ruleset(t)); ours != "" {
		t.Errorf("rules left after clear --permanent:\n%s", ours)
	}
	inSyncWithFile(t, l, path)
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("the folder holds %d files, want only the permanent file (no temporary left)", len(entries))
	}
}

// TestPermanentNothingChangesOnFailure: when the file cannot be parsed or
// written, neither the kernel nor the file changes; when the kernel write
// fails, the file is not written.
func TestPermanentNothingChangesOnFailure(t *testing.T) {
	iptablesOnly(t, "it makes iptables-restore fail")
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	badText := "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n    gateway: eth0\n"
	if err := os.WriteFile(bad, []byte(badText), 0o644); err != nil {
		t.Fatal(err)
	}
	before := l.Ruleset(t)
	for _, tc := range []struct {
		name, config string
		code         int
	}{
		{"unparseable file", bad, exitUsage},
		{"unwritable folder", filepath.Join(dir, "missing", "egress-snat.yaml"), exitFailure},
	} {
		for _, args := range [][]string{
			{"set", "--permanent", "--to", "192.0.2.23", "--dst", "198.51.100.4"},
			{"unset", "--permanent", "--dst", "198.51.100.4"},
			{"rotate", "--permanent", "--pool", "192.0.2.22,192.0.2.23", "--dst", "198.51.100.4"},
			{"clear", "--permanent"},
		} {
			r := es(t, l, append([]string{"--config", tc.config}, args...)...)
			if r.code != tc.code {
				t.Errorf("%s: %s: exit %d, want %d\n%s", tc.name, strings.Join(args, " "), r.code, tc.code, r.stderr)
			}
			if !strings.Contains(r.stderr, tc.config) {
				t.Errorf("%s: %s: stderr %q does not name the file", tc.name, args[0], r.stderr)
			}
			if after := l.Ruleset(t); after != before {
				t.Errorf("%s: %s changed the kernel:\n%s", tc.name, args[0], cmp.Diff(before, after))
			}
		}
	}
	if got, _ := os.ReadFile(bad); string(got) != badText {
		t.Errorf("the unparseable file was changed to:\n%s", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing folder was created")
	}

	// A failing kernel write: iptables-legacy waits for an xtables lock
	// the test holds (its own lock file, never the machine's).
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	holdLock(t, lock)
	good := filepath.Join(dir, "good.yaml")
	goodText := "# mine\nrules: []\n"
	if err := os.WriteFile(good, []byte(goodText), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := l.RunErr("env", "XTABLES_LOCKFILE="+lock, "EGRESS_SNAT_IPTABLES=legacy", bin, "--lock-timeout", "1s", "--config", good,
		"set", "--permanent", "--to", "192.0.2.23", "--dst", "203.0.113.7")
	if code != exitFailure {
		t.Errorf("set --permanent with a failing kernel write: exit %d, want %d\n%s", code, exitFailure, stderr)
	}
	if got, _ := os.ReadFile(good); string(got) != goodText {
		t.Errorf("a failed kernel write still wrote the file:\n%s", got)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Errorf("the folder holds %d files, want 2 (no temporary left)", len(entries))
	}
}

// TestPermanentConcurrentSetRotate: set --permanent runs racing rotate
// --permanent runs lose nothing, in the kernel or in the file: the file is
// read, edited and written under the lock the kernel write takes.
func TestPermanentConcurrentSetRotate(t *testing.T) {
	l := newLab(t)
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	const sets, rotations = 8, 8
	var wg sync.WaitGroup
	errs := make(chan string, sets+rotations)
	for i := range sets {
		wg.Go(func() {
			r := es(t, l, "--config", path, "--lock-timeout", "60s", "set", "--permanent", "--to", "192.0.2.22", "--dst", fmt.Sprintf("203.0.113.%d", 10+i))
			if r.code != 0 {
				errs <- fmt.Sprintf("set %d: exit %d: %s", i, r.code, r.stderr)
			}
		})
	}
	for i := range rotations {
		wg.Go(func() {
			r := es(t, l, "--config", path, "--lock-timeout", "60s", "rotate", "--permanent", "--pool", "192.0.2.22,192.0.2.23", "--dst", "198.51.100.4")
			if r.code != 0 {
				errs <- fmt.Sprintf("rotate %d: exit %d: %s", i, r.code, r.stderr)
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	got := permIntents(t, path)
	want := map[string]bool{}
	for i := range sets {
		want[fmt.Sprintf("203.0.113.%d/32 -> 192.0.2.22", 10+i)] = true
	}
	// An even number of rotations over two addresses ends where it began:
	// the first moved to .22, so the last leaves .23.
	want["198.51.100.4/32 -> 192.0.2.23"] = true
	have := map[string]bool{}
	for _, g := range got {
		have[g] = true
	}
	if diff := cmp.Diff(want, have); diff != "" {
		t.Errorf("the permanent file after the race (-want +got):\n%s", diff)
	}
	inSyncWithFile(t, l, path)
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23"})
}

// TestCheckWithoutFile: with no permanent file, check says it can only
// check what it finds; with one, a flushed chain is drift.
func TestCheckWithoutFile(t *testing.T) {
	iptablesOnly(t, "it wipes the iptables nat table (TestNFTDriftRepaired deletes the nftables table)")
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	missing := filepath.Join(t.TempDir(), "none.yaml")
	r := es(t, l, "--config", missing, "check")
	if r.code != checkInSync || !strings.Contains(r.stderr, "no permanent file "+missing) {
		t.Errorf("check with no permanent file: exit %d, stderr %q; want in sync and a note naming %s", r.code, r.stderr, missing)
	}
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	mustES(t, l, "--config", path, "save")
	inSyncWithFile(t, l, path)
	// What a firewalld reload does to the nat table: flush every chain and
	// delete the user-defined ones.
	for _, fam := range []int{4, 6} {
		foreign(t, l, fam, "-t", "nat", "-F")
		foreign(t, l, fam, "-t", "nat", "-X")
	}
	r = es(t, l, "--config", path, "check")
	if r.code != checkDrift || !strings.Contains(r.stdout, "chain-missing") {
		t.Errorf("check with the permanent file after the nat table was wiped: exit %d\n%s\nwant %d, chain-missing", r.code, r.stdout, checkDrift)
	}
	// Without a file the wipe leaves nothing to compare: that is why check
	// says so.
	if r := es(t, l, "--config", missing, "check"); r.code != checkInSync || !strings.Contains(r.stderr, "cannot be seen") {
		t.Errorf("check with no file after the wipe: exit %d, stderr %q; want in sync with the note", r.code, r.stderr)
	}
}

// permWatch starts what the boot unit starts, `egress-snat watch` with no
// -f (the permanent file given by --config), and waits until the host is in
// sync with the file. It stops watch at t's cleanup.
func permWatch(t *testing.T, l *lab.Lab, path string, flags ...string) *relProc {
	t.Helper()
	p := relStart(t, l, append([]string{"--config", path, "watch", "--log-format", "json"}, flags...)...)
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		if code, ok := p.wait(10 * time.Second); !ok || code != 0 {
			if !ok {
				p.cmd.Process.Kill()
				<-p.done
			}
			t.Errorf("watch: exit %d (stopped %v) after SIGTERM\n%s", code, ok, p.stderr.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if r := es(t, l, "--config", path, "check"); r.code == checkInSync {
			return p
		}
		if p.exited() || time.Now().After(deadline) {
			t.Fatalf("watch with the permanent file %s: not in sync after 10s\n%s", path, p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestWatchFollowsPermanentFile: watch with no -f follows the permanent
// file, and a --permanent change made while it runs stays (watch re-reads
// the file instead of reverting the kernel to the old one).
func TestWatchFollowsPermanentFile(t *testing.T) {
	l := newLab(t)
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	if r := es(t, l, "--config", path, "watch"); r.code != exitUsage || !strings.Contains(r.stderr, path) {
		t.Errorf("watch with no file at all: exit %d, stderr %q; want %d naming %s", r.code, r.stderr, exitUsage, path)
	}
	mustES(t, l, "--config", path, "set", "--permanent", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	w := permWatch(t, l, path)
	mustES(t, l, "--config", path, "set", "--permanent", "--to", "192.0.2.23", "--dst", "203.0.113.7")
	mustES(t, l, "--config", path, "rotate", "--permanent", "--pool", "192.0.2.22,192.0.2.23", "--dst", "198.51.100.4")
	time.Sleep(2500 * time.Millisecond) // two canary periods
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23", "203.0.113.7": "192.0.2.23"})
	inSyncWithFile(t, l, path)
	if log := w.stderr.String(); !strings.Contains(log, "re-read") {
		t.Errorf("watch did not log re-reading the changed file:\n%s", log)
	}
}
