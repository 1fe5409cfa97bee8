package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestWatchHealthFile: no file until the first reconcile (and none left
// from an earlier run), then "ready" or "not ready: WHY" after each, and
// its time refreshed by the loop's beats; a nil one does nothing.
func TestWatchHealthFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "health")
	if err := os.WriteFile(path, []byte("ready\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := newWatchHealth(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err == nil {
		t.Error("a health file left by an earlier run is still there")
	}
	h.beat()
	if _, err := os.Stat(path); err == nil {
		t.Error("a beat before the first reconcile made the file")
	}
	read := func() string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	h.reconciled(nil)
	if got := read(); got != "ready\n" {
		t.Errorf("after a reconcile: %q, want ready", got)
	}
	h.reconciled(errors.New("another egress-snat run is holding the lock\nsecond line"))
	if got := read(); got != "not ready: another egress-snat run is holding the lock\\nsecond line\n" {
		t.Errorf("after a failed reconcile: %q", got)
	}
	old := time.Now().Add(-time.Minute)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
	h.touched = old
	h.beat()
	if st, _ := os.Stat(path); time.Since(st.ModTime()) > 10*time.Second {
		t.Errorf("a beat left the file's time %s old", time.Since(st.ModTime()))
	}
	var none *watchHealth
	none.beat()
	none.reconciled(nil)
}

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
