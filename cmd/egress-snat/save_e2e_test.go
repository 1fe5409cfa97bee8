package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestSaveRoundTrip: save writes the installed rules as a file that
// apply -f reproduces exactly, every kind of entry included: one source, a
// spread, a destination set, a carve-out that keeps the natural source, a
// pinned interface and IPv6.
func TestSaveRoundTrip(t *testing.T) {
	l := newLab(t)
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	for _, args := range [][]string{
		{"set", "--to", "192.0.2.23", "--dst", "198.51.100.0/24"},
		{"set", "--to", "192.0.2.250", "--dst", "198.51.100.5"}, // keeps the natural source
		{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4", "--out", "eth0"},
		{"set", "--to", "192.0.2.22,192.0.2.23", "--spread", "--dst", "203.0.113.0/25"},
		{"set", "--to", "198.18.0.10", "--dst", "198.18.7.0/24"},
		{"set", "--to", "192.0.2.22", "--dst", "203.0.113.200", "--dst", "203.0.113.201", "--dst", "203.0.113.202"},
		{"set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::/48"},
		{"set", "--to", "192.0.2.23", "--uid", "0", "--dst", "203.0.113.7"}, // root's own traffic
		{"set", "--to", "192.0.2.22", "--from", "10.66.0.0/16"},             // forwarded, every destination
		{"set", "--to", "192.0.2.23", "--from", "10.67.0.0/16", "--dst", "198.51.100.0/24"},
	} {
		mustES(t, l, args...)
	}
	installed := l.Ruleset(t)
	seen := map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::22"}
	wantSeen(t, l, seen)

	// A comment in an existing file survives a save.
	if err := os.WriteFile(path, []byte("# egress-snat permanent state\nrules: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := mustES(t, l, "--config", path, "save")
	if !strings.Contains(out, path) {
		t.Errorf("save said %q, want it to name %s", out, path)
	}
	saved, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("saved file:\n%s", saved)
	if !strings.HasPrefix(string(saved), "# egress-snat permanent state\n") {
		t.Errorf("the file's comment did not survive save:\n%s", saved)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode after save: %v, want 0600 kept", fi.Mode().Perm())
	}
	if dry := mustES(t, l, "--config", path, "save", "--dry-run"); dry != string(saved) {
		t.Errorf("save --dry-run printed (-want +got):\n%s", cmp.Diff(string(saved), dry))
	}

	mustES(t, l, "clear")
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})
	mustES(t, l, "apply", "-f", path)
	if got := l.Ruleset(t); got != installed {
		t.Errorf("apply -f of the saved file (-before save +after apply):\n%s", cmp.Diff(installed, got))
	}
	wantSeen(t, l, seen)
	if r := es(t, l, "check", "-f", path); r.code != checkInSync {
		t.Errorf("check -f saved file: exit %d, want in sync\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// TestSaveRefusesUnreadableFile: a permanent file that is not a valid
// desired-state file is not overwritten.
func TestSaveRefusesUnreadableFile(t *testing.T) {
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	bad := "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n    gateway: eth0 # not a key\n"
	if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	r := es(t, l, "--config", path, "save")
	if r.code != exitUsage || !strings.Contains(r.stderr, "gateway") {
		t.Errorf("save over a bad file: exit %d, stderr %q; want %d naming the bad key", r.code, r.stderr, exitUsage)
	}
	if got, _ := os.ReadFile(path); string(got) != bad {
		t.Errorf("the bad file was changed to:\n%s", got)
	}
	r = es(t, l, "--config", filepath.Join(t.TempDir(), "no", "such", "dir.yaml"), "save")
	if r.code != exitFailure {
		t.Errorf("save into a missing folder: exit %d, want %d\n%s", r.code, exitFailure, r.stderr)
	}
}
