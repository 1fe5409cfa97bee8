package config

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A dst-file is read again when it changed, whatever its size, and is
// kept only once it settled.
func TestDstFileCache(t *testing.T) {
	saved := dstFiles
	t.Cleanup(func() { dstFiles = saved })
	dstFiles = &dstCache{max: 3, settle: time.Second}
	path := filepath.Join(t.TempDir(), "dst.txt")
	write := func(body string, age time.Duration) {
		t.Helper()
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-age)
		if err := os.Chtimes(path, old, old); err != nil {
			t.Fatal(err)
		}
	}
	read := func() string {
		t.Helper()
		ps, err := readDstFile(path)
		if err != nil || len(ps) != 1 {
			t.Fatalf("readDstFile: %v %v", ps, err)
		}
		return ps[0].String()
	}
	// Just written (its change time is now): never kept, so a second
	// write of the same size in the same clock tick is read.
	write("198.51.100.1\n", 0)
	if got := read(); got != "198.51.100.1/32" {
		t.Fatalf("got %s", got)
	}
	if len(dstFiles.kept) != 0 {
		t.Fatalf("a file changed just now was kept: %+v", dstFiles.kept)
	}
	write("198.51.100.2\n", 0)
	if got := read(); got != "198.51.100.2/32" {
		t.Fatalf("same size, same tick: got %s, want the new content", got)
	}
	// Settled (chtimes moves the change time to now, so settle is 0
	// here, as if a second had passed): kept, and given again.
	dstFiles.settle = 0
	read()
	if len(dstFiles.kept) != 1 {
		t.Fatalf("a settled file was not kept")
	}
	kept := dstFiles.kept[0].dsts
	if ps, _ := readDstFile(path); &ps[0] != &kept[0] {
		t.Fatalf("an unchanged file was read again")
	}
	// Changed after it was kept: read again.
	write("198.51.100.3\n", time.Hour)
	if got := read(); got != "198.51.100.3/32" {
		t.Fatalf("after a change: got %s", got)
	}
}
