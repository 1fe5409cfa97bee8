package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// kubeletDir lays out dir the way the kubelet mounts a ConfigMap:
//
//	egress-snat.yaml -> ..data/egress-snat.yaml
//	..data -> ..2026_12_01_00_00_00.<n>
//	..2026_12_01_00_00_00.<n>/egress-snat.yaml
type kubeletDir struct {
	t   *testing.T
	dir string
	gen int
}

func newKubeletDir(t *testing.T, content string) *kubeletDir {
	k := &kubeletDir{t: t, dir: t.TempDir()}
	data := k.writeGeneration(content)
	k.must(os.Symlink(data, filepath.Join(k.dir, "..data")))
	k.must(os.Symlink(filepath.Join("..data", "egress-snat.yaml"), k.path()))
	return k
}

func (k *kubeletDir) path() string { return filepath.Join(k.dir, "egress-snat.yaml") }

func (k *kubeletDir) must(err error) {
	k.t.Helper()
	if err != nil {
		k.t.Fatal(err)
	}
}

// writeGeneration writes a new timestamped directory and returns its name.
func (k *kubeletDir) writeGeneration(content string) string {
	k.t.Helper()
	k.gen++
	name := fmt.Sprintf("..2026_12_01_00_00_00.%d", k.gen)
	k.must(os.Mkdir(filepath.Join(k.dir, name), 0o755))
	k.must(os.WriteFile(filepath.Join(k.dir, name, "egress-snat.yaml"), []byte(content), 0o644))
	return name
}

// swap replaces the contents as the kubelet does: a new directory, a
// ..data_tmp symlink to it renamed over ..data (atomic), the old directory
// removed.
func (k *kubeletDir) swap(content string) {
	k.t.Helper()
	old, err := os.Readlink(filepath.Join(k.dir, "..data"))
	k.must(err)
	data := k.writeGeneration(content)
	k.must(os.Symlink(data, filepath.Join(k.dir, "..data_tmp")))
	k.must(os.Rename(filepath.Join(k.dir, "..data_tmp"), filepath.Join(k.dir, "..data")))
	k.must(os.RemoveAll(filepath.Join(k.dir, old)))
}

// waitSeen polls the far side until new connections to dst arrive from
// want, at most limit, and returns how long that took.
func waitSeen(t *testing.T, l *lab.Lab, dst, want string, limit time.Duration) (time.Duration, bool) {
	t.Helper()
	start := time.Now()
	for {
		if l.SourceSeen(t, dst) == want {
			return time.Since(start), true
		}
		if time.Since(start) > limit {
			return time.Since(start), false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestWatchFollowsConfigMapSwap runs watch -f on a file mounted the way the
// kubelet mounts a ConfigMap and swaps its ..data symlink, as a ConfigMap
// update does, with no signal sent: the new state must be applied within
// 2s. Then the same for a file renamed over it and for a rewrite in place.
func TestWatchFollowsConfigMapSwap(t *testing.T) {
	l := newLab(t)
	const dst = "198.51.100.4"
	k := newKubeletDir(t, "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	w := relStartWatch(t, l, k.path())
	wantSeen(t, l, map[string]string{dst: "192.0.2.22"})

	k.swap("rules:\n  - to: 192.0.2.23\n    dst: [198.51.100.4]\n")
	took, ok := waitSeen(t, l, dst, "192.0.2.23", 2*time.Second)
	if !ok {
		t.Fatalf("after the ..data swap: far side still does not see 192.0.2.23 after %s\nlog:\n%s", took, w.p.stderr.String())
	}
	t.Logf("..data swap applied after %s", took.Round(time.Millisecond))

	// A swap that changes nothing the file says is no reload's worth of
	// writes: the rules stay.
	before := l.Ruleset(t)
	k.swap("rules:\n  - to: 192.0.2.23\n    dst: [198.51.100.4]\n")
	time.Sleep(500 * time.Millisecond)
	if after := l.Ruleset(t); after != before {
		t.Errorf("a swap to identical contents changed the rules")
	}

	// An editor or Ansible writes a temporary file and renames it over the
	// old one (here over the symlink, leaving a plain file); then a rewrite
	// in place.
	tmp := relWrite(t, k.dir, ".egress-snat.yaml.tmp", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	if err := os.Rename(tmp, k.path()); err != nil {
		t.Fatal(err)
	}
	if took, ok := waitSeen(t, l, dst, "192.0.2.22", 2*time.Second); !ok {
		t.Fatalf("after renaming a new file over %s: not applied after %s\nlog:\n%s", k.path(), took, w.p.stderr.String())
	}
	relWrite(t, k.dir, "egress-snat.yaml", "rules:\n  - to: 192.0.2.23\n    dst: [198.51.100.4]\n")
	if took, ok := waitSeen(t, l, dst, "192.0.2.23", 2*time.Second); !ok {
		t.Fatalf("after rewriting %s in place: not applied after %s\nlog:\n%s", k.path(), took, w.p.stderr.String())
	}
}
