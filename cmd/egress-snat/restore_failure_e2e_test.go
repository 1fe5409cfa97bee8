package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestRestoreFailsMidApply: an apply that changes both families and a set,
// whose iptables-restore of one family fails (a stand-in earlier in PATH
// that reads its input and exits 1, as a kernel refusal would), exits 1 and
// leaves the host byte for byte as it was: rules, every set with its
// members, routes and ip rules. Whichever family is written first, the
// failure of the other is then in the middle of the apply.
func TestRestoreFailsMidApply(t *testing.T) {
	iptablesOnly(t, "it injects failures into iptables-restore")
	t.Parallel()
	for _, failing := range []string{"iptables", "ip6tables"} {
		t.Run(failing, func(t *testing.T) {
			t.Parallel()
			l := newLab(t)
			mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.4")
			mustES(t, l, "set", "--to", "2001:db8::23", "--dst", "2001:db8:ffff::4")
			before := l.HostState(t)

			dir := t.TempDir()
			name := failing + "-" + backend(t) + "-restore"
			stub := "#!/bin/sh\ncat >/dev/null\necho \"" + name + ": line 2 failed (stand-in of TestRestoreFailsMidApply)\" >&2\nexit 1\n"
			if err := os.WriteFile(filepath.Join(dir, name), []byte(stub), 0o755); err != nil {
				t.Fatal(err)
			}
			file := relWrite(t, t.TempDir(), "rules.yaml", `rules:
  - to: 192.0.2.22
    dst: [198.51.100.4, 198.51.100.5, 203.0.113.1, 203.0.113.2, 203.0.113.3, 203.0.113.4, 203.0.113.5, 203.0.113.6, 203.0.113.7]
  - to: 2001:db8::22
    dst: [2001:db8:ffff::4]
`)
			stdout, stderr, code := l.RunErr("env", "PATH="+dir+":"+os.Getenv("PATH"), bin, "apply", "-f", file)
			if code != exitFailure || !strings.Contains(stderr, name) {
				t.Errorf("apply with %s failing: exit %d, want %d naming it\nstdout:\n%s\nstderr:\n%s", name, code, exitFailure, stdout, stderr)
			}
			if diff := cmp.Diff(before, l.HostState(t)); diff != "" {
				t.Errorf("a failed apply changed the host (-before +after):\n%s\nstderr:\n%s", diff, stderr)
			}
			wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23", "203.0.113.7": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::23"})
		})
	}
}

// TestNetnsWriters: apply, check, rotate and watch run from the root
// namespace with --netns act in the lab's host namespace, as they would
// inside it. (TestNetnsFlag covers list, explain, set and clear.)
func TestNetnsWriters(t *testing.T) {
	iptablesOnly(t, "it injects failures into iptables-restore")
	t.Parallel()
	l := newLab(t)
	rootBefore := rootSave(t)
	file := relWrite(t, t.TempDir(), "rules.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")

	if r := rootES(t, "--netns", l.Host, "apply", "-f", file); r.code != 0 {
		t.Fatalf("--netns apply: exit %d\n%s", r.code, r.stderr)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.250"})
	if r := rootES(t, "--netns", l.Host, "check", "-f", file); r.code != checkInSync {
		t.Errorf("--netns check -f after apply: exit %d, want %d\n%s%s", r.code, checkInSync, r.stdout, r.stderr)
	}
	// Drift check can see without -f: the jump gone, the rules there. (A
	// flushed chain it cannot: with no rules left it has nothing to hold
	// the host to; reported on issue 16.)
	relRestore(t, l, 4, "-D POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT\n")
	if r := rootES(t, "--netns", l.Host, "check"); r.code != checkDrift || !strings.Contains(r.stdout, "jump-missing") {
		t.Errorf("--netns check after the jump was deleted: exit %d, want %d naming jump-missing\n%s%s", r.code, checkDrift, r.stdout, r.stderr)
	}
	if r := rootES(t, "--netns", l.Host, "apply", "-f", file); r.code != 0 {
		t.Fatalf("--netns apply (repair): exit %d\n%s", r.code, r.stderr)
	}

	if r := rootES(t, "--netns", l.Host, "rotate", "--pool", "192.0.2.22,192.0.2.23", "--dst", "198.51.100.4"); r.code != 0 {
		t.Fatalf("--netns rotate: exit %d\n%s", r.code, r.stderr)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23"})

	// watch: started from the root namespace, it repairs the lab's host.
	w := &relProc{done: make(chan struct{})}
	w.cmd = exec.Command(bin, "--netns", l.Host, "watch", "-f", file)
	w.cmd.Stdout, w.cmd.Stderr = &w.stdout, &w.stderr
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.err = w.cmd.Wait(); close(w.done) }()
	defer func() {
		w.cmd.Process.Signal(syscall.SIGTERM)
		if code, ok := w.wait(10 * time.Second); !ok || code != 0 {
			t.Errorf("--netns watch after SIGTERM: exit %d (ended %v)\n%s", code, ok, w.stderr.String())
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for l.SourceSeen(t, "198.51.100.4") != "192.0.2.22" {
		if time.Now().After(deadline) || w.exited() {
			t.Fatalf("--netns watch -f did not bring back 192.0.2.22 for 198.51.100.4 within 10s\n%s", w.stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	relRestore(t, l, 4, "-F EGRESS-SNAT\n")
	deadline = time.Now().Add(10 * time.Second)
	for l.SourceSeen(t, "198.51.100.4") != "192.0.2.22" {
		if time.Now().After(deadline) || w.exited() {
			t.Fatalf("--netns watch -f did not repair a flushed chain within 10s\n%s", w.stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := rootSave(t); got != rootBefore {
		t.Errorf("--netns runs changed the root namespace's egress-snat rules:\n%s", cmp.Diff(rootBefore, got))
	}
}
