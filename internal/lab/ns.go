package lab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"

	"github.com/vishvananda/netns"
)

// Require skips t unless this process can build a lab: it must be root and
// have ip(8) and iptables(8). Namespace tests are worthless when they silently
// don't run, so when CI is set (or EGRESS_SNAT_REQUIRE_NETNS=1) a missing
// prerequisite fails the test instead of skipping it.
func Require(t testing.TB) {
	t.Helper()
	var missing string
	switch {
	case os.Geteuid() != 0:
		missing = "root"
	default:
		for _, bin := range []string{"ip", "iptables"} {
			if _, err := exec.LookPath(bin); err != nil {
				missing = bin
				break
			}
		}
	}
	if missing != "" {
		skipOrFail(t, "network-namespace test needs "+missing)
	}
}

// skipOrFail skips t with why, or fails it when CI is set or
// EGRESS_SNAT_REQUIRE_NETNS=1.
func skipOrFail(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") != "" || os.Getenv("EGRESS_SNAT_REQUIRE_NETNS") == "1" {
		t.Fatalf("%s (CI or EGRESS_SNAT_REQUIRE_NETNS=1 forbids skipping)", why)
	}
	t.Skip(why)
}

// Do runs fn on an OS thread that has been switched into the named network
// namespace (a name under /run/netns). Sockets created by fn stay in that
// namespace for their whole life, so they can be used from any goroutine
// after Do returns; that is the point of Do.
//
// fn runs on a fresh goroutine so that the caller's thread is never touched.
// The thread is switched back before it is unlocked; if switching back fails
// the thread is left locked, and Go destroys a thread whose goroutine exits
// while locked, so no goroutine can ever run in a namespace it didn't ask
// for. fn must therefore not start goroutines that expect to be in the
// namespace, and must not call t.FailNow (it is not the test goroutine).
// A panic in fn is re-raised in the caller.
func Do(ns string, fn func() error) error {
	target, err := netns.GetFromName(ns)
	if err != nil {
		return fmt.Errorf("open netns %q: %w", ns, err)
	}
	defer target.Close()

	type result struct {
		err   error
		panic any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread() // still in the original namespace
			done <- result{err: fmt.Errorf("get current netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread() // setns failed, thread unchanged
			done <- result{err: fmt.Errorf("enter netns %q: %w", ns, err)}
			return
		}

		var res result
		func() {
			defer func() { res.panic = recover() }()
			res.err = fn()
		}()

		if err := netns.Set(orig); err != nil {
			// Deliberately stay locked: this thread dies with the goroutine.
			done <- result{err: fmt.Errorf("leave netns %q: %w", ns, err), panic: res.panic}
			return
		}
		runtime.UnlockOSThread()
		done <- res
	}()

	res := <-done
	if res.panic != nil {
		panic(res.panic)
	}
	return res.err
}

// lockDir is snat.LockDir, which the lab cannot import (package lockfile's
// tests use the lab, and snat uses lockfile).
const lockDir = "/run/egress-snat"

// deleteNetns deletes namespace ns, and first the files egress-snat keeps
// for it under lockDir (its run lock, a pending apply --confirm
// record): they are named by the namespace's inode, which the kernel gives
// to a namespace created later, and a record left for this one would make
// egress-snat refuse an apply in that one.
func deleteNetns(ns string) ([]byte, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join("/run/netns", ns), &st); err == nil {
		files, _ := filepath.Glob(filepath.Join(lockDir, fmt.Sprintf("*-%d.*", st.Ino)))
		for _, f := range files {
			os.Remove(f)
		}
	}
	return exec.Command("ip", "netns", "delete", ns).CombinedOutput()
}
