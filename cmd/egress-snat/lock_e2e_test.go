package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/internal/lockfile"
	"github.com/egress-snat/egress-snat/snat"
)

// holdLock takes an exclusive flock on path until the test ends, as another
// program holding the lock would.
func holdLock(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
}

// TestOwnLockIsBounded: a run that finds another egress-snat run holding the
// namespace's lock waits at most --lock-timeout, then fails with exit 1, a
// message saying so, and nothing changed.
func TestOwnLockIsBounded(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	var st unix.Stat_t
	if err := unix.Stat("/run/netns/"+l.Host, &st); err != nil {
		t.Fatal(err)
	}
	holdLock(t, filepath.Join(snat.LockDir, fmt.Sprintf("netns-%d.lock", st.Ino)))
	before := l.Ruleset(t)
	start := time.Now()
	r := es(t, l, "--lock-timeout", "500ms", "set", "--to", "192.0.2.23", "--dst", "198.51.100.4")
	took := time.Since(start)
	if r.code != exitFailure || !strings.Contains(r.stderr, "another egress-snat run is holding the lock") {
		t.Errorf("set while locked: exit %d, stderr %q; want exit %d naming the lock", r.code, r.stderr, exitFailure)
	}
	if took > 3*time.Second {
		t.Errorf("a 500ms lock timeout took %s", took)
	}
	if after := l.Ruleset(t); after != before {
		t.Errorf("a run that timed out on the lock changed the ruleset")
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})
}

// TestXtablesLockIsBounded: with iptables-legacy, another program holding the
// xtables lock makes the write fail after the bound, with the host unchanged.
// XTABLES_LOCKFILE points iptables at a lock of the test's own, so the real
// /run/xtables.lock of the machine is never held.
func TestXtablesLockIsBounded(t *testing.T) {
	iptablesOnly(t, "it holds the xtables lock, which the nftables backend never takes")
	t.Parallel()
	l := newLab(t)
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	holdLock(t, lock)
	legacySave := func() string {
		var out []string
		for _, cmd := range []string{"iptables-legacy-save", "ip6tables-legacy-save"} {
			for _, line := range strings.Split(l.Run(t, cmd), "\n") {
				if !strings.HasPrefix(line, "#") {
					out = append(out, line)
				}
			}
		}
		return strings.Join(out, "\n")
	}
	before := legacySave()
	stdout, stderr, code := l.RunErr("env", "XTABLES_LOCKFILE="+lock, "EGRESS_SNAT_IPTABLES=legacy", bin, "--lock-timeout", "1s", "set", "--to", "192.0.2.23", "--dst", "198.51.100.4")
	if code != exitFailure || !strings.Contains(stderr, "xtables lock") {
		t.Errorf("set while the xtables lock is held: exit %d\nstdout %s\nstderr %s\nwant exit %d naming the xtables lock", code, stdout, stderr, exitFailure)
	}
	if after := legacySave(); after != before {
		t.Errorf("a run that timed out on the xtables lock changed the legacy ruleset:\n%s", after)
	}
}

// bareNetns creates an empty named network namespace (ip netns add) and
// returns its name and inode; del deletes it (also done at the end).
func bareNetns(t *testing.T, tag string) (name string, ino uint64, del func()) {
	t.Helper()
	name = fmt.Sprintf("es-%s-%d-%d", tag, os.Getpid(), time.Now().UnixNano()%1e9)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	deleted := false
	del = func() {
		if !deleted {
			deleted = true
			if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", name, err, out)
			}
		}
	}
	t.Cleanup(del)
	var st unix.Stat_t
	if err := unix.Stat("/run/netns/"+name, &st); err != nil {
		t.Fatal(err)
	}
	return name, st.Ino, del
}

// TestLockFilesDoNotPileUp: a run in a namespace leaves its lock files
// (netns-INODE.lock, pending-INODE.lock) in /run/egress-snat; once that
// namespace is gone, the next run elsewhere removes them, and keeps its own.
func TestLockFilesDoNotPileUp(t *testing.T) {
	lab.Require(t)
	empty := filepath.Join(t.TempDir(), "empty.yaml")
	if err := os.WriteFile(empty, []byte("rules: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	files := func(ino uint64) []string {
		var out []string
		for _, p := range []string{"netns", "pending"} {
			path := filepath.Join(snat.LockDir, fmt.Sprintf("%s-%d.lock", p, ino))
			if _, err := os.Stat(path); err == nil {
				out = append(out, path)
			}
		}
		return out
	}
	run := func(ns string) {
		t.Helper()
		if out, err := exec.Command("ip", "netns", "exec", ns, bin, "apply", "-f", empty).CombinedOutput(); err != nil {
			t.Fatalf("apply in %s: %v: %s", ns, err, out)
		}
	}

	gone, goneIno, del := bareNetns(t, "gone")
	run(gone)
	if f := files(goneIno); len(f) != 2 {
		t.Fatalf("after a run in %s, its lock files are %v, want netns- and pending-%d.lock", gone, f, goneIno)
	}
	del()

	next, nextIno, _ := bareNetns(t, "next")
	run(next)
	if f := files(goneIno); len(f) != 0 {
		// Inode numbers are reused: a namespace created since, by a test
		// beside this one, may have this one and be live.
		if live, _, _ := lockfile.LiveNetns(nil); !live[goneIno] {
			t.Errorf("the lock files of the deleted namespace %s remain: %v", gone, f)
		}
	}
	if f := files(nextIno); len(f) != 2 {
		t.Errorf("the live namespace %s's lock files are %v, want both kept", next, f)
	}
}
