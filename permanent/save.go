package permanent

import (
	"time"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// Save makes the permanent file path state the rules installed now, so
// that apply -f of it, or watch at boot, reproduces exactly them: the
// file's rules are replaced, its other comments stay, and it is written
// atomically keeping its mode. It runs under the lock, so that a
// concurrent --permanent change lands before or after it, not in between.
// A file that exists but cannot be read as a desired-state file is bad
// input, and is not overwritten. With dryRun nothing is written.
//
// It returns the file it wrote (or would write), the number of installed
// entries, and those the file cannot state (see SpecOf), which it leaves
// out; those are returned on error too.
func Save(m *snat.Manager, path string, lockTimeout time.Duration, dryRun bool) (b []byte, entries int, unsaved []snat.Entry, err error) {
	var locker snat.Locker = snat.FileLock{}
	if m.Locker != nil {
		locker = m.Locker
	}
	unlock, err := locker.Lock(lockTimeout)
	if err != nil {
		return nil, 0, nil, err
	}
	defer unlock()
	st, err := m.Read()
	if err != nil {
		return nil, 0, nil, err
	}
	doc, err := config.OpenDoc(path)
	if err != nil {
		return nil, 0, nil, &snat.InvalidError{Err: err}
	}
	doc.Clear()
	installed := st.Entries()
	for _, en := range installed {
		s, ok := SpecOf(en)
		if !ok {
			unsaved = append(unsaved, en)
			continue
		}
		doc.Put(s)
	}
	if b, err = doc.Bytes(); err != nil {
		return nil, len(installed), unsaved, err
	}
	if dryRun {
		return b, len(installed), unsaved, nil
	}
	if err := doc.Write(); err != nil {
		return b, len(installed), unsaved, err
	}
	return b, len(installed), unsaved, nil
}
