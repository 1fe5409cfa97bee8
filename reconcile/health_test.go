package reconcile

import (
	"errors"
	"os"
	"path/filepath"
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
	h, err := newHealthFile(path)
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
	var none *healthFile
	none.beat()
	none.reconciled(nil)
}
