package ha_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/ha"
	"github.com/egress-snat/egress-snat/internal/lab"
)

// The generated files are checked by the programs that read them, not only
// against golden text: keepalived's own configuration test, a conntrackd
// started on the configuration in a namespace, and the hook run by sh.

// inDir is c with every path inside dir, so that the files can be written
// and the daemons run without touching the machine's own.
func inDir(c ha.Config, dir string) ha.Config {
	p := func(name string) string { return filepath.Join(dir, name) }
	c.Paths = ha.Paths{
		Keepalived:       p("keepalived.conf"),
		ConntrackdConf:   p("conntrackd.conf"),
		Conntrackd:       c.Paths.Conntrackd,
		ConntrackdLock:   p("conntrackd.lock"),
		ConntrackdSocket: p("conntrackd.ctl"),
		Hook:             p("notify.sh"),
		WatchPIDFile:     p("watch.pid"),
		DrainFile:        p("drain"),
		StateFile:        p("state"),
		HookLog:          p("hook.log"),
	}
	return c
}

// writeFiles writes every file of c but the sysctl fragment.
func writeFiles(t *testing.T, c ha.Config) {
	t.Helper()
	files, err := ha.Files(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f.Path == ha.SysctlPath {
			continue
		}
		if err := os.WriteFile(f.Path, []byte(f.Content), os.FileMode(f.Mode)); err != nil {
			t.Fatal(err)
		}
	}
}

// rootOwnedDir is a directory keepalived accepts a notify script in: no
// one but root can write to it or to any directory above it (so not under
// /tmp).
func rootOwnedDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "es-ha-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestKeepalivedConfigTest runs keepalived -t on each golden case's
// keepalived.conf, in a namespace that has its interfaces: it must pass
// without a word. A broken copy must fail, so the check is known to look.
func TestKeepalivedConfigTest(t *testing.T) {
	lab.RequireHA(t)
	for _, tc := range []struct {
		name string
		cfg  ha.Config
		ifs  []string
	}{
		{"lab-a", ha.LabA(), []string{"lan", "uplink", "sync"}},
		{"nopreempt-b", ha.NopreemptB(), []string{"eth0", "eth1", "eth2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := lab.NewScratch(t, tc.ifs...)
			dir := rootOwnedDir(t)
			c := inDir(tc.cfg, dir)
			writeFiles(t, c)
			check := func(path string) (string, int) {
				out, err := exec.Command("ip", "netns", "exec", ns, "keepalived", "--config-test", "-f", path).CombinedOutput()
				var ee *exec.ExitError
				switch {
				case err == nil:
					return string(out), 0
				case errors.As(err, &ee):
					return string(out), ee.ExitCode()
				}
				t.Fatalf("keepalived -t: %v", err)
				return "", -1
			}
			if out, code := check(c.Paths.Keepalived); code != 0 || strings.TrimSpace(out) != "" {
				t.Errorf("keepalived -t -f %s: exit %d, want 0 and silence:\n%s", c.Paths.Keepalived, code, out)
			}
			conf, _ := os.ReadFile(c.Paths.Keepalived)
			bad := filepath.Join(dir, "bad.conf")
			os.WriteFile(bad, []byte(strings.Replace(string(conf), "advert_int ", "advert_int x", 1)), 0o644)
			if out, code := check(bad); code == 0 {
				t.Errorf("keepalived -t accepted a broken advert_int:\n%s", out)
			}
		})
	}
}

// TestConntrackdStarts starts conntrackd in the foreground on each golden
// case's conntrackd.conf, in a namespace with the sync link, and asks it
// for its statistics through its control socket: conntrackd has no
// configuration test of its own, and it parses the whole file at start.
func TestConntrackdStarts(t *testing.T) {
	lab.RequireHA(t)
	for _, tc := range []struct {
		name string
		cfg  ha.Config
	}{
		{"lab-a", ha.LabA()},
		{"nopreempt-b", ha.NopreemptB()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := lab.NewScratch(t, tc.cfg.Sync.Interface)
			lab.ScratchAddr(t, ns, tc.cfg.Node.SyncAddr.String()+"/24", tc.cfg.Sync.Interface)
			dir := rootOwnedDir(t)
			c := inDir(tc.cfg, dir)
			writeFiles(t, c)

			cmd := exec.Command("ip", "netns", "exec", ns, "conntrackd", "-C", c.Paths.ConntrackdConf)
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			t.Cleanup(func() {
				syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-done
			})
			deadline := time.Now().Add(10 * time.Second)
			for {
				stats, err := exec.Command("ip", "netns", "exec", ns, "conntrackd", "-C", c.Paths.ConntrackdConf, "-s").CombinedOutput()
				if err == nil && strings.Contains(string(stats), "cache external") {
					break
				}
				select {
				case err := <-done:
					t.Fatalf("conntrackd exited (%v) on the generated configuration:\n%s", err, out.String())
				default:
				}
				if time.Now().After(deadline) {
					t.Fatalf("conntrackd -s did not answer within 10s: %v\n%s\nconntrackd:\n%s", err, stats, out.String())
				}
				time.Sleep(50 * time.Millisecond)
			}
			if strings.Contains(out.String(), "[ERROR]") || strings.Contains(out.String(), "WARNING") {
				t.Errorf("conntrackd complained about the generated configuration:\n%s", out.String())
			}
		})
	}
}

// TestConntrackdRefusesBrokenConfig: the start test above would notice a
// configuration conntrackd cannot parse, because conntrackd exits on it.
func TestConntrackdRefusesBrokenConfig(t *testing.T) {
	lab.RequireHA(t)
	c := ha.LabA()
	ns := lab.NewScratch(t, c.Sync.Interface)
	lab.ScratchAddr(t, ns, c.Node.SyncAddr.String()+"/24", c.Sync.Interface)
	c = inDir(c, rootOwnedDir(t))
	writeFiles(t, c)
	conf, _ := os.ReadFile(c.Paths.ConntrackdConf)
	os.WriteFile(c.Paths.ConntrackdConf, []byte(strings.Replace(string(conf), "TCPWindowTracking Off", "TCPWindowTracking Off\n        Bogus 1", 1)), 0o644)
	cmd := exec.Command("timeout", "10", "ip", "netns", "exec", ns, "conntrackd", "-C", c.Paths.ConntrackdConf)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 124 || !strings.Contains(string(out), "Bogus") {
		t.Errorf("conntrackd on a broken configuration: %v, want it to exit at once naming the bad symbol:\n%s", err, out)
	}
}
