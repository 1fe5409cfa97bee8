package main

import (
	"errors"
	"io/fs"
	"os"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
)

// watchPath is the file watch follows: -f, else the permanent file, which
// must exist then (the boot unit only starts when it does).
func watchPath(c *cli.Context) (string, error) {
	if p := c.String("file"); p != "" {
		return p, nil
	}
	path := configPath(c)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return "", usageError("watch: no -f, and the permanent file %s does not exist (make it with egress-snat save, or a set --permanent)", path)
	}
	return path, nil
}

// checkFile is the file check compares with: -f, else the permanent file
// when it exists. Without either it says plainly what it cannot see.
func checkFile(c *cli.Context) (string, error) {
	if p := c.String("file"); p != "" {
		return p, nil
	}
	path, err := permanentFile(c)
	if err == nil && path == "" {
		c.App.ErrWriter.Write([]byte("note: no permanent file " + configPath(c) + ": checking only the rules installed now, so rules that were flushed away (a firewall reload) cannot be seen; make one with egress-snat save\n"))
	}
	return path, err
}

// fileStamp tells a file that was replaced or rewritten from the one that
// was read. --permanent and save replace it by rename: another inode, and a
// fresh modification time (an inode number alone can be reused by the next
// rename).
type fileStamp struct {
	dev, ino uint64
	mtime    int64
	size     int64
}

func stampOf(path string) fileStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}
	}
	s := fileStamp{mtime: fi.ModTime().UnixNano(), size: fi.Size()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = st.Dev, st.Ino
	}
	return s
}

// reloadIfChanged reads the watched file again when it changed since it
// was last read, and reports whether the desired state was replaced. The
// reconcile calls it under the lock, where a --permanent run's kernel write
// and file write are both done or both to come: inotify alone is debounced
// and would let the canary undo a --permanent change with the old file. A
// file that does not load is logged once and the previous desired state
// kept, as on SIGHUP.
func (w *watcher) reloadIfChanged() bool {
	now := stampOf(w.path)
	if now == w.stamp {
		return false
	}
	first := w.stamp == fileStamp{}
	w.stamp = now
	file, n, err := loadWatched(w.path)
	if err != nil {
		w.log.Error("file replaced but does not load: keeping the previous desired state", "file", w.path, "err", err)
		return false
	}
	w.file = file
	if !first {
		w.log.Info("file replaced: re-read", "file", w.path, "destinations", n)
	}
	return true
}

// loadWatched reads and checks the watched file: the file, kept, and the
// number of its intents, which are dropped.
func loadWatched(path string) (*config.File, int, error) {
	f, intents, err := config.LoadIntents(path)
	return f, len(intents), err
}
