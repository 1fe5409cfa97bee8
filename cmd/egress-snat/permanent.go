package main

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
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
// step and under the same lock, so that a concurrent --permanent run never
// loses this change in the kernel or the file:
//
//  1. under the lock, after desired: the file is read (a file that cannot
//     be parsed is bad input), edited, checked and written to a temporary
//     file next to it; any failure here changes nothing at all;
//  2. the kernel is written; if that fails, the temporary file is removed
//     and the file stays as it was;
//  3. the temporary file replaces the file; if that fails, the kernel is
//     put back as it was.
//
// edit runs after desired, so it can use what desired found (rotate's
// moves). With --dry-run the file is checked and edited but not written.
func update(c *cli.Context, e *env, desired func(*snat.State) ([]snat.Entry, error), edit func(*config.Doc)) (*snat.State, snat.Plan, error) {
	if !c.Bool("permanent") {
		return e.mgr.Update(snat.Request{LockTimeout: e.lockTimeout, DryRun: c.Bool("dry-run"), Desired: desired})
	}
	path := configPath(c)
	var pending *config.Pending
	defer func() { pending.Abort() }() // nothing once committed
	prepare := func(st *snat.State) ([]snat.Entry, error) {
		want, err := desired(st)
		if err != nil {
			return nil, err
		}
		doc, err := config.OpenDoc(path)
		if err != nil {
			return nil, &snat.InvalidError{Err: fmt.Errorf("--permanent: %w", err)}
		}
		edit(doc)
		if pending, err = doc.Prepare(); err != nil {
			return nil, fmt.Errorf("--permanent: %w; nothing was changed", err)
		}
		return want, nil
	}
	return e.mgr.Update(snat.Request{LockTimeout: e.lockTimeout, DryRun: c.Bool("dry-run"), Desired: prepare, Then: func(snat.Plan) error {
		return pending.Commit()
	}})
}

// specOf is the file rule that reproduces an installed entry through
// apply -f: its destination, its match, and its sources (spread when there
// are several: a failover list is installed as the one address in use). An
// entry that keeps the natural source names it as its source, which apply
// turns back into a kept natural source. A routed entry is a rule with
// method: route (and its via). ok is false for an entry the file cannot
// state: one keeping the source of forwarded traffic, which has no natural
// source to name.
func specOf(e snat.Entry) (s config.Spec, ok bool) {
	to := e.To
	if e.Keep() {
		if !e.Natural.IsValid() {
			return s, false
		}
		to = []netip.Addr{e.Natural}
	}
	s = config.Spec{
		Match:  config.Match{Sender: e.Sender, Out: e.Out},
		Dst:    []netip.Prefix{e.Dst},
		To:     to,
		Spread: len(to) > 1,
		Via:    e.Via,
	}
	if e.Routed {
		s.Method = snat.MethodRoute
	}
	return s, true
}

// intentSpec is the file rule of an intent, as the operator gave it (no
// resolved interface unless --out was given).
func intentSpec(in snat.Intent) config.Spec {
	return config.Spec{Match: config.Match{Sender: in.Sender, Out: in.Out}, Dst: []netip.Prefix{in.Dst},
		To: in.To, Spread: in.Spread, Via: in.Via, Method: in.Method}
}

// putIntents is set's edit of the permanent file.
func putIntents(intents []snat.Intent) func(*config.Doc) {
	return func(d *config.Doc) {
		for _, in := range intents {
			d.Put(intentSpec(in))
		}
	}
}

// clearDoc is clear's edit.
func clearDoc(d *config.Doc) { d.Clear() }

// rotateDoc is rotate's edit: each rule of a moved sender and destination
// gets the address it moved to, so that a reboot does not undo the
// rotation; one the file does not name yet gets a rule of its own.
func rotateDoc(moves *[]snat.Move) func(*config.Doc) {
	return func(d *config.Doc) {
		for _, m := range *moves {
			if !d.ReplaceSource(m.Match.Sender, m.Match.Dst, m.To) {
				d.Put(config.Spec{Match: config.Match{Sender: m.Match.Sender}, Dst: []netip.Prefix{m.Match.Dst}, To: []netip.Addr{m.To}})
			}
		}
	}
}
