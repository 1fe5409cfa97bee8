package main

// The daemon's local API in a lab: commands sent to a running watch print
// and exit as they do on their own; an unprivileged peer is refused; a
// daemon killed in the middle of a request leaves the host as it was or as
// the request made it; without a daemon (none, or a dead one's socket)
// commands run on their own as before.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/snat"
)

// apiES runs egress-snat in l's host namespace in directory dir, with the
// extra environment env.
func apiES(t *testing.T, l *lab.Lab, dir string, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.Host, bin}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return result{o.String(), e.String(), 0}
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		return result{o.String(), e.String(), ee.ExitCode()}
	}
	t.Fatalf("egress-snat %s: could not run: %v", strings.Join(args, " "), err)
	return result{}
}

// oneShot is the environment that makes a command run on its own.
var oneShot = []string{noDaemonEnv + "=1"}

// apiWatch is a watch serving the API in l's host namespace.
type apiWatch struct {
	p *relProc
}

// startAPIWatch starts `egress-snat args... watch --log-format json` in
// dir and waits until it serves commands.
// At t's end it stops it (unless killed) and wants its socket gone.
func startAPIWatch(t *testing.T, l *lab.Lab, dir string, args ...string) *apiWatch {
	t.Helper()
	w := &apiWatch{p: &relProc{done: make(chan struct{})}}
	w.p.cmd = exec.Command("ip", append([]string{"netns", "exec", l.Host, bin}, append(args, "--log-format", "json")...)...)
	w.p.cmd.Dir = dir
	w.p.cmd.Stdout, w.p.cmd.Stderr = &w.p.stdout, &w.p.stderr
	w.p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := w.p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.p.err = w.p.cmd.Wait(); close(w.p.done) }()
	t.Cleanup(func() {
		if w.p.exited() {
			return
		}
		w.p.cmd.Process.Signal(syscall.SIGTERM)
		if _, ok := w.p.wait(10 * time.Second); !ok {
			w.p.cmd.Process.Kill()
			<-w.p.done
			t.Errorf("watch still running 10s after SIGTERM\nlog:\n%s", w.p.stderr.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	// Requests wait for the first reconcile: serving is enough.
	for w.logged("serving commands") == 0 || w.logged("watch started") == 0 {
		if w.p.exited() || time.Now().After(deadline) {
			t.Fatalf("watch %v: not serving after 15s (exited %v)\nlog:\n%s", args, w.p.exited(), w.p.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return w
}

// logged counts the log records of message msg.
func (w *apiWatch) logged(msg string) int {
	n := 0
	for line := range strings.Lines(w.p.stderr.String()) {
		var rec struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == msg {
			n++
		}
	}
	return n
}

// awaitLogged waits up to 5s for the log to hold more than n records of
// message msg, and reports whether it does: watch's log reaches the test
// through a pipe, after the answer has reached the client.
func (w *apiWatch) awaitLogged(msg string, n int) bool {
	for deadline := time.Now().Add(5 * time.Second); w.logged(msg) <= n; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// apiDir is a directory of the lab's files: the permanent file and a
// desired-state file with a dst-file, named relatively by the commands.
func apiDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	relWrite(t, dir, "perm.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, 203.0.113.0/25]\n  - to: 2001:db8::22\n    dst: [2001:db8:ffff::4]\n")
	relWrite(t, dir, "rules.yaml", "rules:\n  - to: 192.0.2.23\n    dst-file: partners.txt\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	var b strings.Builder
	for i := range 40 {
		fmt.Fprintf(&b, "198.18.%d.0/24\n", i)
	}
	relWrite(t, dir, "partners.txt", b.String())
	return dir
}

// TestAPISameAsOneShot: two identical labs, one with watch serving (on its
// permanent file, so --permanent changes stay), one without. Every served
// command, text, --json, --dry-run, --permanent and bad input, run in
// both, prints the same stdout and stderr and exits the same; those sent
// to the daemon were served by it.
func TestAPISameAsOneShot(t *testing.T) {
	t.Parallel()
	withD, alone := lab.New(t), lab.New(t)
	dirD, dirA := apiDir(t), apiDir(t)
	for _, c := range []struct {
		l   *lab.Lab
		dir string
	}{{withD, dirD}, {alone, dirA}} {
		if r := apiES(t, c.l, c.dir, oneShot, "--config", "perm.yaml", "apply", "-f", "perm.yaml"); r.code != 0 {
			t.Fatalf("apply: exit %d\n%s", r.code, r.stderr)
		}
	}
	w := startAPIWatch(t, withD, dirD, "--config", "perm.yaml", "watch")
	lines := []string{
		"list",
		"list --json",
		"check",
		"check --json",
		"check -f rules.yaml",
		"check -f rules.yaml --json",
		"set --to 192.0.2.23 --dst 198.51.100.5 --permanent",
		"set --to 192.0.2.23 --dst 198.51.100.6 --permanent --json",
		"set --to 192.0.2.22 --dst 198.51.100.7 --permanent --dry-run",
		"set --to 192.0.2.22 --dst 198.51.100.7 --permanent --dry-run --json",
		"set --to 192.0.2.23 --dst 198.51.100.5 --permanent",
		"set --to 192.0.2.99 --permanent",
		"set --to 192.0.2.22 --out nope0 --permanent",
		"set --to 192.0.2.22 --dst 198.51.100.300",
		"unset --dst 198.51.100.6 --permanent --json",
		"unset --dst 198.51.100.66 --permanent",
		"rotate --pool 192.0.2.22,192.0.2.23 --dst 198.51.100.4 --permanent --json",
		"rotate --pool 192.0.2.22,192.0.2.23 --dst 198.51.100.4 --permanent --dry-run",
		"list",
		"apply -f perm.yaml",
		"apply -f perm.yaml --json",
		"apply -f rules.yaml --dry-run",
		"apply -f rules.yaml --dry-run --json",
		"apply -f missing.yaml",
		"save --dry-run",
		"save",
		"check",
		"clear --dry-run --json",
		"--lock-timeout -1s list",
		"list --json",
	}
	for _, line := range lines {
		args := append([]string{"--config", "perm.yaml"}, strings.Fields(line)...)
		got := apiES(t, withD, dirD, nil, args...)
		want := apiES(t, alone, dirA, oneShot, args...)
		if got != want {
			t.Errorf("%s: through the daemon, exit %d, and one-shot, exit %d (-one-shot +daemon):\nstdout:\n%s\nstderr:\n%s",
				line, got.code, want.code, cmp.Diff(want.stdout, got.stdout), cmp.Diff(want.stderr, got.stderr))
		}
	}
	// The last one changes the kernel alone, and what follows it would
	// differ: the daemon undoes it, as it undoes a one-shot run's.
	last := []string{"--config", "perm.yaml", "set", "--to", "192.0.2.23", "--dst", "203.0.113.200", "--json"}
	if got, want := apiES(t, withD, dirD, nil, last...), apiES(t, alone, dirA, oneShot, last...); got != want {
		t.Errorf("%s: (-one-shot +daemon):\nstdout:\n%s\nstderr:\n%s", last, cmp.Diff(want.stdout, got.stdout), cmp.Diff(want.stderr, got.stderr))
	}
	// Each line was served but the one refused by the flag checks before
	// it was sent (--lock-timeout -1s). --out nope0 is a well-formed name
	// of an interface the host lacks: the daemon finds that out.
	want := len(lines) + 1 - 1
	w.awaitLogged("command served", want-1)
	if n := w.logged("command served"); n != want {
		t.Errorf("the daemon served %d commands, want %d\nlog:\n%s", n, want, w.p.stderr.String())
	}
	if r := apiES(t, withD, dirD, nil, "--config", "perm.yaml", "clear", "--permanent"); r.code != 0 {
		t.Fatalf("clear --permanent through the daemon: exit %d\n%s", r.code, r.stderr)
	}
	time.Sleep(time.Second) // the daemon's canary, had it anything to restore
	if ours := ourLines(withD.Ruleset(t)); ours != "" {
		t.Errorf("after clear --permanent through the daemon, the host still has:\n%s", ours)
	}
}

// TestAPIRefusesUnprivileged: while watch serves, a run without
// CAP_NET_ADMIN is refused as on its own, exit 1 with the same words:
// nobody cannot even open the socket (mode 0600) and runs on its own;
// nobody with CAP_DAC_OVERRIDE opens it and the daemon refuses it
// (SO_PEERCRED); root without CAP_NET_ADMIN is refused too. Nothing
// changes.
func TestAPIRefusesUnprivileged(t *testing.T) {
	t.Parallel()
	l := lab.New(t)
	dir := apiDir(t)
	w := startAPIWatch(t, l, dir, "watch", "-f", filepath.Join(dir, "perm.yaml"))
	// The lab starts empty: the first reconcile writes the file's rules,
	// and the ruleset to keep is the one after it.
	for deadline := time.Now().Add(15 * time.Second); w.logged("converged") == 0; time.Sleep(20 * time.Millisecond) {
		if w.p.exited() || time.Now().After(deadline) {
			t.Fatalf("watch: no first reconcile after 15s\nlog:\n%s", w.p.stderr.String())
		}
	}
	before := l.Ruleset(t)
	const capDACOverride = 1
	for _, who := range []struct {
		name string
		attr *syscall.SysProcAttr
		// refused says whether the daemon itself refuses (it could
		// connect), not the run on its own.
		refused bool
	}{
		{"nobody", &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}, false},
		{"nobody with CAP_DAC_OVERRIDE", &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}, AmbientCaps: []uintptr{capDACOverride}}, true},
	} {
		for _, args := range [][]string{{"list"}, {"set", "--to", "192.0.2.23"}, {"clear"}} {
			refusedBefore := w.logged("api: refused a peer without root or CAP_NET_ADMIN")
			var o, e bytes.Buffer
			var code int
			err := lab.Do(l.Host, func() error {
				cmd := exec.Command(bin, args...)
				cmd.Dir = "/"
				cmd.Stdout, cmd.Stderr = &o, &e
				cmd.SysProcAttr = who.attr
				err := cmd.Run()
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					code, err = ee.ExitCode(), nil
				}
				return err
			})
			if err != nil {
				t.Fatalf("%s: %v", who.name, err)
			}
			if code != exitFailure || e.String() != "egress-snat: "+needsPrivilege+"\n" || o.Len() != 0 {
				t.Errorf("%s: egress-snat %s: exit %d, stdout %q, stderr %q; want exit 1 saying it needs root or CAP_NET_ADMIN", who.name, strings.Join(args, " "), code, o.String(), e.String())
			}
			refused := w.logged("api: refused a peer without root or CAP_NET_ADMIN") > refusedBefore
			if who.refused {
				refused = w.awaitLogged("api: refused a peer without root or CAP_NET_ADMIN", refusedBefore)
			}
			if refused != who.refused {
				t.Errorf("%s: egress-snat %s: refused by the daemon %v, want %v\nlog:\n%s", who.name, strings.Join(args, " "), refused, who.refused, w.p.stderr.String())
			}
		}
	}
	if _, err := exec.LookPath("setpriv"); err == nil {
		refusedBefore := w.logged("api: refused a peer without root or CAP_NET_ADMIN")
		stdout, stderr, code := l.RunErr("setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", bin, "clear")
		if code != exitFailure || stderr != "egress-snat: "+needsPrivilege+"\n" || stdout != "" {
			t.Errorf("root without CAP_NET_ADMIN: clear: exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
		if !w.awaitLogged("api: refused a peer without root or CAP_NET_ADMIN", refusedBefore) {
			t.Errorf("root without CAP_NET_ADMIN was not refused by the daemon\nlog:\n%s", w.p.stderr.String())
		}
	}
	if n := w.logged("command served"); n != 0 {
		t.Errorf("the daemon served %d commands of unprivileged peers", n)
	}
	if after := l.Ruleset(t); after != before {
		t.Errorf("unprivileged runs changed the ruleset:\n%s", cmp.Diff(before, after))
	}
}

// apiKillFiles are two desired states of some thousands of destinations
// each, far enough apart that a switch takes a while.
func apiKillFiles(t *testing.T) (a, b string) {
	t.Helper()
	dir := t.TempDir()
	hosts := func(from, to int) string {
		var s strings.Builder
		for i := from; i < to; i++ {
			fmt.Fprintf(&s, "100.64.%d.%d\n", i/256, i%256)
		}
		return s.String()
	}
	relWrite(t, dir, "a.txt", hosts(0, 8000))
	relWrite(t, dir, "b.txt", hosts(4000, 12000))
	file := func(hosts, single, six string) string {
		return fmt.Sprintf("rules:\n  - to: 192.0.2.22\n    dst-file: %s\n  - to: %s\n    dst: [198.51.100.4]\n  - to: %s\n    dst: [2001:db8:ffff::4]\n", hosts, single, six)
	}
	return relWrite(t, dir, "a.yaml", file("a.txt", "192.0.2.23", "2001:db8::22")),
		relWrite(t, dir, "b.yaml", file("b.txt", "192.0.2.22", "2001:db8::23"))
}

// apiState names what the host holds of ours, by the kernel's own tools.
type apiState func() map[snat.Family]string

// TestAPIKilledDaemonOldOrNew: watch follows file A; a client sends
// apply -f B to it, and the daemon is killed (SIGKILL, alone or with its
// children) at a random moment. Whatever the moment, each family is left
// exactly as a complete apply of A or of B leaves it; the client says it
// cannot know when the daemon died with its request, and exits 1. With the
// dead daemon's socket left, commands run on their own, as without one.
func TestAPIKilledDaemonOldOrNew(t *testing.T) {
	t.Parallel()
	rng := relRand(t)
	rounds := relEnvInt(t, "EGRESS_SNAT_KILLS", 8)
	l := lab.New(t)
	fa, fb := apiKillFiles(t)
	var state apiState = func() map[snat.Family]string { return relKernelText(t, l) }
	if backend(t) == "nftables" {
		state = func() map[snat.Family]string {
			all := ourLines(l.Ruleset(t)) // one table, one transaction
			return map[snat.Family]string{snat.IPv4: all, snat.IPv6: all}
		}
	}
	want := map[string]map[snat.Family]string{}
	var took []time.Duration
	for _, name := range []string{"A", "B", "A"} {
		f := map[string]string{"A": fa, "B": fb}[name]
		start := time.Now()
		if r := apiES(t, l, "/", oneShot, "apply", "-f", f); r.code != 0 {
			t.Fatalf("apply -f %s: exit %d\n%s", name, r.code, r.stderr)
		}
		took = append(took, time.Since(start))
		want[name] = state()
	}
	window, _ := relStats(took)
	t.Logf("a one-shot switch between A and B takes about %s", window)

	counts := map[string]int{}
	for i := range rounds {
		w := startAPIWatch(t, l, "/", "watch", "-f", fa)
		client := relStart(t, l, "apply", "-f", fb)
		delay := time.Duration(rng.Int64N(int64(window)))
		time.Sleep(delay)
		pid := w.p.cmd.Process.Pid
		group := rng.IntN(2) == 0
		if group {
			syscall.Kill(-pid, syscall.SIGKILL)
		} else {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		<-w.p.done
		if !relGroupGone(pid, 20*time.Second) {
			t.Fatalf("round %d: children of the killed watch still running after 20s", i)
		}
		code, ok := client.wait(30 * time.Second)
		if !ok {
			t.Fatalf("round %d: the client still runs 30s after the daemon was killed", i)
		}
		served := w.logged("command served") > 0
		switch {
		case code == exitFailure && strings.Contains(client.stderr.String(), "ended before it answered"):
			counts["killed with the request"]++
		case code == 0 && served:
			counts["served before the kill"]++
		case code == 0:
			counts["ran on its own (the daemon was gone first)"]++
		default:
			t.Fatalf("round %d: the client exited %d\nstdout:\n%s\nstderr:\n%s", i, code, client.stdout.String(), client.stderr.String())
		}
		now := state()
		for _, f := range snat.Families {
			if now[f] != want["A"][f] && now[f] != want["B"][f] {
				t.Fatalf("round %d, killed after %s (group %v): the %s rules are neither A nor B\nagainst A:\n%s\nagainst B:\n%s",
					i, delay, group, f, relDiff(want["A"][f], now[f]), relDiff(want["B"][f], now[f]))
			}
		}
		// The dead daemon's socket is left: commands run on their own,
		// as without a daemon, and converge.
		if len(apiFiles(t, l)) != 1 {
			t.Errorf("round %d: the killed daemon's socket file is not there", i)
		}
		if r := apiES(t, l, "/", nil, "apply", "-f", fa); r.code != 0 {
			t.Fatalf("round %d: apply -f A with a dead daemon's socket: exit %d\n%s", i, r.code, r.stderr)
		}
		if now := state(); now[snat.IPv4] != want["A"][snat.IPv4] || now[snat.IPv6] != want["A"][snat.IPv6] {
			t.Fatalf("round %d: after apply -f A, the host is not A", i)
		}
	}
	t.Logf("rounds: %v", counts)
	// Stopped cleanly, a daemon leaves no socket: list runs on its own
	// and prints what it prints without a daemon.
	w := startAPIWatch(t, l, "/", "watch", "-f", fa)
	w.p.cmd.Process.Signal(syscall.SIGTERM)
	if code, ok := w.p.wait(10 * time.Second); !ok || code != 0 {
		t.Fatalf("watch after SIGTERM: exit %d (ended %v)\n%s", code, ok, w.p.stderr.String())
	}
	if got, want := apiES(t, l, "/", nil, "list", "--json"), apiES(t, l, "/", oneShot, "list", "--json"); got != want || got.code != 0 {
		t.Errorf("list --json with no daemon: %+v, want what a one-shot run prints, %+v", got, want)
	}
	if files := apiFiles(t, l); len(files) != 0 {
		t.Errorf("after watch stopped, its API files are left: %v", files)
	}
}

// apiFiles lists the socket of l's host namespace under the lock
// directory.
func apiFiles(t *testing.T, l *lab.Lab) []string {
	t.Helper()
	var ino uint64
	if err := lab.Do(l.Host, func() error {
		var st syscall.Stat_t
		if err := syscall.Stat("/proc/thread-self/ns/net", &st); err != nil {
			return err
		}
		ino = st.Ino
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(snat.LockDir, fmt.Sprintf("api-%d.sock", ino)))
	return files
}
