package main

import (
	"fmt"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/pending"
	"github.com/egress-snat/egress-snat/snat"
)

var confirmFlag = &cli.DurationFlag{Name: "confirm", Usage: "revert to the previous state after `DURATION` unless \"egress-snat confirm\" runs first"}

func pendingStore() pending.Store { return pending.Store{Dir: snat.LockDir} }

// applyConfirmed applies intents and leaves a detached reverter that
// restores the previous entries at the deadline unless confirm removes the
// record first (pending.Store.Apply). A second apply --confirm, or one
// while a record exists, is refused (exit 1) with nothing changed.
func applyConfirmed(c *cli.Context, e *env, intents []snat.Intent, timeout time.Duration) error {
	if timeout <= 0 {
		return usageError("--confirm %s: want a positive duration such as 60s", timeout)
	}
	plan, rec, err := pendingStore().Apply(e.mgr, pending.Apply{
		Desired:     func(*snat.State) ([]snat.Entry, error) { return snat.Resolve(e.sel, intents) },
		Timeout:     timeout,
		LockTimeout: e.lockTimeout,
		Reverter:    func(token string) []string { return reverterArgv(e, token) },
	})
	if err != nil {
		return err
	}
	var notes []string
	if rec != nil {
		notes = append(notes, fmt.Sprintf("pending: reverts to the previous state at %s (in %s) unless \"egress-snat confirm\" runs before", rec.Deadline.Format(time.RFC3339), timeout))
	}
	return reportPlan(c, e.out, plan, notes)
}

// refusePending stops a plain apply while an apply --confirm is pending:
// the revert would undo it. A dry run only reads, so it goes ahead.
func refusePending(c *cli.Context, e *env) error {
	if c.Bool("dry-run") || e.nl == nil { // a test's fakes have no /run record
		return nil
	}
	return pendingStore().Refuse(e.lockTimeout)
}

// reverterArgv re-executes this binary in its hidden revert mode, with the
// backend this run resolved so the reverter writes where apply wrote.
func reverterArgv(e *env, token string) []string {
	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	return []string{exe, "--backend", e.backendName(), "--lock-timeout", e.lockTimeout.String(), revertCommand.Name, "--token", token}
}

var confirmCommand = &cli.Command{
	Name:      "confirm",
	Usage:     "keep the state of a pending \"apply --confirm\" (exit 0 also when nothing is pending)",
	UsageText: "egress-snat confirm",
	Description: `"egress-snat apply -f FILE --confirm 60s" applies FILE, then restores the
previous state after 60s unless this command runs first: a change that cuts
off the SSH session it was made from undoes itself. The revert is made by a
detached process of its own session, so it happens even when the shell that
ran apply hangs up or is killed. Its record is in /run/egress-snat
(volatile, root only), one per network namespace.

While an apply is pending, another apply is refused (exit 1); confirm
first. Other commands (set, unset, rotate, watch) are not held
back, but the revert restores the entries as they were before the apply.`,
	Action: func(c *cli.Context) error {
		rec, running, err := pendingStore().Confirm(c.Duration("lock-timeout"))
		if err != nil {
			return err
		}
		if rec == nil {
			fmt.Fprintln(c.App.Writer, "nothing pending: no apply --confirm is waiting in this network namespace")
			return nil
		}
		switch {
		case rec.RevertError != "":
			fmt.Fprintf(c.App.Writer, "confirmed: the state applied at %s stays (its revert had failed: %s)\n", rec.Applied.Format(time.RFC3339), rec.RevertError)
		case !running:
			fmt.Fprintf(c.App.Writer, "confirmed: the state applied at %s stays (its reverter was no longer running)\n", rec.Applied.Format(time.RFC3339))
		default:
			fmt.Fprintf(c.App.Writer, "confirmed: the state applied at %s stays\n", rec.Applied.Format(time.RFC3339))
		}
		return nil
	},
}

// revertCommand is the detached reverter apply --confirm starts.
var revertCommand = &cli.Command{
	Name:   "__revert",
	Hidden: true,
	Flags:  []cli.Flag{&cli.StringFlag{Name: "token"}},
	Action: func(c *cli.Context) error {
		return pendingStore().Revert(c.String("token"), c.Duration("lock-timeout"), func(prev []snat.Entry) error {
			e, err := envFor(c)
			if err != nil {
				return err
			}
			_, _, err = e.mgr.Update(snat.Request{LockTimeout: e.lockTimeout, Desired: func(*snat.State) ([]snat.Entry, error) { return prev, nil }})
			return err
		})
	},
}
