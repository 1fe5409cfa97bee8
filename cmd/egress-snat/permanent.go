package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/permanent"
	"github.com/egress-snat/egress-snat/snat"
)

// Runtime and permanent state, as firewalld has them: the kernel's rules are
// the runtime state; the permanent file (--config) is what `watch` brings
// back at boot. set, unset, rotate and clear change the runtime state, and
// with --permanent the file too, in one step.

// defaultConfig is the permanent desired-state file: what `watch` with no
// -f follows at boot, what --permanent edits and `save` writes.
const defaultConfig = "/etc/egress-snat.yaml"

// configFlag is the global --config.
var configFlag = &cli.StringFlag{
	Name:      "config",
	Value:     defaultConfig,
	EnvVars:   []string{"EGRESS_SNAT_CONFIG"},
	TakesFile: true,
	Usage:     "the permanent desired-state `PATH` (the format of apply -f): edited by --permanent and save, followed by watch and compared by check when they have no -f",
}

// permanentFlag is --permanent of set, unset, rotate and clear.
var permanentFlag = &cli.BoolFlag{
	Name:  "permanent",
	Usage: "also change the permanent file (--config) in the same step, so that the change survives a reboot; if the file cannot be read or written, nothing changes",
}

// configPath is the permanent file of this run.
func configPath(c *cli.Context) string {
	if p := c.String("config"); p != "" {
		return p
	}
	return defaultConfig
}

// permanentFile is the permanent file when it exists, else "".
func permanentFile(c *cli.Context) (string, error) {
	path := configPath(c)
	switch _, err := os.Stat(path); {
	case err == nil:
		return path, nil
	case errors.Is(err, fs.ErrNotExist):
		return "", nil
	default:
		return "", fmt.Errorf("permanent file: %w", err)
	}
}

// update is the write path of set, unset, rotate and clear: e.mgr.Update,
// and with --permanent also the permanent file, edited by edit, in the same
// step and under the same lock (permanent.Update). With --dry-run the file
// is checked and edited but not written.
func update(c *cli.Context, e *env, desired func(*snat.State) ([]snat.Entry, error), edit func(*config.Doc)) (*snat.State, snat.Plan, error) {
	r := snat.Request{LockTimeout: e.lockTimeout, DryRun: c.Bool("dry-run"), Desired: desired}
	if !c.Bool("permanent") {
		return e.mgr.Update(r)
	}
	return permanent.Update(e.mgr, r, configPath(c), edit)
}
