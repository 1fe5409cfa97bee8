package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/snat"
)

// TestConfigMapPassesApplyDryRun: the desired state shipped in
// deploy/kubernetes/configmap.yaml passes apply --dry-run on a host that
// has one of the addresses it names (the lab's host), and changes nothing.
// (deploy/kubernetes's own test decodes the manifests strictly; it cannot
// reach the lab, which is internal to this module.)
func TestConfigMapPassesApplyDryRun(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "kubernetes", "configmap.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	if err := yaml.Unmarshal(b, &cm); err != nil {
		t.Fatal(err)
	}
	content, ok := cm.Data["egress-snat.yaml"]
	if !ok {
		t.Fatal("configmap.yaml has no data key egress-snat.yaml")
	}
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	l := newLab(t)
	before := l.Ruleset(t)
	out := mustES(t, l, "apply", "--dry-run", "-f", path)
	t.Logf("apply --dry-run:\n%s", out)
	if !strings.Contains(out, "would add") {
		t.Errorf("apply --dry-run of the ConfigMap's file: want a rule to add, got:\n%s", out)
	}
	if after := l.Ruleset(t); after != before {
		t.Errorf("apply --dry-run changed the rules")
	}
}

// daemonSetProbes reads deploy/kubernetes/daemonset.yaml: the container's
// args and the exec command of each probe, by name.
func daemonSetProbes(t *testing.T) (args []string, probes map[string][]string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "kubernetes", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	type probe struct {
		Exec struct {
			Command []string `yaml:"command"`
		} `yaml:"exec"`
	}
	var ds struct {
		Spec struct {
			Template struct {
				Spec struct {
					Containers []struct {
						Args           []string `yaml:"args"`
						StartupProbe   probe    `yaml:"startupProbe"`
						LivenessProbe  probe    `yaml:"livenessProbe"`
						ReadinessProbe probe    `yaml:"readinessProbe"`
					} `yaml:"containers"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	if len(ds.Spec.Template.Spec.Containers) != 1 {
		t.Fatal("daemonset.yaml: want one container")
	}
	c := ds.Spec.Template.Spec.Containers[0]
	return c.Args, map[string][]string{
		"startup": c.StartupProbe.Exec.Command, "liveness": c.LivenessProbe.Exec.Command, "readiness": c.ReadinessProbe.Exec.Command,
	}
}

// TestDaemonSetProbes runs the DaemonSet's own probe commands against a
// watch run with the DaemonSet's --health-file, in a lab (the file moved to
// a temporary directory, the binary the one under test):
//   - before the first reconcile, the startup probe fails; after it, all
//     three pass;
//   - drift that watch repairs (the chain flushed, as a firewall reload
//     does) never fails liveness or readiness;
//   - while another run holds the lock, so that watch cannot apply,
//     readiness fails and liveness does not (no restart for what a restart
//     would not fix); readiness is back once the lock is free;
//   - a stopped watch (SIGSTOP) fails liveness once --max-age has passed
//     (2s here instead of the DaemonSet's 30s), and passes again when it
//     runs.
func TestDaemonSetProbes(t *testing.T) {
	iptablesOnly(t, "its drift is a flushed EGRESS-SNAT chain (TestNFTDriftRepaired is the nftables counterpart)")
	l := newLab(t)
	args, probes := daemonSetProbes(t)
	i := slices.Index(args, "--health-file")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("daemonset.yaml: watch runs without --health-file: %v", args)
	}
	shipped, health := args[i+1], filepath.Join(t.TempDir(), "egress-snat.health")
	probe := func(name string, extra ...string) (bool, string) {
		t.Helper()
		cmd := slices.Clone(probes[name])
		if len(cmd) < 2 {
			t.Fatalf("daemonset.yaml has no %s probe command", name)
		}
		for j, a := range cmd {
			if a == shipped {
				cmd[j] = health
			}
		}
		out, err := exec.Command(bin, append(cmd[1:], extra...)...).CombinedOutput()
		return err == nil, strings.TrimSpace(string(out))
	}
	await := func(what string, limit time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(limit)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %s", what, limit)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	passes := func(name string, extra ...string) func() bool {
		return func() bool { ok, _ := probe(name, extra...); return ok }
	}

	file := filepath.Join(t.TempDir(), "egress-snat.yaml")
	if err := os.WriteFile(file, []byte("rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if ok, out := probe("startup"); ok {
		t.Errorf("startup probe passed before watch ran: %s", out)
	}
	w := relStart(t, l, "--lock-timeout", "300ms", "watch", "-f", file, "--health-file", health)
	t.Cleanup(func() {
		w.cmd.Process.Signal(syscall.SIGCONT)
		w.cmd.Process.Signal(syscall.SIGTERM)
		if _, ok := w.wait(10 * time.Second); !ok {
			w.cmd.Process.Kill()
			<-w.done
		}
	})
	await("startup probe after the first reconcile", 10*time.Second, passes("startup"))
	for _, name := range []string{"liveness", "readiness"} {
		if ok, out := probe(name); !ok {
			t.Errorf("%s probe of a converged watch failed: %s", name, out)
		}
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})

	// Drift that watch repairs: the probes hold throughout.
	relRestore(t, l, 4, "-F EGRESS-SNAT\n")
	for range 20 {
		for _, name := range []string{"liveness", "readiness"} {
			if ok, out := probe(name); !ok {
				t.Errorf("%s probe failed while watch repaired a flushed chain: %s", name, out)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})

	// The lock held by another run: watch cannot apply the repair.
	var st unix.Stat_t
	if err := unix.Stat("/run/netns/"+l.Host, &st); err != nil {
		t.Fatal(err)
	}
	lock, err := os.OpenFile(filepath.Join(snat.LockDir, fmt.Sprintf("netns-%d.lock", st.Ino)), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	relRestore(t, l, 4, "-F EGRESS-SNAT\n")
	await("readiness failing while the lock is held", 10*time.Second, func() bool { return !passes("readiness")() })
	if ok, out := probe("liveness"); !ok {
		t.Errorf("liveness failed while watch only could not apply: %s", out)
	}
	if _, out := probe("readiness"); !strings.Contains(out, "not ready") || !strings.Contains(out, "lock") {
		t.Errorf("readiness, with the lock held: %q, want it to say why", out)
	}
	unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	await("readiness back once the lock is free", 10*time.Second, passes("readiness"))
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})

	// A stopped loop: liveness fails after --max-age.
	if err := w.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	await("liveness failing for a stopped watch", 10*time.Second, func() bool { return !passes("liveness", "--max-age", "2s")() })
	if err := w.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	await("liveness back once watch runs", 10*time.Second, passes("liveness", "--max-age", "2s"))
}
