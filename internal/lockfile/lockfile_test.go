package lockfile

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/internal/lab"
)

func mustLock(t *testing.T, path string) func() {
	t.Helper()
	unlock, err := Lock(path, time.Second)
	if err != nil {
		t.Fatalf("Lock(%s): %v", path, err)
	}
	return unlock
}

// TestLockExcludesAndTimesOut: a second Lock of the same path waits for the
// first and gives up after its timeout with ErrTimeout naming the path; it
// gets the lock once the first lets go.
func TestLockExcludesAndTimesOut(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "netns-1.lock")
	unlock := mustLock(t, path)
	start := time.Now()
	_, err := Lock(path, 100*time.Millisecond)
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), path) {
		t.Errorf("Lock of a held lock: %v, want ErrTimeout naming %s", err, path)
	}
	if took := time.Since(start); took < 100*time.Millisecond {
		t.Errorf("gave up after %s, before its 100ms", took)
	}
	unlock()
	mustLock(t, path)()
}

// TestLockFollowsARemovedFile: a waiter whose file is removed while it waits
// (Sweep does that) does not end up holding the removed file: it locks the
// file the path names now, so a third run that comes after cannot take the
// lock beside it.
func TestLockFollowsARemovedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "netns-1.lock")
	unlockA := mustLock(t, path)
	got := make(chan func())
	go func() {
		unlock, err := Lock(path, 5*time.Second)
		if err != nil {
			t.Error(err)
			close(got)
			return
		}
		got <- unlock
	}()
	time.Sleep(3 * pollEvery) // B has opened the file and waits
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	unlockA()
	unlockB := <-got
	if unlockB == nil {
		t.FailNow()
	}
	defer unlockB()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("B holds the lock but %s does not exist: it locked the removed file", path)
	}
	if _, err := Lock(path, 100*time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Errorf("C took the lock while B held it: %v", err)
	}
}

// write creates the named files in dir.
func write(t *testing.T, dir string, names ...string) {
	t.Helper()
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func names(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// fakeLive says which namespaces exist, as LiveNetns would.
func fakeLive(complete bool, inodes ...uint64) Liveness {
	return func(map[uint64]bool) (map[uint64]bool, bool, error) {
		m := map[uint64]bool{}
		for _, i := range inodes {
			m[i] = true
		}
		return m, complete, nil
	}
}

// TestSweep: the files of gone namespaces go, record and all; those of
// live namespaces, of this process's, of other prefixes, and a held lock's
// stay; a record whose namespace may still exist (liveness incomplete)
// stays; nothing goes when liveness cannot tell.
func TestSweep(t *testing.T) {
	self, err := Netns()
	if err != nil {
		t.Fatal(err)
	}
	own := func(prefix, ext string) string { return filepath.Base(Path("", prefix, self, ext)) }
	dir := t.TempDir()
	write(t, dir,
		"netns-101.lock",                                               // gone
		"netns-102.lock",                                               // live
		"netns-103.lock",                                               // gone, held
		"pending-101.lock", "pending-101.json", "pending-101.json.tmp", // gone, with a record
		"pending-104.json",                         // gone, a record without its lock
		"other-101.lock", "netns-x.lock", "README", // not ours to judge
		own("netns", "lock"), own("pending", "lock"),
	)
	held := mustLock(t, filepath.Join(dir, "netns-103.lock"))
	defer held()

	removed, err := Sweep(dir, fakeLive(true, 102), "netns", "pending")
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, n := range []string{"netns-101.lock", "pending-101.json", "pending-101.json.tmp", "pending-101.lock", "pending-104.json", "pending-104.lock"} {
		want = append(want, filepath.Join(dir, n))
	}
	slices.Sort(want)
	if d := cmp.Diff(want, removed); d != "" {
		t.Errorf("removed (-want +got):\n%s", d)
	}
	left := []string{"README", own("netns", "lock"), own("pending", "lock"), "netns-102.lock", "netns-103.lock", "netns-x.lock", "other-101.lock"}
	slices.Sort(left)
	if d := cmp.Diff(left, names(t, dir)); d != "" {
		t.Errorf("left in %s (-want +got):\n%s", dir, d)
	}

	// Incomplete liveness: a lone lock file goes, a record stays.
	dir = t.TempDir()
	write(t, dir, "netns-201.lock", "pending-201.lock", "pending-201.json")
	if _, err := Sweep(dir, fakeLive(false), "netns", "pending"); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"pending-201.json", "pending-201.lock"}, names(t, dir)); d != "" {
		t.Errorf("with incomplete liveness, left (-want +got):\n%s", d)
	}

	// Liveness that cannot tell: nothing goes.
	if _, err := Sweep(dir, func(map[uint64]bool) (map[uint64]bool, bool, error) { return nil, false, ErrCannotTell }, "netns", "pending"); err != nil {
		t.Fatal(err)
	}
	if n := names(t, dir); len(n) != 2 {
		t.Errorf("liveness could not tell, yet files went: left %v", n)
	}

	// A missing directory is nothing to sweep.
	if removed, err := Sweep(filepath.Join(dir, "none"), fakeLive(true), "netns"); err != nil || removed != nil {
		t.Errorf("Sweep of a missing directory: %v, %v", removed, err)
	}
}

// TestLiveNetns, with the real kernel: this process's namespace is live, a
// namespace bound to a path by ip netns add is live with no process in it,
// and after ip netns del, with no process in it, it is gone.
func TestLiveNetns(t *testing.T) {
	lab.Require(t)
	self, err := Netns()
	if err != nil {
		t.Fatal(err)
	}
	name := "es-lockfile-" + strings.ReplaceAll(time.Now().Format("150405.000000"), ".", "")
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	deleted := false
	t.Cleanup(func() {
		if !deleted {
			exec.Command("ip", "netns", "del", name).Run()
		}
	})
	var st unix.Stat_t
	if err := unix.Stat("/run/netns/"+name, &st); err != nil {
		t.Fatal(err)
	}
	live, _, err := LiveNetns(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !live[self] {
		t.Errorf("this process's namespace %d is not live", self)
	}
	if !live[st.Ino] {
		t.Errorf("the namespace %s (%d), bound by ip netns add, is not live", name, st.Ino)
	}
	// Asked for those two only, it finds them too (and may stop there).
	if some, _, err := LiveNetns(map[uint64]bool{self: true, st.Ino: true}); err != nil || !some[self] || !some[st.Ino] {
		t.Errorf("LiveNetns of %d and %d: %v, %v; want both live", self, st.Ino, some, err)
	}
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del %s: %v: %s", name, err, out)
	}
	deleted = true
	live, _, err = LiveNetns(nil)
	if err != nil {
		t.Fatal(err)
	}
	if live[st.Ino] {
		// Inode numbers are reused, lowest first: a namespace created since
		// by a test running beside this one may hold it now. Only a mount
		// at our path would mean that the deletion went unnoticed.
		mounts, _ := os.ReadFile("/proc/self/mountinfo")
		if strings.Contains(string(mounts), " /run/netns/"+name+" ") {
			t.Errorf("the namespace %s (%d) is live after ip netns del", name, st.Ino)
		} else {
			t.Logf("inode %d is live again: another namespace has it since", st.Ino)
		}
	}
}
