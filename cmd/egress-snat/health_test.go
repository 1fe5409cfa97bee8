package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestHealthCommand: health says alive, ready or why not, exit 0 or 1; a
// missing --file is bad input.
func TestHealthCommand(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "health")
	if code, msg := runRefused(t, "health"); code != exitUsage || !strings.Contains(msg, "--file is required") {
		t.Errorf("health without --file: exit %d, %q", code, msg)
	}
	if code, msg := runRefused(t, "health", "--file", path); code != exitFailure || !strings.Contains(msg, "not alive: no "+path) {
		t.Errorf("health without the file: exit %d, %q", code, msg)
	}
	if err := os.WriteFile(path, []byte("not ready: the kernel said no\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, msg := runRefused(t, "health", "--file", path); code != 0 || !strings.Contains(msg, "alive, not ready") {
		t.Errorf("health of a live watch that cannot apply: exit %d, %q; want alive", code, msg)
	}
	if code, msg := runRefused(t, "health", "--file", path, "--ready"); code != exitFailure || !strings.Contains(msg, "the kernel said no") {
		t.Errorf("health --ready of a watch that cannot apply: exit %d, %q; want exit 1 saying why", code, msg)
	}
	old := time.Now().Add(-time.Minute)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
	if code, msg := runRefused(t, "health", "--file", path, "--max-age", "30s"); code != exitFailure || !strings.Contains(msg, "last turned 1m0s ago") {
		t.Errorf("health of a stale file: exit %d, %q", code, msg)
	}
}
