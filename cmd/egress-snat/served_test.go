package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/internal/api"
	"github.com/egress-snat/egress-snat/snat"
)

// fakeEnv is the env of h's fakes with Manager m, as FuzzCLI's runs have
// it; c nil leaves the output and lock timeout for served.env to set.
func (h *cliHost) fakeEnv(c *cli.Context, m *snat.Manager) *env {
	e := &env{sel: h.router, paths: h.router, mgr: m, flavour: iptables.FlavourNFT, kind: backendIPTablesNFT, lockTimeout: time.Second}
	if c != nil {
		e.out, e.lockTimeout = c.App.Writer, c.Duration("lock-timeout")
	}
	return e
}

// countSaves counts the full reads of the sets.
type countSaves struct {
	iptables.IPSets
	saves int
}

func (c *countSaves) Save() (string, error) { c.saves++; return c.IPSets.Save() }

// testMemory is a daemon's snat.Memory.
type testMemory struct{ known snat.NATPlan }

func (m *testMemory) Known() snat.NATPlan { return m.known }
func (m *testMemory) Wrote(p snat.Plan, err error) {
	if m.known = p.NAT; err != nil {
		m.known = nil
	}
}

// oneShot runs a command line on h as main runs it without a daemon.
func (h *cliHost) oneShot(args []string) api.Result {
	saved := envFor
	envFor = func(c *cli.Context) (*env, error) {
		return h.fakeEnv(c, &snat.Manager{Backend: &iptables.Backend{Tables: h.tables, Sets: h.sets}, Routing: h.routing, Locker: noLock{}}), nil
	}
	defer func() { envFor = saved }()
	app := newApp()
	app.Before = nil // --netns would re-execute this process
	return runApp(context.Background(), app, args)
}

// daemonHost is a cliHost behind a daemon's Manager, which remembers what
// it wrote, and its sets' reads counted.
type daemonHost struct {
	*cliHost
	mem  *testMemory
	sets *countSaves
}

func newDaemonHost() *daemonHost {
	h := &daemonHost{cliHost: newCLIHost(), mem: &testMemory{}}
	h.sets = &countSaves{IPSets: h.cliHost.sets}
	return h
}

// manager is the daemon's Manager of h.
func (h *daemonHost) manager() *snat.Manager {
	return &snat.Manager{Backend: &iptables.Backend{Tables: h.tables, Sets: h.sets}, Routing: h.routing, Locker: noLock{}, Memory: h.mem}
}

// served runs a command line on h as the daemon runs a client's: the
// request a client in this process would send, run by runServed.
func (h *daemonHost) served(t *testing.T, args []string) api.Result {
	t.Helper()
	req, ok := newRequest(args, time.Second)
	if !ok {
		t.Fatalf("%q: not a request", args)
	}
	m := h.manager()
	wd, _ := os.Getwd()
	return runServed(context.Background(), &served{base: h.fakeEnv(nil, m), mgr: m, cwd: wd}, req)
}

// servedFiles writes FuzzCLI's files into a directory, which becomes the
// working directory for the test, and points the permanent file there.
func servedFiles(t *testing.T) string {
	t.Helper()
	t.Setenv("PATH", t.TempDir()) // nothing on the host runs
	dir := t.TempDir()
	for name, content := range cliFiles {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Chdir(dir)
	t.Setenv("EGRESS_SNAT_CONFIG", filepath.Join(dir, "permanent.yaml"))
	// The fakes are iptables-nft's, the daemon's backend: a pass of the
	// suite on another backend (EGRESS_SNAT_IPTABLES=legacy) must not ask
	// for that one, which the daemon rightly declines.
	for _, v := range []string{"EGRESS_SNAT_IPTABLES", "EGRESS_SNAT_BACKEND"} {
		if old, ok := os.LookupEnv(v); ok {
			os.Unsetenv(v)
			t.Cleanup(func() { os.Setenv(v, old) })
		}
	}
	return dir
}

// TestServedSameAsOneShot: every served command, run one-shot on one fake
// host and through the daemon's path on another, prints the same stdout
// (text, --json, --dry-run) and stderr, exits the same, and leaves the same
// kernel; bad input included. Relative paths are the client's.
func TestServedSameAsOneShot(t *testing.T) {
	servedFiles(t)
	alone, daemon := newCLIHost(), newDaemonHost()
	for _, line := range []string{
		"list",
		"list --json",
		"check",
		"set --to 192.0.2.23",
		"set --to 192.0.2.22 --dst 198.51.100.4 --json",
		"set --to 192.0.2.22 --dst 198.51.100.5 --dry-run",
		"set --to 192.0.2.22 --dst 198.51.100.5 --dry-run --json",
		"set --to 192.0.2.22,192.0.2.23 --spread --dst 203.0.113.0/24",
		"set --to 2001:db8::22 --dst 2001:db8:ffff::/48 --permanent",
		"set --to 192.0.2.99",
		"set --to 192.0.2.22 --dst 198.51.100.300",
		"--lock-timeout -1s set --to 192.0.2.22",
		"set --to 203.0.113.130 --dst 198.51.100.0/24",
		"list",
		"list --json",
		"check --json",
		"rotate --pool 192.0.2.22,192.0.2.23 --dst 198.51.100.4",
		"rotate --pool 192.0.2.22,192.0.2.23 --dst 198.51.100.4 --json",
		"rotate --pool 192.0.2.22,192.0.2.23 --dst 198.51.100.4 --dry-run",
		"unset --dst 198.51.100.4",
		"unset --dst 198.51.100.4",
		"unset --dst 198.51.100.0/24 --json",
		"save --dry-run",
		"save",
		"check",
		"apply -f sets.yaml --dry-run --json",
		"apply -f sets.yaml",
		"apply -f sets.yaml",
		"check -f sets.yaml",
		"check -f good.yaml --json",
		"apply -f twice.yaml",
		"apply -f fifo.yaml",
		"apply -f shadow.yaml",
		"apply -f missing.yaml",
		"list",
		"clear --dry-run",
		"clear --permanent --json",
		"clear",
		"list --json",
	} {
		args := strings.Fields(line)
		want := alone.oneShot(args)
		got := daemon.served(t, args)
		if got.Decline != "" {
			t.Errorf("%s: declined (%s)", line, got.Decline)
			continue
		}
		if got.Exit != want.Exit || !bytes.Equal(got.Stdout, want.Stdout) || !bytes.Equal(got.Stderr, want.Stderr) {
			t.Errorf("%s: through the daemon, exit %d and (-one-shot +served):\n%s%s", line, got.Exit,
				cmp.Diff(string(want.Stdout), string(got.Stdout)), cmp.Diff(string(want.Stderr), string(got.Stderr)))
		}
		if a, d := alone.snapshot(), daemon.snapshot(); a != d {
			t.Errorf("%s: the hosts differ (-one-shot +served):\n%s", line, cmp.Diff(a, d))
		}
	}
}

// TestServedTrustsWhatItWrote: after a write through the daemon, the next
// command reads the sets' counts, not their members; one that finds a
// count changed behind its back reads everything.
func TestServedTrustsWhatItWrote(t *testing.T) {
	dir := servedFiles(t)
	h := newDaemonHost()
	if r := h.served(t, []string{"apply", "-f", filepath.Join(dir, "sets.yaml")}); r.Exit != 0 {
		t.Fatalf("apply: exit %d: %s", r.Exit, r.Stderr)
	}
	before := h.sets.saves
	for _, line := range []string{"list", "apply -f sets.yaml", "set --to 192.0.2.23 --dst 198.51.100.77", "check -f sets.yaml"} {
		r := h.served(t, strings.Fields(line))
		if r.Exit > 1 {
			t.Fatalf("%s: exit %d: %s", line, r.Exit, r.Stderr)
		}
	}
	if n := h.sets.saves - before; n != 0 {
		t.Errorf("after a write through the daemon, %d full reads of the sets; want none", n)
	}
	// Behind its back: a member added by hand changes the count.
	if err := h.cliHost.sets.fake.Restore(addToOurSet(t, h)); err != nil {
		t.Fatal(err)
	}
	h.served(t, []string{"list"})
	if h.sets.saves == before {
		t.Error("a set whose count changed behind the daemon's back was not read again")
	}
}

// addToOurSet is an ipset restore that adds a member to one of our sets.
func addToOurSet(t *testing.T, h *daemonHost) string {
	t.Helper()
	heads, err := h.cliHost.sets.fake.Headers()
	if err != nil {
		t.Fatal(err)
	}
	for name := range heads {
		return "add " + name + " 10.99.0.0/16\n"
	}
	t.Fatal("no set of ours")
	return ""
}

// TestServedDeclines: what the daemon leaves to the client (nothing run):
// apply --confirm, another backend than the daemon's, --netns, and a
// command it does not serve.
func TestServedDeclines(t *testing.T) {
	servedFiles(t)
	h := newDaemonHost()
	before := h.snapshot()
	for _, line := range []string{
		"apply -f good.yaml --confirm 60s",
		"--backend iptables-legacy set --to 192.0.2.22",
		"--backend nftables list",
		"--netns other list",
		"watch -f good.yaml",
		"stats",
		"__revert --token x",
	} {
		if r := h.served(t, strings.Fields(line)); r.Decline == "" {
			t.Errorf("%s: not declined: exit %d, %s%s", line, r.Exit, r.Stdout, r.Stderr)
		}
	}
	for _, line := range []string{"--backend auto list", "--backend iptables-nft list", "--backend nft list"} {
		if r := h.served(t, strings.Fields(line)); r.Decline != "" || r.Exit != 0 {
			t.Errorf("%s: declined %q, exit %d, want it served", line, r.Decline, r.Exit)
		}
	}
	if after := h.snapshot(); after != before {
		t.Errorf("declined commands changed the host:\n%s", cmp.Diff(before, after))
	}
}

// TestServedEnvironment: the client's environment stands for its global
// flags, the daemon's does not, and a flag the client gave wins.
func TestServedEnvironment(t *testing.T) {
	dir := servedFiles(t)
	other := filepath.Join(dir, "other.yaml")
	h := newDaemonHost()
	// The daemon's own environment must not leak in: the request carries
	// the client's EGRESS_SNAT_CONFIG (servedFiles set it).
	req, _ := newRequest([]string{"set", "--to", "192.0.2.22", "--permanent"}, time.Second)
	t.Setenv("EGRESS_SNAT_CONFIG", filepath.Join(dir, "daemons.yaml"))
	m := h.manager()
	r := runServed(context.Background(), &served{base: h.fakeEnv(nil, m), mgr: m, cwd: dir}, req)
	if r.Exit != 0 {
		t.Fatalf("set --permanent: exit %d: %s", r.Exit, r.Stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "permanent.yaml")); err != nil {
		t.Errorf("the client's permanent file: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "daemons.yaml")); err == nil {
		t.Error("the daemon's environment chose the permanent file")
	}
	req.Args = []string{"--config", other, "set", "--to", "192.0.2.23", "--dst", "198.51.100.4", "--permanent"}
	if r := runServed(context.Background(), &served{base: h.fakeEnv(nil, m), mgr: m, cwd: dir}, req); r.Exit != 0 {
		t.Fatalf("--config set --permanent: exit %d: %s", r.Exit, r.Stderr)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("--config given beside EGRESS_SNAT_CONFIG: %v, want the flag to win", err)
	}
}
