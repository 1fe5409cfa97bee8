package main

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestDocsUpToDate regenerates the man page and the completions in memory
// and compares them with the committed copies, so a CLI change cannot ship
// with stale docs.
func TestDocsUpToDate(t *testing.T) {
	files, err := renderDocs()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		committed, err := os.ReadFile(filepath.Join("..", "..", name))
		if err != nil {
			t.Errorf("%s: %v: run make docs", name, err)
			continue
		}
		if d := cmp.Diff(string(committed), files[name]); d != "" {
			t.Errorf("%s is out of date with the CLI: run make docs (-committed +generated):\n%s", name, d)
		}
	}
}

// TestDocsDeterministic: two renders are identical, so make docs is
// re-runnable without spurious diffs.
func TestDocsDeterministic(t *testing.T) {
	a, err := renderDocs()
	if err != nil {
		t.Fatal(err)
	}
	b, err := renderDocs()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(a, b); d != "" {
		t.Errorf("two renders differ:\n%s", d)
	}
}
