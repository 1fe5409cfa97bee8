package pending

import (
	"fmt"
	"time"

	"github.com/egress-snat/egress-snat/snat"
)

// revertAttempts bounds how long a reverter keeps trying when the host
// refuses (another run holding the lock past the lock timeout, say): about
// a minute, then it gives up and leaves the error in the record.
const revertAttempts = 30

// RefusedError is an apply refused because an apply --confirm is pending:
// its revert would undo it. Nothing was changed.
type RefusedError struct{ Record *Record }

func (e *RefusedError) Error() string {
	rec := e.Record
	if Alive(rec) {
		return fmt.Sprintf("an apply --confirm is pending until %s (reverter pid %d): run \"egress-snat confirm\" to keep it, or wait for the revert; nothing changed",
			rec.Deadline.Format(time.RFC3339), rec.PID)
	}
	msg := "a pending apply --confirm record has no reverter running (was it killed?), so the host keeps that apply's state"
	if rec.RevertError != "" {
		msg = "the revert of a pending apply --confirm failed (" + rec.RevertError + "), so the host keeps that apply's state"
	}
	return msg + `: run "egress-snat confirm" to accept it and clear the record; nothing changed`
}

// Apply is an apply that reverts itself unless it is confirmed.
type Apply struct {
	// Desired returns the desired entries given what is installed, under
	// the run lock (snat.Request.Desired).
	Desired func(*snat.State) ([]snat.Entry, error)
	// Timeout is how long after the write the revert comes.
	Timeout     time.Duration
	LockTimeout time.Duration
	// Reverter is the command line of the detached reverter for a
	// record's token: this binary in the mode that runs Store.Revert,
	// writing where the apply writes.
	Reverter func(token string) []string
}

// Apply writes what a.Desired returns through m, and leaves a detached
// reverter that restores the entries installed before at the deadline,
// unless Confirm removes the record first. The record is saved and the
// reverter started before the write, so a killed apply is reverted too; a
// write that fails removes them again. A write that changes nothing leaves
// no record (rec is nil). While a record exists, Apply is refused
// (*RefusedError) with nothing changed.
func (s Store) Apply(m *snat.Manager, a Apply) (plan snat.Plan, rec *Record, err error) {
	unlock, err := s.Lock(a.LockTimeout)
	if err != nil {
		return snat.Plan{}, nil, err
	}
	defer unlock()
	if old, err := s.Load(); err != nil {
		return snat.Plan{}, nil, err
	} else if old != nil {
		return snat.Plan{}, nil, &RefusedError{Record: old}
	}
	_, plan, err = m.Update(snat.Request{LockTimeout: a.LockTimeout, Desired: func(st *snat.State) ([]snat.Entry, error) {
		desired, err := a.Desired(st)
		if err != nil || m.MakePlan(st, desired).Empty() {
			return desired, err // nothing will change: nothing to revert
		}
		prev, err := encodeEntries(st.Entries())
		if err != nil {
			return nil, err
		}
		now := time.Now()
		rec = &Record{Token: NewToken(), Applied: now, Deadline: now.Add(a.Timeout), Previous: prev}
		// The record is written, and the reverter started, before the
		// write: from here on a killed apply is reverted too.
		if err := s.Save(rec); err != nil {
			return nil, err
		}
		if rec.PID, err = Spawn(a.Reverter(rec.Token)); err == nil {
			err = s.Save(rec)
		}
		if err != nil {
			Stop(rec)
			s.Remove()
			rec = nil
			return nil, err
		}
		return desired, nil
	}})
	if err != nil {
		if rec != nil { // the write failed: the host is as it was
			Stop(rec)
			s.Remove()
		}
		return plan, nil, err
	}
	return plan, rec, nil
}

// Refuse returns a *RefusedError while an apply --confirm is pending: the
// revert would undo a plain apply.
func (s Store) Refuse(lockTimeout time.Duration) error {
	unlock, err := s.Lock(lockTimeout)
	if err != nil {
		return err
	}
	defer unlock()
	rec, err := s.Load()
	if err != nil || rec == nil {
		return err
	}
	return &RefusedError{Record: rec}
}

// Confirm keeps the state of a pending apply: it removes the record and
// stops its reverter. It returns the record it confirmed (nil when nothing
// was pending) and whether its reverter was still running.
func (s Store) Confirm(lockTimeout time.Duration) (rec *Record, running bool, err error) {
	unlock, err := s.Lock(lockTimeout)
	if err != nil {
		return nil, false, err
	}
	defer unlock()
	rec, err = s.Load()
	if err != nil || rec == nil {
		return nil, false, err
	}
	if err := s.Remove(); err != nil {
		return nil, false, err
	}
	running = Alive(rec)
	if err := Stop(rec); err != nil {
		return nil, false, err
	}
	return rec, running, nil
}

// Revert is the detached reverter's work: it waits for the deadline of
// the record with token, then restores the record's previous entries with
// restore and removes the record. While the host refuses it tries again
// every second, about a minute in all, keeping the last error in the
// record. A record confirmed or replaced meanwhile is left alone.
func (s Store) Revert(token string, lockTimeout time.Duration, restore func([]snat.Entry) error) error {
	rec, err := s.Load()
	if err != nil || rec == nil || rec.Token != token {
		return err
	}
	time.Sleep(time.Until(rec.Deadline))
	for range revertAttempts {
		done, err := s.revertOnce(token, lockTimeout, restore)
		if done {
			return err
		}
		time.Sleep(time.Second)
	}
	return nil
}

// revertOnce restores the record's previous entries if the record is
// still this reverter's. done is false when it should try again.
func (s Store) revertOnce(token string, lockTimeout time.Duration, restore func([]snat.Entry) error) (done bool, err error) {
	unlock, err := s.Lock(lockTimeout)
	if err != nil {
		return false, err
	}
	defer unlock()
	rec, err := s.Load()
	if err != nil || rec == nil || rec.Token != token {
		return true, err // confirmed, or replaced
	}
	prev, err := decodeEntries(rec.Previous)
	if err == nil {
		err = restore(prev)
	}
	if err != nil {
		rec.RevertError = err.Error()
		s.Save(rec)
		return false, err
	}
	return true, s.Remove()
}
