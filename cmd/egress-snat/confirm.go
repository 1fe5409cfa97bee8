package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/pending"
	"github.com/egress-snat/egress-snat/snat"
)

// revertAttempts bounds how long a reverter keeps trying when the host
// refuses (another run holding the lock past --lock-timeout, say): about a
// minute, then it gives up and leaves the error in the record.
const revertAttempts = 30

var confirmFlag = &cli.DurationFlag{Name: "confirm", Usage: "revert to the previous state after `DURATION` unless \"egress-snat confirm\" runs first"}

func pendingStore() pending.Store { return pending.Store{Dir: snat.LockDir} }

// applyConfirmed applies intents and leaves a detached reverter that
// restores the previous entries at the deadline unless confirm removes the
// record first. A second apply --confirm, or one while a record exists, is
// refused (exit 1) with nothing changed.
func applyConfirmed(c *cli.Context, e *env, intents []snat.Intent, timeout time.Duration) error {
	if timeout <= 0 {
		return usageError("--confirm %s: want a positive duration such as 60s", timeout)
	}
	store := pendingStore()
	unlock, err := store.Lock(e.lockTimeout)
	if err != nil {
		return err
	}
	defer unlock()
	if rec, err := store.Load(); err != nil {
		return err
	} else if rec != nil {
		return cli.Exit(pendingRefusal(rec), exitFailure)
	}
	var rec *pending.Record
	_, plan, err := e.mgr.Update(snat.Request{LockTimeout: e.lockTimeout, Desired: func(st *snat.State) ([]snat.Entry, error) {
		desired, err := snat.Resolve(e.sel, intents)
		if err != nil || e.mgr.MakePlan(st, desired).Empty() {
			return desired, err // nothing will change: nothing to revert
		}
		prev, err := encodeEntries(st.Entries())
		if err != nil {
			return nil, err
		}
		now := time.Now()
		rec = &pending.Record{Token: pending.NewToken(), Applied: now, Deadline: now.Add(timeout), Previous: prev}
		// The record is written, and the reverter started, before the
		// write: from here on a killed apply is reverted too.
		if err := store.Save(rec); err != nil {
			return nil, err
		}
		if rec.PID, err = pending.Spawn(reverterArgv(c, e, rec.Token)); err == nil {
			err = store.Save(rec)
		}
		if err != nil {
			pending.Stop(rec)
			store.Remove()
			rec = nil
			return nil, err
		}
		return desired, nil
	}})
	if err != nil {
		if rec != nil { // the write failed: the host is as it was
			pending.Stop(rec)
			store.Remove()
		}
		return err
	}
	var notes []string
	if rec != nil {
		notes = append(notes, fmt.Sprintf("pending: reverts to the previous state at %s (in %s) unless \"egress-snat confirm\" runs before", rec.Deadline.Format(time.RFC3339), timeout))
	}
	return reportPlan(c, e.out, plan, notes)
}

func pendingRefusal(rec *pending.Record) string {
	if pending.Alive(rec) {
		return fmt.Sprintf("an apply --confirm is pending until %s (reverter pid %d): run \"egress-snat confirm\" to keep it, or wait for the revert; nothing changed",
			rec.Deadline.Format(time.RFC3339), rec.PID)
	}
	msg := "a pending apply --confirm record has no reverter running (was it killed?), so the host keeps that apply's state"
	if rec.RevertError != "" {
		msg = "the revert of a pending apply --confirm failed (" + rec.RevertError + "), so the host keeps that apply's state"
	}
	return msg + `: run "egress-snat confirm" to accept it and clear the record; nothing changed`
}

// refusePending stops a plain apply while an apply --confirm is pending:
// the revert would undo it. A dry run only reads, so it goes ahead.
func refusePending(c *cli.Context, e *env) error {
	if c.Bool("dry-run") || e.nl == nil { // a test's fakes have no /run record
		return nil
	}
	store := pendingStore()
	unlock, err := store.Lock(e.lockTimeout)
	if err != nil {
		return err
	}
	defer unlock()
	rec, err := store.Load()
	if err != nil || rec == nil {
		return err
	}
	return cli.Exit(pendingRefusal(rec), exitFailure)
}

// reverterArgv re-executes this binary in its hidden revert mode, with the
// backend this run resolved so the reverter writes where apply wrote.
func reverterArgv(c *cli.Context, e *env, token string) []string {
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
		store := pendingStore()
		unlock, err := store.Lock(c.Duration("lock-timeout"))
		if err != nil {
			return err
		}
		defer unlock()
		rec, err := store.Load()
		if err != nil {
			return err
		}
		if rec == nil {
			fmt.Fprintln(c.App.Writer, "nothing pending: no apply --confirm is waiting in this network namespace")
			return nil
		}
		if err := store.Remove(); err != nil {
			return err
		}
		running := pending.Alive(rec)
		if err := pending.Stop(rec); err != nil {
			return err
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
		token := c.String("token")
		store := pendingStore()
		rec, err := store.Load()
		if err != nil || rec == nil || rec.Token != token {
			return err
		}
		time.Sleep(time.Until(rec.Deadline))
		for range revertAttempts {
			done, err := revertOnce(c, store, token)
			if done {
				return err
			}
			time.Sleep(time.Second)
		}
		return nil
	},
}

// revertOnce restores the record's previous entries if the record is
// still this reverter's. done is false when it should try again.
func revertOnce(c *cli.Context, store pending.Store, token string) (done bool, err error) {
	unlock, err := store.Lock(c.Duration("lock-timeout"))
	if err != nil {
		return false, err
	}
	defer unlock()
	rec, err := store.Load()
	if err != nil || rec == nil || rec.Token != token {
		return true, err // confirmed, or replaced
	}
	prev, err := decodeEntries(rec.Previous)
	if err == nil {
		var e *env
		if e, err = envFor(c); err == nil {
			_, _, err = e.mgr.Update(snat.Request{LockTimeout: e.lockTimeout, Desired: func(*snat.State) ([]snat.Entry, error) { return prev, nil }})
		}
	}
	if err != nil {
		rec.RevertError = err.Error()
		store.Save(rec)
		return false, err
	}
	return true, store.Remove()
}

// savedEntry is an snat.Entry as the pending record keeps it: every field,
// so that the revert re-plans exactly the entries that were installed
// (Entry's own JSON is for people and scripts and leaves some out).
type savedEntry struct {
	Sender  snat.SenderKind `json:"sender"`
	From    netip.Prefix    `json:"from,omitzero"`
	UID     uint32          `json:"uid,omitempty"`
	Cgroup  string          `json:"cgroup,omitempty"`
	Dst     netip.Prefix    `json:"dst"`
	Out     string          `json:"out"`
	Natural netip.Addr      `json:"natural,omitzero"`
	To      []netip.Addr    `json:"to,omitempty"`
	Routed  bool            `json:"routed,omitempty"`
	Via     netip.Addr      `json:"via,omitzero"`
	Replies bool            `json:"replies,omitempty"`
	Marked  bool            `json:"marked,omitempty"`
}

func encodeEntries(es []snat.Entry) ([]byte, error) {
	saved := make([]savedEntry, 0, len(es))
	for _, e := range es {
		saved = append(saved, savedEntry{
			Sender: e.Sender.Kind, From: e.Sender.From, UID: e.Sender.UID, Cgroup: e.Sender.Cgroup,
			Dst: e.Dst, Out: e.Out, Natural: e.Natural, To: e.To,
			Routed: e.Routed, Via: e.Via, Replies: e.Replies, Marked: e.Marked,
		})
	}
	return json.Marshal(saved)
}

func decodeEntries(b []byte) ([]snat.Entry, error) {
	var saved []savedEntry
	if err := json.Unmarshal(b, &saved); err != nil {
		return nil, fmt.Errorf("reading the pending record's entries: %w", err)
	}
	out := make([]snat.Entry, 0, len(saved))
	for _, s := range saved {
		out = append(out, snat.Entry{
			Match:   snat.Match{Sender: snat.Sender{Kind: s.Sender, From: s.From, UID: s.UID, Cgroup: s.Cgroup}, Dst: s.Dst, Out: s.Out},
			Natural: s.Natural, To: s.To,
			Routed: s.Routed, Via: s.Via, Replies: s.Replies, Marked: s.Marked,
		})
	}
	return out, nil
}
