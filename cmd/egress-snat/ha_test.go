package main

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/ha"
)

// The ha commands in process, on files in temporary directories: ha
// config always with --root or --dry-run (haRun refuses a run that
// would write the machine's /etc), drain and status on a node whose
// files name paths in a temporary directory, with keepalived, the
// addresses and conntrackd faked (conntrackd from the captures in
// ha/testdata/conntrackd). ha_e2e_test.go runs the real programs.

// flagMatrixElsewhere are the commands with --dry-run or --json that
// the flag matrix (flags_matrix_e2e_test.go), which plays iptables plans,
// leaves to other tests: those change files, not the kernel.
var flagMatrixElsewhere = map[string]string{
	"ha config": "TestHAConfigDryRunJSON, TestHAConfigRoot",
	"ha status": "TestHAStatus",
}

// haRun runs egress-snat ARGS in process and returns its exit status, its
// output and its error message.
func haRun(t *testing.T, args ...string) (code int, stdout, msg string) {
	t.Helper()
	if len(args) > 1 && args[0] == "ha" && args[1] == "config" && !slices.Contains(args, "--dry-run") &&
		!slices.ContainsFunc(args, func(a string) bool { return a == "--root" || strings.HasPrefix(a, "--root=") }) {
		t.Fatalf("egress-snat %q would write the machine's own files: give --root or --dry-run", args)
	}
	app := newApp()
	var out, errOut bytes.Buffer
	app.Writer, app.ErrWriter = &out, &errOut
	done := make(chan error, 1)
	go func() { done <- tidyExit(app, app.Run(append([]string{"egress-snat"}, args...))) }()
	select {
	case err := <-done:
		if err != nil {
			return exitCode(err), out.String(), err.Error()
		}
		return 0, out.String(), ""
	case <-time.After(20 * time.Second):
		t.Fatalf("egress-snat %q: still running after 20s", args)
		return 0, "", ""
	}
}

// haPairArgs are the flags of the example pair's node gw-a.
var haPairArgs = []string{
	"--node", "gw-a:150:10.51.0.1", "--peer", "gw-b:100:10.51.0.2",
	"--client-vip", "10.50.0.1/24", "--client-interface", "lan",
	"--egress-vip", "192.0.2.100/24", "--egress-interface", "uplink",
	"--sync-interface", "sync", "--preempt", "--preempt-delay", "2s",
	"--no-sync", "10.50.0.2/31,192.0.2.2/31",
}

// haExampleA is the example pair's node gw-a, the same as haPairArgs.
func haExampleA(t *testing.T) ha.Config {
	t.Helper()
	c, err := ha.DecodeConfig(strings.NewReader(ha.Examples[0].YAML))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// tree lists every file under root with its mode and content.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		if d.IsDir() {
			return nil
		}
		st, _ := os.Stat(path)
		b, _ := os.ReadFile(path)
		rel, _ := filepath.Rel(root, path)
		out["/"+rel] = fmt.Sprintf("%04o\n%s", st.Mode().Perm(), b)
		return nil
	})
	return out
}

// TestHAConfigRoot: --root DIR writes exactly ha.Files' files, contents
// and modes, under DIR; -f of the example file writes the same as the
// flags; a second run changes nothing and says so; a wrong mode or a
// changed file of ours is put right.
func TestHAConfigRoot(t *testing.T) {
	files, err := ha.Files(haExampleA(t))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for _, f := range files {
		want[f.Path] = fmt.Sprintf("%04o\n%s", f.Mode, f.Content)
	}

	root := t.TempDir()
	code, out, msg := haRun(t, append([]string{"ha", "config", "--root", root}, haPairArgs...)...)
	if code != 0 {
		t.Fatalf("ha config --root: exit %d: %s", code, msg)
	}
	if diff := cmp.Diff(want, tree(t, root)); diff != "" {
		t.Errorf("ha config --root wrote (-ha.Files +written):\n%s", diff)
	}
	for _, f := range files {
		if !strings.Contains(out, filepath.Join(root, f.Path)+": written\n") {
			t.Errorf("ha config --root printed:\n%s\nwant %s: written", out, filepath.Join(root, f.Path))
		}
	}
	if strings.Contains(out, "next:") {
		t.Errorf("ha config --root printed next steps for the host:\n%s", out)
	}

	fromFile := t.TempDir()
	example := filepath.Join(t.TempDir(), "gw-a.yaml")
	os.WriteFile(example, []byte(ha.Examples[0].YAML), 0o644)
	if code, _, msg := haRun(t, "ha", "config", "-f", example, "--root", fromFile); code != 0 {
		t.Fatalf("ha config -f: exit %d: %s", code, msg)
	}
	if diff := cmp.Diff(tree(t, root), tree(t, fromFile)); diff != "" {
		t.Errorf("-f of the example writes other files than its flags (-flags +file):\n%s", diff)
	}

	// Idempotent: nothing to change, and nothing touched.
	keepalived := filepath.Join(root, "etc/keepalived/keepalived.conf")
	old := time.Now().Add(-time.Hour).Truncate(time.Second)
	os.Chtimes(keepalived, old, old)
	code, out, _ = haRun(t, append([]string{"ha", "config", "--root", root}, haPairArgs...)...)
	if code != 0 || out != "nothing to change: the files are already these\n" {
		t.Errorf("second run: exit %d, %q; want nothing to change", code, out)
	}
	if st, _ := os.Stat(keepalived); !st.ModTime().Equal(old) {
		t.Errorf("the second run rewrote %s", keepalived)
	}

	// A mode and a content put right.
	hook := filepath.Join(root, "etc/keepalived/egress-snat-notify.sh")
	os.Chmod(hook, 0o700)
	os.WriteFile(keepalived, []byte("# Generated by egress-snat, then edited\n"), 0o644)
	code, out, msg = haRun(t, append([]string{"ha", "config", "--root", root}, haPairArgs...)...)
	if code != 0 || !strings.Contains(out, hook+": given mode 0755") || !strings.Contains(out, keepalived+": replaced\n") {
		t.Errorf("a run after changes: exit %d, %q %s; want the hook's mode and keepalived.conf put right", code, out, msg)
	}
	if diff := cmp.Diff(want, tree(t, root)); diff != "" {
		t.Errorf("after putting right (-ha.Files +written):\n%s", diff)
	}
}

// TestHAConfigForeignFile: a file egress-snat did not write is replaced
// only with --force, which keeps it as FILE.orig; without, the run writes
// nothing at all.
func TestHAConfigForeignFile(t *testing.T) {
	root := t.TempDir()
	conf := filepath.Join(root, "etc/keepalived/keepalived.conf")
	os.MkdirAll(filepath.Dir(conf), 0o755)
	os.WriteFile(conf, []byte("vrrp_instance VI_1 {\n}\n"), 0o644)
	before := tree(t, root)
	code, _, msg := haRun(t, append([]string{"ha", "config", "--root", root}, haPairArgs...)...)
	if code != exitFailure || !strings.Contains(msg, conf+" exists and egress-snat did not write it: nothing written") || !strings.Contains(msg, "--force") {
		t.Errorf("over a foreign keepalived.conf: exit %d, %q; want exit 1 saying so and naming --force", code, msg)
	}
	if diff := cmp.Diff(before, tree(t, root)); diff != "" {
		t.Errorf("a refused run changed the files (-before +after):\n%s", diff)
	}
	code, out, _ := haRun(t, append([]string{"ha", "config", "--root", root, "--dry-run"}, haPairArgs...)...)
	if code != 0 || !strings.Contains(out, "would replace a file egress-snat did not write (only with --force)") {
		t.Errorf("--dry-run over a foreign file: exit %d:\n%s", code, out)
	}
	code, out, msg = haRun(t, append([]string{"ha", "config", "--root", root, "--force"}, haPairArgs...)...)
	if code != 0 || !strings.Contains(out, "kept as keepalived.conf.orig") {
		t.Errorf("--force: exit %d, %q %s", code, out, msg)
	}
	if b, _ := os.ReadFile(conf + ".orig"); string(b) != "vrrp_instance VI_1 {\n}\n" {
		t.Errorf("keepalived.conf.orig holds %q, want the foreign file", b)
	}
}

// TestHAConfigDryRunJSON: --dry-run prints every file and writes none;
// with --json it lists each file's path, mode, content and change.
func TestHAConfigDryRunJSON(t *testing.T) {
	files, err := ha.Files(haExampleA(t))
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	code, out, msg := haRun(t, append([]string{"ha", "config", "--root", root, "--dry-run"}, haPairArgs...)...)
	if code != 0 {
		t.Fatalf("--dry-run: exit %d: %s", code, msg)
	}
	for _, f := range files {
		if !strings.Contains(out, fmt.Sprintf("# %s (mode %04o): would be written\n%s", filepath.Join(root, f.Path), f.Mode, f.Content)) {
			t.Errorf("--dry-run does not print %s whole:\n%s", f.Path, out)
		}
	}
	if got := tree(t, root); len(got) != 0 {
		t.Errorf("--dry-run wrote %v", got)
	}
	code, out, msg = haRun(t, append([]string{"ha", "config", "--root", root, "--dry-run", "--json"}, haPairArgs...)...)
	if code != 0 {
		t.Fatalf("--dry-run --json: exit %d: %s", code, msg)
	}
	var got struct {
		DryRun  bool         `json:"dry_run"`
		Changed bool         `json:"changed"`
		Files   []haFileJSON `json:"files"`
	}
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var want []haFileJSON
	for _, f := range files {
		want = append(want, haFileJSON{Path: f.Path, Dest: filepath.Join(root, f.Path), Mode: fmt.Sprintf("%04o", f.Mode), Change: "create", Content: f.Content})
	}
	if !got.DryRun || got.Changed {
		t.Errorf("dry_run %v, changed %v; want a dry run that changed nothing", got.DryRun, got.Changed)
	}
	if diff := cmp.Diff(want, got.Files); diff != "" {
		t.Errorf("--json files (-want +got):\n%s", diff)
	}
	if got := tree(t, root); len(got) != 0 {
		t.Errorf("--dry-run --json wrote %v", got)
	}
	// A real run with --json reports what it changed.
	code, out, _ = haRun(t, append([]string{"ha", "config", "--root", root, "--json"}, haPairArgs...)...)
	if code != 0 || !strings.Contains(out, `"changed": true`) || !strings.Contains(out, `"dry_run": false`) {
		t.Errorf("--json: exit %d:\n%s", code, out)
	}
	code, out, _ = haRun(t, append([]string{"ha", "config", "--root", root, "--json"}, haPairArgs...)...)
	if code != 0 || !strings.Contains(out, `"changed": false`) || strings.Count(out, `"change": "none"`) != len(files) {
		t.Errorf("--json again: exit %d:\n%s", code, out)
	}
}

// TestHAConfigRefusals: bad input exits 2, names the value, and writes
// nothing.
func TestHAConfigRefusals(t *testing.T) {
	with := func(flag, value string) []string {
		out := slices.Clone(haPairArgs)
		i := slices.Index(out, flag)
		if value == "" {
			return slices.Delete(out, i, i+2)
		}
		out[i+1] = value
		return out
	}
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("node: {name: gw-a, priority: 150, sync-addr: 10.51.0.1}\npreemt: true\n"), 0o644)
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte(ha.Examples[0].YAML), 0o644)
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"no node", with("--node", ""), []string{"--node is required"}},
		{"no egress interface", with("--egress-interface", ""), []string{"--egress-interface is required"}},
		{"node without address", with("--node", "gw-a:150"), []string{`--node "gw-a:150": want NAME:PRIO:SYNCADDR`}},
		{"priority not a number", with("--peer", "gw-b:high:10.51.0.2"), []string{`--peer "gw-b:high:10.51.0.2": the priority "high" is not a number`}},
		{"bad sync address", with("--node", "gw-a:150:10.51.0"), []string{`the sync address "10.51.0" is not an IP address`}},
		{"vip without length", with("--client-vip", "10.50.0.1"), []string{`--client-vip "10.50.0.1": want an address with its prefix length`}},
		{"bad egress vip", with("--egress-vip", "192.0.2.100/24,192.0.2.300/24"), []string{`--egress-vip "192.0.2.300/24"`}},
		{"router ids", append(slices.Clone(haPairArgs), "--router-ids", "50"), []string{`--router-ids "50": want the two virtual_router_ids`}},
		{"router id word", append(slices.Clone(haPairArgs), "--router-ids", "50,x"), []string{`"x" is not a number`}},
		{"owner priority", with("--node", "gw-a:255:10.51.0.1"), []string{"node gw-a priority 255: want 1..254"}},
		{"equal priorities", with("--peer", "gw-b:150:10.51.0.2"), []string{"both have priority 150"}},
		{"advert", append(slices.Clone(haPairArgs), "--advert", "105ms"), []string{"advert interval 105ms"}},
		{"negative advert", append(slices.Clone(haPairArgs), "--advert", "-1s"), []string{"--advert -1s: want a positive duration"}},
		{"purge after preemption", append(slices.Clone(haPairArgs), "--purge-timeout", "3s"), []string{"purge timeout 3s is not shorter than the preempt delay 2s"}},
		{"two problems", append(with("--node", "gw-a:0:10.51.0.1"), "--sync-port", "70000"), []string{"node gw-a priority 0", "sync port 70000"}},
		{"bad interface", with("--client-interface", "lan 2"), []string{`client interface "lan 2"`}},
		{"bad no-sync", with("--no-sync", "10.50.0.2/33"), []string{"--no-sync"}},
		{"file and flags", []string{"-f", good, "--preempt"}, []string{"--preempt with -f: give the pair either in the file or in flags"}},
		{"bad file", []string{"-f", bad}, []string{bad + ": line 2: field preemt not found"}},
		{"no file", []string{"-f", filepath.Join(dir, "none.yaml")}, []string{"none.yaml", "no such file"}},
		{"an argument", append(slices.Clone(haPairArgs), "extra"), []string{`ha config takes no arguments, got "extra"`}},
		{"relative root", append(slices.Clone(haPairArgs), "--root", "relative"), []string{`--root "relative": want an absolute directory`}},
		{"unknown flag", append(slices.Clone(haPairArgs), "--preemt"), []string{"did you mean --preempt?", "see egress-snat ha config --help"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			args := append([]string{"ha", "config"}, tc.args...)
			if tc.name != "relative root" {
				args = append(args, "--root", root)
			}
			code, _, msg := haRun(t, args...)
			if code != exitUsage {
				t.Errorf("exit %d (%s), want %d", code, msg, exitUsage)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("message %q, want it to name %q", msg, w)
				}
			}
			if got := tree(t, root); len(got) != 0 {
				t.Errorf("a refused run wrote %v", got)
			}
		})
	}
}

// haNode is a node's files generated with every path in a temporary
// directory, for drain and status.
type haNode struct {
	dir string
	cfg ha.Config
}

func newHANode(t *testing.T, edit func(*ha.Config)) haNode {
	t.Helper()
	dir := t.TempDir()
	c := haExampleA(t)
	p := func(name string) string { return filepath.Join(dir, name) }
	c.Paths = ha.Paths{
		Keepalived: p("keepalived.conf"), ConntrackdConf: p("conntrackd.conf"), Conntrackd: "/usr/sbin/conntrackd",
		ConntrackdLock: p("lock"), ConntrackdSocket: p("ctl"), Hook: p("notify.sh"), WatchPIDFile: p("watch.pid"),
		DrainFile: p("drain"), StateFile: p("state"),
	}
	if edit != nil {
		edit(&c)
	}
	files, err := ha.Files(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f.Path != ha.SysctlPath {
			if err := os.WriteFile(f.Path, []byte(f.Content), os.FileMode(f.Mode)); err != nil {
				t.Fatal(err)
			}
		}
	}
	return haNode{dir, c}
}

func (n haNode) setState(t *testing.T, state string, since time.Time) {
	t.Helper()
	if err := os.WriteFile(n.cfg.Paths.StateFile, []byte(fmt.Sprintf("%s %d.%09d\n", state, since.Unix(), since.Nanosecond())), 0o644); err != nil {
		t.Fatal(err)
	}
}

// fakeHAHost stands in for keepalived, the node's addresses and
// conntrackd: conntrackd answers from the captures named in samples (-s,
// -s link, -s queue files of ha/testdata/conntrackd), one sample after
// another, or fails with conntrackdErr.
type fakeHAHost struct {
	keepalived    bool
	held          map[netip.Prefix]bool
	samples       [][3]string
	conntrackdErr error
	calls         int
	// others answer ARP probes for the addresses they name (a split
	// brain's other master).
	others map[netip.Addr]string
}

func (h *fakeHAHost) install(t *testing.T) {
	savedK, savedH, savedS, savedO := keepalivedRunning, holdsAddress, syncStats, otherHolders
	t.Cleanup(func() { keepalivedRunning, holdsAddress, syncStats, otherHolders = savedK, savedH, savedS, savedO })
	otherHolders = func(_ string, a netip.Addr, _ time.Duration) ([]net.HardwareAddr, error) {
		if mac, ok := h.others[a]; ok {
			hw, err := net.ParseMAC(mac)
			return []net.HardwareAddr{hw}, err
		}
		return nil, nil
	}
	keepalivedRunning = func() (bool, error) { return h.keepalived, nil }
	holdsAddress = func(p netip.Prefix, dev string) (bool, error) { return h.held[p], nil }
	syncStats = func(program, conf string) ha.Stats {
		return func(_ context.Context, what string) (string, error) {
			if h.conntrackdErr != nil {
				return "", h.conntrackdErr
			}
			s := h.samples[min(h.calls/3, len(h.samples)-1)]
			h.calls++
			name := map[string]string{"": s[0], "link": s[1], "queue": s[2]}[what]
			b, err := os.ReadFile(filepath.Join("..", "..", "ha", "testdata", "conntrackd", name))
			if err != nil {
				t.Fatal(err)
			}
			return string(b), nil
		}
	}
}

var (
	haHealthy      = [3]string{"healthy-b-s.txt", "healthy-b-link.txt", "healthy-b-queue.txt"}
	haHealthyLater = [3]string{"healthy-b-s-later.txt", "healthy-b-link-later.txt", "healthy-b-queue.txt"}
	haPeerDead     = [3]string{"peerdead-b-s.txt", "peerdead-b-link.txt", "peerdead-b-queue.txt"}
)

// TestHADrain: drain writes 1 into the drain file keepalived.conf names
// and waits for the hook to record that the node left the master role
// (exit 1 if it does not); undrain writes 0 and says what follows.
func TestHADrain(t *testing.T) {
	n := newHANode(t, nil)
	host := &fakeHAHost{keepalived: true}
	host.install(t)
	kc := "--keepalived-conf=" + n.cfg.Paths.Keepalived
	drainFile := func() string { b, _ := os.ReadFile(n.cfg.Paths.DrainFile); return string(b) }

	// Master, and the peer takes over.
	n.setState(t, "MASTER", time.Now().Add(-time.Hour))
	go func() {
		time.Sleep(100 * time.Millisecond)
		os.WriteFile(n.cfg.Paths.StateFile+".tmp", []byte(fmt.Sprintf("BACKUP %d.0\n", time.Now().Unix())), 0o644)
		os.Rename(n.cfg.Paths.StateFile+".tmp", n.cfg.Paths.StateFile)
	}()
	code, out, msg := haRun(t, "ha", "drain", kc)
	if code != 0 || drainFile() != "1\n" {
		t.Fatalf("drain: exit %d, drain file %q: %s%s", code, drainFile(), out, msg)
	}
	for _, w := range []string{"drained gw-a: " + n.cfg.Paths.DrainFile + " holds 1", "lowers its priority to 1",
		"the peer takes over ~350ms after this node's last advert", "gw-a is BACKUP since"} {
		if !strings.Contains(out, w) {
			t.Errorf("drain printed:\n%s\nwant %q", out, w)
		}
	}
	// Again: idempotent, and the node is backup already.
	code, out, _ = haRun(t, "ha", "drain", kc)
	if code != 0 || !strings.Contains(out, "gw-a is drained already") || !strings.Contains(out, "gw-a is BACKUP: it will not take the role") {
		t.Errorf("drain again: exit %d:\n%s", code, out)
	}

	// Master, and nothing happens.
	os.WriteFile(n.cfg.Paths.DrainFile, []byte("0\n"), 0o644)
	n.setState(t, "MASTER", time.Now())
	code, _, msg = haRun(t, "ha", "drain", kc, "--timeout", "200ms")
	if code != exitFailure || !strings.Contains(msg, "gw-a is still MASTER 200ms after the drain: the peer has not taken over") {
		t.Errorf("drain of a master whose peer never takes over: exit %d, %q", code, msg)
	}
	if drainFile() != "1\n" {
		t.Errorf("the failed wait removed the drain: %q", drainFile())
	}
	code, out, _ = haRun(t, "ha", "undrain", kc)
	if code != 0 || drainFile() != "0\n" || !strings.Contains(out, "undrained gw-a") || !strings.Contains(out, "takes the role back 2s after") {
		t.Errorf("undrain: exit %d, drain file %q:\n%s", code, drainFile(), out)
	}
	code, out, _ = haRun(t, "ha", "undrain", kc)
	if code != 0 || !strings.Contains(out, "gw-a is not drained") {
		t.Errorf("undrain again: exit %d:\n%s", code, out)
	}

	// keepalived not running: the file is written, nothing awaited.
	host.keepalived = false
	code, out, _ = haRun(t, "ha", "drain", kc)
	if code != 0 || drainFile() != "1\n" || !strings.Contains(out, "keepalived is not running here: the node will start drained") {
		t.Errorf("drain without keepalived: exit %d:\n%s", code, out)
	}

	// The other modes say what undrain leads to.
	host.keepalived = true
	for _, tc := range []struct {
		name string
		edit func(*ha.Config)
		want string
	}{
		{"lower priority", func(c *ha.Config) { c.Node, c.Peer = c.Peer, c.Node }, "it has the lower priority: it stays backup while the peer is master"},
		{"nopreempt", func(c *ha.Config) { c.Preempt, c.PreemptDelay = false, 0 }, "without preemption it stays backup until the peer fails or is drained"},
	} {
		n := newHANode(t, tc.edit)
		if code, out, msg := haRun(t, "ha", "undrain", "--keepalived-conf", n.cfg.Paths.Keepalived); code != 0 || !strings.Contains(out, tc.want) {
			t.Errorf("%s: undrain: exit %d, %s%s; want %q", tc.name, code, out, msg, tc.want)
		}
	}
	n = newHANode(t, func(c *ha.Config) { c.Preempt, c.PreemptDelay = false, 0 })
	n.setState(t, "MASTER", time.Now())
	if code, out, _ := haRun(t, "ha", "drain", "--keepalived-conf", n.cfg.Paths.Keepalived, "--no-wait"); code != 0 || !strings.Contains(out, "keepalived puts it into FAULT") {
		t.Errorf("drain without preemption: exit %d:\n%s", code, out)
	}

	// No files: exit 1, saying what writes them.
	code, _, msg = haRun(t, "ha", "drain", "--keepalived-conf", filepath.Join(t.TempDir(), "none.conf"))
	if code != exitFailure || !strings.Contains(msg, "this node has no pair configuration yet (egress-snat ha config writes it)") {
		t.Errorf("drain without files: exit %d, %q", code, msg)
	}
	if code, _, msg := haRun(t, "ha", "drain", kc, "--timeout", "0s"); code != exitUsage || !strings.Contains(msg, "--timeout 0s") {
		t.Errorf("drain --timeout 0s: exit %d, %q; want exit 2", code, msg)
	}
}

// TestHAStatus: status says the role, the addresses, whether drained, and
// the sync's health, exit 0 when all is well and 1 with each reason when
// not; --json gives the same.
func TestHAStatus(t *testing.T) {
	n := newHANode(t, nil)
	kc := "--keepalived-conf=" + n.cfg.Paths.Keepalived
	all := map[netip.Prefix]bool{netip.MustParsePrefix("10.50.0.1/24"): true, netip.MustParsePrefix("192.0.2.100/24"): true}
	for _, tc := range []struct {
		name     string
		state    string // "" for no state file
		drained  bool
		host     fakeHAHost
		code     int
		want     []string
		problems []string
	}{
		{"healthy master", "MASTER", false, fakeHAHost{keepalived: true, held: all, samples: [][3]string{haHealthy, haHealthyLater}}, 0,
			[]string{"gw-a: MASTER since", "holds 10.50.0.1/24 on lan, holds 192.0.2.100/24 on uplink; keepalived running; not drained",
				"sync: healthy: link sync running, 2 messages from the peer 10.51.0.2 in",
				"6 connections of the peer's ready to commit (external cache), 6 connections of this node's replicated"}, nil},
		{"healthy backup, drained", "BACKUP", true, fakeHAHost{keepalived: true, samples: [][3]string{haHealthy, haHealthyLater}}, 0,
			[]string{"gw-a: BACKUP since", "lacks 10.50.0.1/24 on lan", "DRAINED (ha undrain returns it)"}, nil},
		{"keepalived gone", "MASTER", false, fakeHAHost{samples: [][3]string{haHealthy, haHealthyLater}}, exitFailure, nil,
			[]string{"keepalived is not running in this network namespace", "the hook recorded MASTER, but this node holds 0 of its 2 virtual addresses"}},
		{"backup holding an address", "BACKUP", false, fakeHAHost{keepalived: true, held: map[netip.Prefix]bool{netip.MustParsePrefix("192.0.2.100/24"): true}, samples: [][3]string{haHealthy, haHealthyLater}}, exitFailure, nil,
			[]string{"the hook recorded BACKUP, but this node holds 1 of the virtual addresses"}},
		{"fault", "FAULT", false, fakeHAHost{keepalived: true, samples: [][3]string{haHealthy, haHealthyLater}}, exitFailure, nil,
			[]string{"FAULT: keepalived found a tracked interface down"}},
		{"drained master", "MASTER", true, fakeHAHost{keepalived: true, held: all, samples: [][3]string{haHealthy, haHealthyLater}}, exitFailure, nil,
			[]string{"drained, but still MASTER"}},
		{"no state", "", false, fakeHAHost{keepalived: true, samples: [][3]string{haHealthy, haHealthyLater}}, exitFailure, nil,
			[]string{"no role recorded in " + n.cfg.Paths.StateFile + ": keepalived has not run the hook since boot"}},
		{"split brain", "MASTER", false, fakeHAHost{keepalived: true, held: all, samples: [][3]string{haHealthy, haHealthyLater},
			others: map[netip.Addr]string{netip.MustParseAddr("192.0.2.100"): "02:00:00:00:0b:02"}}, exitFailure, nil,
			[]string{"split brain: 192.0.2.100 on uplink is also answered for by 02:00:00:00:0b:02: the other node is master too"}},
		{"peer's conntrackd gone", "MASTER", false, fakeHAHost{keepalived: true, held: all, samples: [][3]string{haPeerDead}}, exitFailure,
			[]string{"sync: NOT healthy"}, []string{"sync: nothing received from the peer on sync in"}},
		{"conntrackd gone", "BACKUP", false, fakeHAHost{keepalived: true, conntrackdErr: fmt.Errorf("conntrackd -C x -s: [ERROR] can't connect: is conntrackd running?")}, exitFailure,
			[]string{"sync: NOT healthy"}, []string{"sync: conntrackd does not answer: conntrackd -C x -s: [ERROR] can't connect: is conntrackd running? (systemctl status conntrackd)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(n.cfg.Paths.StateFile)
			if tc.state != "" {
				n.setState(t, tc.state, time.Now().Add(-90*time.Second))
			}
			drain := "0\n"
			if tc.drained {
				drain = "1\n"
			}
			os.WriteFile(n.cfg.Paths.DrainFile, []byte(drain), 0o644)
			for _, js := range []bool{false, true} {
				h := tc.host
				h.install(t)
				args := []string{"ha", "status", kc, "--window", "300ms"}
				if js {
					args = append(args, "--json")
				}
				code, out, msg := haRun(t, args...)
				if code != tc.code {
					t.Errorf("%q: exit %d (%s), want %d:\n%s", args, code, msg, tc.code, out)
				}
				if !js {
					for _, w := range append(slices.Clone(tc.want), tc.problems...) {
						if !strings.Contains(out, w) {
							t.Errorf("status printed:\n%s\nwant %q", out, w)
						}
					}
					continue
				}
				var r haStatusReport
				dec := json.NewDecoder(strings.NewReader(out))
				dec.DisallowUnknownFields()
				if err := dec.Decode(&r); err != nil {
					t.Fatalf("%v\n%s", err, out)
				}
				if r.Healthy != (tc.code == 0) || r.Role != tc.state || r.Drained != tc.drained || r.Node != "gw-a" || len(r.Addresses) != 2 || r.Problems == nil {
					t.Errorf("--json: %+v; want healthy %v, role %q, drained %v, node gw-a, two addresses, problems a list", r, tc.code == 0, tc.state, tc.drained)
				}
				if len(r.Problems) != len(tc.problems) {
					t.Errorf("--json problems %q, want %d: %q", r.Problems, len(tc.problems), tc.problems)
				}
				for i, p := range tc.problems {
					if i < len(r.Problems) && !strings.Contains(r.Problems[i], p) {
						t.Errorf("--json problem %d: %q, want %q", i, r.Problems[i], p)
					}
				}
				if tc.host.conntrackdErr == nil && (r.Sync.ExternalCache != 6 || r.Sync.Link != "sync" || r.Sync.Peer != "10.51.0.2") {
					t.Errorf("--json sync: %+v, want 6 in the external cache, link sync, peer 10.51.0.2", r.Sync)
				}
			}
		})
	}
	if code, _, msg := haRun(t, "ha", "status", "--keepalived-conf", filepath.Join(t.TempDir(), "none.conf")); code != exitFailure || !strings.Contains(msg, "egress-snat ha config writes it") {
		t.Errorf("status without files: exit %d, %q", code, msg)
	}
}

// TestREADMETwoGateways: the README's "Two gateways" setup works as
// written: its ha config line passes (with --dry-run) and its
// /etc/egress-snat.yaml decodes, standby key and all.
func TestREADMETwoGateways(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## Two gateways\n")
	if !ok {
		t.Fatal("README.md has no section Two gateways")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	var command, file []string
	inFile := false
	for _, l := range strings.Split(section, "\n") {
		code, isCode := strings.CutPrefix(l, "    ")
		switch {
		case !isCode:
		case inFile && code == "EOF":
			inFile = false
		case inFile:
			file = append(file, code)
		case strings.Contains(code, "<<'EOF'"):
			inFile = true
		case strings.HasPrefix(code, "egress-snat ha config") || len(command) > 0 && strings.HasSuffix(command[len(command)-1], "\\"):
			command = append(command, code)
		}
	}
	if len(command) == 0 || len(file) == 0 {
		t.Fatalf("README's Two gateways: ha config line %q, file %q; want both", command, file)
	}
	args := strings.Fields(strings.ReplaceAll(strings.Join(command, " "), "\\", " "))[1:]
	if code, _, msg := haRun(t, append(args, "--dry-run")...); code != 0 {
		t.Errorf("README's %q --dry-run: exit %d: %s", strings.Join(args, " "), code, msg)
	}
	f, err := config.Decode(strings.NewReader(strings.Join(file, "\n") + "\n"))
	if err != nil || len(f.Rules) != 1 || !f.Rules[0].Standby {
		t.Errorf("README's /etc/egress-snat.yaml: %+v, %v; want one standby rule", f, err)
	}
}

// TestPackagedDefault: Debian's conntrackd.conf as the package shipped it
// is recognised by dpkg's md5 sum, and an edited one is not. On this
// machine's own file, read only; without conntrackd installed there is
// nothing to recognise.
func TestPackagedDefault(t *testing.T) {
	const path = "/etc/conntrackd/conntrackd.conf"
	out, err := exec.Command("dpkg-query", "-W", "-f", "${Conffiles}\n", "conntrackd").Output()
	if err != nil || !strings.Contains(string(out), path) {
		t.Skip("conntrackd is not installed from a Debian package here")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Skip(err)
	}
	if strings.Contains(string(b), generatedMark) {
		t.Skipf("%s here was written by egress-snat", path)
	}
	var sum string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == path {
			sum = f[1]
		}
	}
	if got := fmt.Sprintf("%x", md5.Sum(b)); got != sum {
		t.Skipf("%s here was edited (md5 %s, the package's %s)", path, got, sum)
	}
	if !packagedDefault(path, b) {
		t.Errorf("packagedDefault(%s as the package shipped it) = false", path)
	}
	if packagedDefault(path, append(b, "# edited\n"...)) {
		t.Errorf("packagedDefault(an edited %s) = true", path)
	}
	if packagedDefault("/etc/keepalived/keepalived.conf", b) {
		t.Error("packagedDefault of another path with the same content = true")
	}
}

// TestProcInThisNetns: this test process is found in its own network
// namespace by its name; a name no process has is not.
func TestProcInThisNetns(t *testing.T) {
	b, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Skip(err)
	}
	if ok, err := procInThisNetns(strings.TrimSpace(string(b)))(); !ok || err != nil {
		t.Errorf("this process (%s): %v, %v; want found", strings.TrimSpace(string(b)), ok, err)
	}
	if ok, err := procInThisNetns("no-such-process-name")(); ok || err != nil {
		t.Errorf("a name no process has: %v, %v; want not found", ok, err)
	}
}
