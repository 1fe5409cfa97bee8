// Package permanent keeps the two states of egress-snat in step, as
// firewalld has them: the runtime state is the kernel's rules; the
// permanent state is the desired-state file (--config) that watch brings
// back at boot. It owns the change of both in one step (Update: set,
// unset, rotate and clear with --permanent), the edits those commands make
// of the file (Put, Clear, Rotate), and the file written from the rules
// installed now (Save).
package permanent

import (
	"fmt"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// Update is m.Update(r) that also edits the permanent file path with edit,
// in the same step and under the same lock, so that a concurrent run that
// changes both never loses this change in the kernel or the file:
//
//  1. under the lock, after r.Desired: the file is read (a file that cannot
//     be parsed is bad input), edited, checked and written to a temporary
//     file next to it; any failure here changes nothing at all;
//  2. the kernel is written; if that fails, the temporary file is removed
//     and the file stays as it was;
//  3. the temporary file replaces the file; if that fails, the kernel is
//     put back as it was.
//
// edit runs after r.Desired, so it can use what r.Desired found (rotate's
// moves). With r.DryRun the file is checked and edited but not written.
// r.Then must be nil: Update's is the file's commit.
func Update(m *snat.Manager, r snat.Request, path string, edit func(*config.Doc)) (*snat.State, snat.Plan, error) {
	if r.Then != nil {
		return nil, snat.Plan{}, fmt.Errorf("permanent.Update: the request has a Then of its own")
	}
	var pending *config.Pending
	defer func() { pending.Abort() }() // nothing once committed
	desired := r.Desired
	r.Desired = func(st *snat.State) ([]snat.Entry, error) {
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
	r.Then = func(snat.Plan) error { return pending.Commit() }
	return m.Update(r)
}
