package reconcile_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/api"
	"github.com/egress-snat/egress-snat/snat"
)

// testCommands is a daemon's Commands over the fakes: "set DST TO" adds
// a rule beside what is installed, "list" prints what is installed,
// "block" holds the loop until released, "panic" panics; each counts.
type testCommands struct {
	release chan struct{}
	ran     atomic.Int32
	known   atomic.Int32 // requests whose Manager knew a plan written
}

func (tc *testCommands) run(ctx context.Context, m *snat.Manager, r api.Request) api.Result {
	tc.ran.Add(1)
	if m.Memory != nil && m.Memory.Known() != nil {
		tc.known.Add(1)
	}
	switch r.Args[0] {
	case "block":
		<-tc.release
		return api.Result{}
	case "panic":
		panic("boom")
	case "list":
		st, err := m.Read()
		if err != nil {
			return api.Result{Exit: 1, Stderr: []byte(err.Error())}
		}
		var out strings.Builder
		for _, e := range st.Entries() {
			fmt.Fprintf(&out, "%s -> %s\n", e.Dst, e.ToString())
		}
		return api.Result{Stdout: []byte(out.String())}
	case "set":
		e := snat.Entry{Match: snat.Match{Sender: snat.Host(), Dst: netip.MustParsePrefix(r.Args[1]), Out: "eth0"},
			Natural: netip.MustParseAddr("192.0.2.250"), To: []netip.Addr{netip.MustParseAddr(r.Args[2])}}
		_, p, err := m.Update(snat.Request{LockTimeout: time.Second, Desired: func(st *snat.State) ([]snat.Entry, error) {
			return snat.Merge(st.Entries(), []snat.Entry{e}), nil
		}})
		if err != nil {
			return api.Result{Exit: 1, Stderr: []byte(err.Error())}
		}
		return api.Result{Stdout: []byte(p.Summary() + "\n")}
	}
	return api.Result{Decline: "unknown"}
}

func (h *fakeHost) call(t *testing.T, wait time.Duration, args ...string) api.Result {
	t.Helper()
	res, err := api.Call(h.apiDir, api.Request{V: api.Version, Args: args, Cwd: "/", WaitMS: wait.Milliseconds()}, 2*time.Second)
	if err != nil {
		t.Fatalf("%q: %v", args, err)
	}
	return res
}

// TestDaemonServes: the daemon serves commands on its socket, one at a
// time on its loop, with a Manager that knows what was written last; a
// change of the kernel alone (not of the file) is undone by the next
// canary, as when a one-shot run makes it; a request that cannot get its
// turn within its wait is told the daemon was busy; a panic is the
// request's alone; once stopped, there is no socket, and a client runs
// on its own.
func TestDaemonServes(t *testing.T) {
	h := newFakeHost(t)
	tc := &testCommands{release: make(chan struct{})}
	h.commands, h.apiDir = tc.run, t.TempDir()
	h.write(t, "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	h.start(t)
	h.awaitHealth(t)
	want := []string{"198.51.100.4/32 -> 192.0.2.22"}

	if r := h.call(t, time.Second, "list"); string(r.Stdout) != "198.51.100.4/32 -> 192.0.2.22\n" || r.Exit != 0 {
		t.Errorf("list: %q, exit %d", r.Stdout, r.Exit)
	}
	if tc.known.Load() != 1 {
		t.Error("a command's Manager did not know the plan the daemon wrote")
	}

	// A set of the kernel alone: the daemon's desired state is its file,
	// and its canary writes it back.
	if r := h.call(t, time.Second, "set", "203.0.113.9/32", "192.0.2.23"); r.Exit != 0 {
		t.Fatalf("set: exit %d: %s", r.Exit, r.Stderr)
	}
	if !h.await(t, "converged", `"reason":"drift: `) {
		t.Fatalf("the set of the kernel alone was not undone\nlog:\n%s", h.log)
	}
	h.wantInstalled(t, "after the canary", want)
	if h.count("command served", `"exit":0`) < 2 {
		t.Errorf("served commands not logged\nlog:\n%s", h.log)
	}

	// The loop is held by one request: another that waits 100ms is told
	// the daemon was busy; released, the first is answered.
	blocked := make(chan api.Result, 1)
	go func() { blocked <- h.call(t, time.Second, "block") }()
	for tc.ran.Load() < 3 {
		time.Sleep(5 * time.Millisecond)
	}
	if r := h.call(t, 100*time.Millisecond, "list"); r.Exit != 1 || !strings.Contains(string(r.Stderr), "busy") {
		t.Errorf("while the loop is held: exit %d, %q; want exit 1, busy", r.Exit, r.Stderr)
	}
	close(tc.release)
	if r := <-blocked; r.Exit != 0 {
		t.Errorf("the blocking request: exit %d", r.Exit)
	}

	if r := h.call(t, time.Second, "panic"); r.Exit != 1 || !strings.Contains(string(r.Stderr), "internal error") {
		t.Errorf("panic: exit %d, %q; want exit 1, an internal error", r.Exit, r.Stderr)
	}
	if r := h.call(t, time.Second, "list"); r.Exit != 0 {
		t.Errorf("list after a panic: exit %d, %q", r.Exit, r.Stderr)
	}

	h.stop(t)
	if _, err := api.Call(h.apiDir, api.Request{V: api.Version, Args: []string{"list"}, Cwd: "/"}, time.Second); !errors.Is(err, api.ErrNoDaemon) {
		t.Errorf("after the daemon stopped: %v, want ErrNoDaemon", err)
	}
}

// TestDaemonForgetsForCommands: a command resolves against the host as
// it is: after an event, the router has forgotten what it cached before
// the command runs; with no event, a command keeps the snapshot.
func TestDaemonForgetsForCommands(t *testing.T) {
	h := newFakeHost(t)
	tc := &testCommands{}
	h.commands, h.apiDir = tc.run, t.TempDir()
	h.write(t, "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	h.start(t)
	h.awaitHealth(t)
	before := h.router.forgotten()
	h.call(t, time.Second, "list")
	if h.router.forgotten() != before {
		t.Error("a command made the router forget with no change of the host")
	}
	// The event's reconcile forgets, or, when the command comes first,
	// the command's router does.
	h.event("test: route change")
	h.call(t, time.Second, "list")
	if h.router.forgotten() == before {
		t.Error("after an event, a command's router did not forget what it cached")
	}
}

func (r *fakeRouter) forgotten() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.forgot
}
