package reconcile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/egress-snat/egress-snat/config"
)

// healthFile is what the daemon tells its probes (watch --health-file):
// the file's modification time is the last turn of its event loop
// (refreshed at most once a second), and its first line says whether its
// last reconcile succeeded: "ready", or "not ready: WHY". The file appears
// when the first reconcile has ended. The methods of a nil *healthFile do
// nothing (watch without --health-file).
//
// What a probe should make of it (deploy/kubernetes/daemonset.yaml):
// liveness is a fresh file, so a restart happens only when the loop is
// stuck, never for drift (which watch repairs, and a restart would not) or
// for a rule left out while its address is missing; readiness is a fresh
// "ready", so a rollout stops at a node where the new pod cannot apply.
type healthFile struct {
	path    string
	status  string // the content last written; "" before the first reconcile
	touched time.Time
}

// healthBeatEvery bounds how often the file's time is refreshed.
const healthBeatEvery = time.Second

// newHealthFile removes a file left by an earlier run (a container that
// restarted keeps its emptyDir), so a probe waits for this run's first
// reconcile.
func newHealthFile(path string) (*healthFile, error) {
	if path == "" {
		return nil, nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("--health-file %s: %w", path, err)
	}
	return &healthFile{path: path}, nil
}

// reconciled records the outcome of a reconcile.
func (h *healthFile) reconciled(err error) {
	if h == nil {
		return
	}
	status := "ready"
	if err != nil {
		status = "not ready: " + config.OneLine(err.Error())
	}
	if status == h.status {
		h.beat()
		return
	}
	tmp := h.path + ".tmp"
	if werr := os.WriteFile(tmp, []byte(status+"\n"), 0o644); werr != nil {
		return // the probes see a stale file, which is what it is
	}
	if os.Rename(tmp, h.path) == nil {
		h.status, h.touched = status, time.Now()
	}
}

// beat refreshes the file's time: the loop turned.
func (h *healthFile) beat() {
	if h == nil || h.status == "" {
		return
	}
	if now := time.Now(); now.Sub(h.touched) >= healthBeatEvery {
		if os.Chtimes(h.path, now, now) == nil {
			h.touched = now
		}
	}
}
