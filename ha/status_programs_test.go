package ha_test

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/ha"
	"github.com/egress-snat/egress-snat/internal/lab"
)

// TestConntrackdStatus runs a real pair of conntrackds on the generated
// files, each in a namespace of its own joined by the sync link, and reads
// them as `egress-snat ha status` does: both healthy, a connection added
// to A's kernel table shows up in B's external cache, and once B's
// conntrackd is gone A says that nothing arrives from the peer. So the
// parser is checked against a live conntrackd, not only the captures in
// testdata/conntrackd.
func TestConntrackdStatus(t *testing.T) {
	lab.RequireHA(t)
	nsA := lab.NewScratch(t, "sync")
	nsB := lab.NewScratch(t)
	mustRun(t, "ip", "-n", nsA, "link", "set", "psync", "netns", nsB)
	mustRun(t, "ip", "-n", nsB, "link", "set", "psync", "name", "sync")
	mustRun(t, "ip", "-n", nsB, "link", "set", "sync", "up")
	a := ha.LabA()
	b := a
	b.Node, b.Peer = a.Peer, a.Node
	lab.ScratchAddr(t, nsA, a.Node.SyncAddr.String()+"/24", "sync")
	lab.ScratchAddr(t, nsB, b.Node.SyncAddr.String()+"/24", "sync")
	a, b = inDir(a, rootOwnedDir(t)), inDir(b, rootOwnedDir(t))
	writeFiles(t, a)
	writeFiles(t, b)
	kill := map[string]func(){}
	for _, n := range []struct {
		ns string
		c  ha.Config
	}{{nsA, a}, {nsB, b}} {
		cmd := exec.Command("ip", "netns", "exec", n.ns, "conntrackd", "-C", n.c.Paths.ConntrackdConf)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		stop := func() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		kill[n.ns] = stop
		t.Cleanup(stop)
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("conntrackd in %s:\n%s", n.ns, out.String())
			}
		})
	}
	stats := func(ns string, c ha.Config) ha.Stats {
		return func(ctx context.Context, what string) (string, error) {
			args := []string{"netns", "exec", ns, "conntrackd", "-C", c.Paths.ConntrackdConf, "-s"}
			if what != "" {
				args = append(args, what)
			}
			out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
			if err != nil {
				return "", fmt.Errorf("%v: %s", err, out)
			}
			return string(out), nil
		}
	}
	check := func(ns string, c ha.Config) ha.SyncHealth {
		t.Helper()
		var h ha.SyncHealth
		var err error
		deadline := time.Now().Add(10 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			h, err = ha.CheckSync(ctx, stats(ns, c), 100*time.Millisecond, 2500*time.Millisecond)
			cancel()
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond) // conntrackd still starting
		}
		if err != nil {
			t.Fatalf("CheckSync in %s: %v", ns, err)
		}
		return h
	}

	for _, n := range []struct {
		ns string
		c  ha.Config
	}{{nsA, a}, {nsB, b}} {
		if h := check(n.ns, n.c); !h.Healthy || h.Link != "sync" || h.LinkStatus != "RUNNING" || h.ReceivedInWindow == 0 {
			t.Errorf("%s with its peer up: %+v, want healthy, link sync running, something received", n.c.Node.Name, h)
		}
	}

	// A connection in A's kernel table (as if forwarded) reaches B's
	// external cache.
	mustRun(t, "ip", "netns", "exec", nsA, "conntrack", "-I", "-p", "tcp", "-s", "198.51.100.7", "-d", "203.0.113.7",
		"--sport", "40000", "--dport", "443", "--state", "ESTABLISHED", "-u", "ASSURED", "-t", "120")
	deadline := time.Now().Add(10 * time.Second)
	for {
		h := check(nsB, b)
		if h.ExternalCache == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B's external cache holds %d connections 10s after A's kernel got one, want 1", h.ExternalCache)
		}
		time.Sleep(100 * time.Millisecond)
	}

	kill[nsB]()
	h := check(nsA, a)
	if h.Healthy || len(h.Problems) != 1 || !strings.Contains(h.Problems[0], "nothing received from the peer on sync") || h.Window < 2*time.Second {
		t.Errorf("A with B's conntrackd gone: %+v, want unhealthy after the whole window: nothing received", h)
	}
	if _, err := ha.ReadSync(context.Background(), stats(nsB, b)); err == nil || !strings.Contains(err.Error(), "is conntrackd running?") {
		t.Errorf("ReadSync of the stopped conntrackd: %v, want conntrackd's own words", err)
	}
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}
