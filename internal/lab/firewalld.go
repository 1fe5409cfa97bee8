package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Firewalld is Debian's firewalld running inside a lab's host namespace,
// the host firewall that operators run next to egress-snat.
//
// Nothing of it reaches the root namespace or the machine's own firewalld:
//   - it talks on a private system bus (a dbus-daemon of its own, also in
//     the lab namespace, on a socket in a temporary folder), so
//     DBUS_SYSTEM_BUS_ADDRESS must point there for firewall-cmd: use Cmd;
//   - it reads and writes a private copy of /etc/firewalld
//     (--system-config), so even a permanent firewall-cmd change stays in
//     the test's temporary folder; it logs to the test, not /var/log;
//   - its rules are in the lab namespace's nf_tables, gone with it.
//
// What it does leave is /run/firewalld, where it writes short-lived
// temporary files for iptables-restore; StartFirewalld creates that folder
// when missing and removes it again if it is empty.
type Firewalld struct {
	l   *Lab
	dir string
	env []string

	bus, fw *daemon
	runDir  bool // StartFirewalld created /run/firewalld
	stopped bool
}

// daemon is a background process whose output is kept for failure reports.
type daemon struct {
	name string
	cmd  *exec.Cmd
	out  syncBuffer
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// RequireFirewalld is Require for tests that also need firewalld,
// firewall-cmd and dbus-daemon.
func RequireFirewalld(t testing.TB) {
	t.Helper()
	Require(t)
	for _, bin := range []string{"firewalld", "firewall-cmd", "dbus-daemon", "nft"} {
		if _, err := exec.LookPath(bin); err != nil {
			if os.Getenv("CI") != "" || os.Getenv("EGRESS_SNAT_REQUIRE_NETNS") == "1" {
				t.Fatalf("firewalld test needs %s (install firewalld and dbus: scripts/lab.sh test-deps)", bin)
			}
			t.Skipf("firewalld test needs %s", bin)
		}
	}
}

// StartFirewalld starts a private system bus and firewalld in l's host
// namespace and waits until firewalld answers (firewall-cmd --state). It
// stops both at t's cleanup, before the lab's namespaces are deleted.
func StartFirewalld(t testing.TB, l *Lab) *Firewalld {
	t.Helper()
	RequireFirewalld(t)
	dir := t.TempDir()
	f := &Firewalld{l: l, dir: dir}
	t.Cleanup(func() { f.Stop(t) })

	sock := filepath.Join(dir, "system_bus_socket")
	f.env = append(os.Environ(), "DBUS_SYSTEM_BUS_ADDRESS=unix:path="+sock)
	// Debian's system.conf as it is; --nopidfile keeps it off /run/dbus/pid
	// and --address off the machine's own bus socket.
	f.bus = f.start(t, "dbus-daemon", "dbus-daemon", "--config-file=/usr/share/dbus-1/system.conf",
		"--address=unix:path="+sock, "--nofork", "--nopidfile")
	waitFor(t, 10*time.Second, "dbus-daemon socket "+sock, func() bool {
		_, err := os.Stat(sock)
		return err == nil
	}, f.bus)

	etc := filepath.Join(dir, "etc-firewalld")
	if out, err := exec.Command("cp", "-a", "/etc/firewalld", etc).CombinedOutput(); err != nil {
		t.Fatalf("copying /etc/firewalld: %v\n%s", err, out)
	}
	if _, err := os.Stat("/run/firewalld"); errors.Is(err, os.ErrNotExist) {
		f.runDir = os.Mkdir("/run/firewalld", 0o750) == nil
	}
	start := time.Now()
	f.fw = f.start(t, "firewalld", "firewalld", "--nofork", "--nopid",
		"--system-config", etc, "--log-target", "console")
	// A cold start reads every zone and service file and runs nft several
	// times; on a busy machine that takes seconds.
	waitFor(t, 60*time.Second, "firewalld to answer", func() bool {
		out, _, code := f.run("firewall-cmd", "--state")
		return code == 0 && strings.TrimSpace(out) == "running"
	}, f.fw)
	t.Logf("lab: firewalld in %s answered after %s", l.Host, time.Since(start).Round(time.Millisecond))
	return f
}

// start runs name in the lab's host namespace with the private bus.
func (f *Firewalld) start(t testing.TB, what, name string, args ...string) *daemon {
	t.Helper()
	d := &daemon{name: what, done: make(chan struct{})}
	d.cmd = exec.Command("ip", append([]string{"netns", "exec", f.l.Host, name}, args...)...)
	d.cmd.Env = f.env
	d.cmd.Stdout, d.cmd.Stderr = &d.out, &d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting %s in %s: %v", what, f.l.Host, err)
	}
	go func() { d.cmd.Wait(); close(d.done) }()
	return d
}

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the daemon's process group, then SIGKILL after
// grace, and waits for it.
func (d *daemon) stop(grace time.Duration) error {
	if d == nil || d.exited() {
		return nil
	}
	pg := -d.cmd.Process.Pid
	syscall.Kill(pg, syscall.SIGTERM)
	select {
	case <-d.done:
		return nil
	case <-time.After(grace):
	}
	syscall.Kill(pg, syscall.SIGKILL)
	<-d.done
	return fmt.Errorf("%s did not stop within %s of SIGTERM; killed", d.name, grace)
}

func waitFor(t testing.TB, limit time.Duration, what string, ok func() bool, d *daemon) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !ok() {
		if d.exited() {
			t.Fatalf("%s exited while waiting for %s:\n%s", d.name, what, d.out.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s; %s said:\n%s", limit, what, d.name, d.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Env is the environment that reaches the private bus: firewall-cmd, or
// anything else that talks to firewalld, needs it.
func (f *Firewalld) Env() []string { return f.env }

func (f *Firewalld) run(name string, args ...string) (stdout, stderr string, code int) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", f.l.Host, name}, args...)...)
	cmd.Env = f.env
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return o.String(), e.String(), 0
	case errors.As(err, &ee):
		return o.String(), e.String(), ee.ExitCode()
	}
	return o.String(), e.String() + err.Error(), -1
}

// Cmd runs firewall-cmd with args in the lab and returns its stdout,
// failing the test (with firewalld's log) if it fails.
func (f *Firewalld) Cmd(t testing.TB, args ...string) string {
	t.Helper()
	out, errOut, code := f.run("firewall-cmd", args...)
	if code != 0 {
		t.Fatalf("firewall-cmd %s: exit %d\n%s%s\nfirewalld log:\n%s", strings.Join(args, " "), code, out, errOut, f.fw.out.String())
	}
	return out
}

// Reload runs firewall-cmd --reload: firewalld rebuilds its runtime state
// from its configuration and, on the way, flushes the iptables tables
// (iptables -t TABLE -F, -X, -Z for its direct rules), which removes other
// tools' chains from the iptables backend firewall-cmd's iptables is.
func (f *Firewalld) Reload(t testing.TB) {
	t.Helper()
	start := time.Now()
	out, errOut, code := f.run("firewall-cmd", "--reload")
	if code != 0 && strings.Contains(errOut, "Did not receive a reply") {
		// firewall-cmd gives up after D-Bus's 25s reply timeout, which a
		// reload on a busy machine can exceed; firewalld goes on and
		// answers again when it is done.
		t.Logf("lab: firewall-cmd --reload: no reply after %s; waiting for firewalld", time.Since(start).Round(time.Millisecond))
		waitFor(t, 60*time.Second, "firewalld to finish reloading", func() bool {
			out, _, code := f.run("firewall-cmd", "--state")
			return code == 0 && strings.TrimSpace(out) == "running"
		}, f.fw)
		code = 0
	}
	if code != 0 {
		t.Fatalf("firewall-cmd --reload: exit %d\n%s%s\nfirewalld log:\n%s", code, out, errOut, f.fw.out.String())
	}
	t.Logf("lab: firewall-cmd --reload took %s", time.Since(start).Round(time.Millisecond))
}

// Log is what firewalld has printed so far.
func (f *Firewalld) Log() string { return f.fw.out.String() }

// Stop stops firewalld (which removes its own rules: CleanupOnExit) and
// its bus. It is safe to call twice; t.Cleanup calls it too.
func (f *Firewalld) Stop(t testing.TB) {
	t.Helper()
	if f.stopped {
		return
	}
	f.stopped = true
	start := time.Now()
	defer func() { t.Logf("lab: firewalld stopped in %s", time.Since(start).Round(time.Millisecond)) }()
	if err := f.fw.stop(30 * time.Second); err != nil {
		t.Errorf("lab: %v\n%s", err, f.fw.out.String())
	}
	if err := f.bus.stop(10 * time.Second); err != nil {
		t.Errorf("lab: %v\n%s", err, f.bus.out.String())
	}
	if f.runDir {
		os.Remove("/run/firewalld") // only if empty: another firewalld may use it
	}
}
