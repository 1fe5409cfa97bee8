package main

import (
	"encoding/json"
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

// End-to-end tests of egress-snat ha with the real programs: the files ha
// config --root writes are the ones keepalived, conntrackd and sysctl
// take, where they take them, and drain and status on a real pair (the
// HA lab of internal/lab: keepalived, conntrackd and egress-snat watch in
// both gateways) say and do what the unit tests claim.

// TestHAConfigRootE2E runs the binary's ha config --root DIR -f on the
// example node gw-a, then, in a scratch namespace with the example's
// interfaces and with DIR's /etc/keepalived and /etc/conntrackd mounted
// over the machine's in a mount namespace of the command's own (so that
// the files are at the paths their contents name): keepalived
// --config-test must pass without a word, conntrackd must start on its
// file and answer -s, and sysctl -p must take every setting.
func TestHAConfigRootE2E(t *testing.T) {
	lab.RequireHA(t)
	// keepalived runs a notify script only if no one but root can change
	// it or a directory above it: not under /tmp.
	root, err := os.MkdirTemp("/run", "es-ha-root-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	os.Chmod(root, 0o755)
	example := filepath.Join(t.TempDir(), "ha.yaml")
	os.WriteFile(example, []byte(ha.Examples[0].YAML), 0o644)

	out, err := exec.Command(bin, "ha", "config", "-f", example, "--root", root).CombinedOutput()
	if err != nil {
		t.Fatalf("ha config --root: %v\n%s", err, out)
	}
	cfg, err := ha.DecodeConfig(strings.NewReader(ha.Examples[0].YAML))
	if err != nil {
		t.Fatal(err)
	}
	files, _ := ha.Files(cfg)
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(root, f.Path))
		if err != nil || string(b) != f.Content {
			t.Errorf("%s under --root: %v, want ha.Files' content", f.Path, err)
		}
	}
	if out, err := exec.Command(bin, "ha", "config", "-f", example, "--root", root).CombinedOutput(); err != nil || string(out) != "nothing to change: the files are already these\n" {
		t.Errorf("ha config --root again: %v, %q; want nothing to change", err, out)
	}

	ns := lab.NewScratch(t, cfg.ClientInterface, cfg.EgressInterface, cfg.Sync.Interface)
	lab.ScratchAddr(t, ns, cfg.Node.SyncAddr.String()+"/24", cfg.Sync.Interface)
	// in runs script in the namespace, with the files under root mounted
	// where they belong; the mounts live and die with the command's own
	// mount namespace (unshare), never the machine's.
	in := func(script string) (string, error) {
		mounts := "mount --bind " + root + "/etc/keepalived /etc/keepalived && mount --bind " + root + "/etc/conntrackd /etc/conntrackd && "
		cmd := exec.Command("ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", mounts+script)
		b, err := cmd.CombinedOutput()
		return string(b), err
	}
	if out, err := in("keepalived --config-test -f /etc/keepalived/keepalived.conf"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("keepalived --config-test on the files ha config --root wrote: %v, want exit 0 and silence:\n%s", err, out)
	}
	// A broken copy, which exists only under root, must fail: the check
	// looks, and looks at root's files.
	conf, _ := os.ReadFile(filepath.Join(root, "etc/keepalived/keepalived.conf"))
	os.WriteFile(filepath.Join(root, "etc/keepalived/broken.conf"), []byte(strings.Replace(string(conf), "advert_int ", "advert_int x", 1)), 0o644)
	if out, err := in("keepalived --config-test -f /etc/keepalived/broken.conf"); err == nil {
		t.Errorf("keepalived --config-test passed a broken advert_int:\n%s", out)
	}
	// conntrackd parses its whole file at start; the lock and socket are
	// moved out of the machine's /var.
	ct, _ := os.ReadFile(filepath.Join(root, "etc/conntrackd/conntrackd.conf"))
	ctConf := strings.NewReplacer(ha.DefaultPaths.ConntrackdLock, root+"/conntrackd.lock", ha.DefaultPaths.ConntrackdSocket, root+"/conntrackd.ctl").
		Replace(string(ct))
	if strings.Contains(ctConf, " /var/") {
		t.Fatalf("conntrackd.conf still names a file of the machine's /var:\n%s", ctConf)
	}
	os.WriteFile(filepath.Join(root, "etc/conntrackd/conntrackd.conf"), []byte(ctConf), 0o644)
	cmd := exec.Command("ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
		"mount --bind "+root+"/etc/conntrackd /etc/conntrackd && exec conntrackd -C /etc/conntrackd/conntrackd.conf")
	var ctOut strings.Builder
	cmd.Stdout, cmd.Stderr = &ctOut, &ctOut
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); <-done })
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := in("conntrackd -C /etc/conntrackd/conntrackd.conf -s")
		if err == nil && strings.Contains(out, "cache external") {
			break
		}
		select {
		case <-done:
			t.Fatalf("conntrackd exited on the file ha config --root wrote:\n%s", ctOut.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("conntrackd -s did not answer within 10s: %v\n%s\n%s", err, out, ctOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Each sysctl exists, per namespace, and takes its value.
	sysctl := exec.Command("ip", "netns", "exec", ns, "sysctl", "-p", filepath.Join(root, ha.SysctlPath))
	if out, err := sysctl.CombinedOutput(); err != nil || strings.Count(string(out), " = ") != len(ha.Sysctls) {
		t.Errorf("sysctl -p of the sysctls ha config --root wrote: %v\n%s", err, out)
	}
}

// haIn runs the binary in a gateway's namespace.
func haIn(t *testing.T, g *lab.Gateway, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", g.NS, bin}, args...)...)
	// check, list and stats find the pair's files through this.
	cmd.Env = append(os.Environ(), keepalivedConfEnv+"="+g.Config.Paths.Keepalived)
	out, err := cmd.CombinedOutput()
	code := exitOf(err)
	if code < 0 {
		t.Fatalf("egress-snat %s in %s: %v", strings.Join(args, " "), g.NS, err)
	}
	return code, string(out)
}

// TestHADrainStatusE2E: on a real pair, ha status on each gateway says
// its role, the addresses it holds and a healthy sync; ha drain on the
// master hands the role to the peer and returns once its hook recorded
// BACKUP; ha undrain brings it back after its preempt delay.
func TestHADrainStatusE2E(t *testing.T) {
	h := lab.NewHA(t, lab.HAOptions{Binary: bin})
	status := func(g *lab.Gateway) haStatusReport {
		t.Helper()
		code, out := haIn(t, g, "ha", "status", "--keepalived-conf", g.Config.Paths.Keepalived, "--json")
		var r haStatusReport
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("ha status --json in %s: exit %d, %v:\n%s", g.Name, code, err, out)
		}
		if (code == 0) != r.Healthy {
			t.Errorf("ha status in %s: exit %d, healthy %v", g.Name, code, r.Healthy)
		}
		return r
	}
	wantRole := func(g *lab.Gateway, role string, drained bool) {
		t.Helper()
		// The hook records the state a moment after keepalived moved the
		// addresses; the lab waited for the addresses.
		var r haStatusReport
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if r = status(g); r.Role == role || time.Now().After(deadline) {
				break
			}
		}
		held := 0
		for _, a := range r.Addresses {
			if a.Held {
				held++
			}
		}
		wantHeld := 0
		if role == "MASTER" {
			wantHeld = 2
		}
		if !r.Healthy || r.Role != role || r.Drained != drained || held != wantHeld || !r.KeepalivedRunning ||
			!r.Sync.Healthy || r.Sync.ReceivedInWindow == 0 || r.Sync.Link != "sync" {
			t.Errorf("ha status in %s: %+v\nwant healthy, %s, drained %v, holding %d addresses, keepalived running, sync healthy\n%s", g.Name, r, role, drained, wantHeld, g.Logs())
		}
	}
	wantRole(h.A, "MASTER", false)
	wantRole(h.B, "BACKUP", false)
	code, out := haIn(t, h.A, "ha", "status", "--keepalived-conf", h.A.Config.Paths.Keepalived)
	if code != 0 || !strings.Contains(out, "gw-a: MASTER since") || !strings.Contains(out, "sync: healthy: link sync running") {
		t.Errorf("ha status in a: exit %d:\n%s", code, out)
	}
	// What the README says of the backup: list shows its rule standing
	// by, and check is content with it.
	if code, out := haIn(t, h.B, "list"); code != 0 || !strings.Contains(out, "standing by") {
		t.Errorf("list in b, the backup: exit %d, want its rule standing by:\n%s", code, out)
	}
	for _, g := range []*lab.Gateway{h.A, h.B} {
		role := "MASTER"
		if g == h.B {
			role = "BACKUP"
		}
		pair := "pair: " + g.Config.Node.Name + " is " + role
		if code, out := haIn(t, g, "check", "-f", h.File); code != 0 || !strings.Contains(out, pair) {
			t.Errorf("check -f in %s: exit %d, want 0 and %q:\n%s", g.Name, code, pair, out)
		}
		for _, cmd := range []string{"list", "stats"} {
			if code, out := haIn(t, g, cmd); code != 0 || !strings.Contains(out, pair) || !strings.Contains(out, "sync healthy") {
				t.Errorf("%s in %s: exit %d, want %q and a healthy sync:\n%s", cmd, g.Name, code, pair, out)
			}
		}
	}

	// A split brain: both masters, each answering ARP for the addresses;
	// check on each says so and exits 1, and healing ends it.
	h.SplitBrain(t)
	for _, g := range []*lab.Gateway{h.A, h.B} {
		var code int
		var out string
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if code, out = haIn(t, g, "check", "-f", h.File, "--json"); code == 1 && strings.Contains(out, "ha-split-brain") {
				break
			}
		}
		if code != 1 || !strings.Contains(out, "ha-split-brain") {
			t.Errorf("check in %s during a split brain: exit %d, want 1 naming ha-split-brain:\n%s\n%s", g.Name, code, out, g.Logs())
		}
	}
	h.Heal(t)
	h.WaitRoles(t, h.A, 15*time.Second)

	code, out = haIn(t, h.A, "ha", "drain", "--keepalived-conf", h.A.Config.Paths.Keepalived)
	if code != 0 || !strings.Contains(out, "gw-a is BACKUP since") {
		t.Fatalf("ha drain in a: exit %d:\n%s\n%s", code, out, h.A.Logs())
	}
	h.WaitRoles(t, h.B, 10*time.Second)
	wantRole(h.B, "MASTER", false)
	wantRole(h.A, "BACKUP", true)

	code, out = haIn(t, h.A, "ha", "undrain", "--keepalived-conf", h.A.Config.Paths.Keepalived)
	if code != 0 || !strings.Contains(out, "takes the role back") {
		t.Errorf("ha undrain in a: exit %d:\n%s", code, out)
	}
	h.WaitRoles(t, h.A, 15*time.Second)
	wantRole(h.A, "MASTER", false)
	wantRole(h.B, "BACKUP", false)
}
