package config

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A long-lived process (watch, and the commands it serves) reads the same
// dst-file for each command that loads the file: at 100,000 lines,
// parsing and sorting it was a fifth of a served check. The destinations
// of the last files read are kept, and given again while the file is the
// same one, unchanged. A file is known by its device and inode, not its
// path: a served command names it relative to the client's directory.
//
// "Unchanged" is its device, inode, size, and modification and change
// times. The kernel stamps those from a clock that moves in ticks of a few
// milliseconds, so two writes of the same size within one tick look alike:
// a file is kept only once its last change is older than settle (as git
// treats an index entry as racy). A change after that gets a later stamp.
var dstFiles = &dstCache{max: 3, settle: time.Second}

type dstCache struct {
	mu     sync.Mutex
	max    int
	settle time.Duration
	kept   []keptDstFile // most recent last
}

type keptDstFile struct {
	id   fileID
	dsts []netip.Prefix
}

// fileID is what says that a file is the one read before, unchanged.
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

func idOf(st *unix.Stat_t) fileID {
	return fileID{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

// get returns the destinations kept for the file id. Callers share the
// slice and do not change it.
func (c *dstCache) get(id fileID) ([]netip.Prefix, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range c.kept {
		if k.id == id {
			return k.dsts, true
		}
	}
	return nil, false
}

// put keeps the destinations read from the file id, unless it changed too
// recently to tell a later change from it.
func (c *dstCache) put(id fileID, dsts []netip.Prefix, now time.Time) {
	changed := time.Unix(id.mtime.Unix())
	if ct := time.Unix(id.ctime.Unix()); ct.After(changed) {
		changed = ct
	}
	if now.Sub(changed) < c.settle {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	kept := c.kept[:0]
	for _, k := range c.kept {
		if k.id.dev != id.dev || k.id.ino != id.ino {
			kept = append(kept, k)
		}
	}
	kept = append(kept, keptDstFile{id: id, dsts: dsts})
	if len(kept) > c.max {
		kept = kept[len(kept)-c.max:]
	}
	c.kept = kept
}
