package reconcile

import (
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/egress-snat/egress-snat/config"
)

// The daemon re-reads its file by itself when the file changes, through the
// same path as SIGHUP: nobody sends a signal when a Kubernetes ConfigMap is
// updated, or when Ansible or an editor replaces the file.
//
// The kubelet updates a mounted ConfigMap with an atomic symlink swap: the
// file is a symlink through ..data to a timestamped directory, and a new
// directory plus a rename of ..data_tmp over ..data replace every key at
// once. Editors and Ansible write a temporary file and rename it over the
// old one. Either way the watched inode is replaced, so the directory is
// watched, not the file.

// fileChange is the trigger of a reload the file watcher asks for, as
// "hangup" is SIGHUP's.
const fileChange = "file change"

// fileDebounce lets a burst of directory events (a kubelet swap is four or
// five, a rewrite two or three) end before the file is read.
const fileDebounce = 100 * time.Millisecond

// watchFile asks for a reload (of trigger fileChange) when what path leads
// to has changed (its contents, or the file a symlink chain resolves to,
// which changes with every kubelet swap even when the main file's bytes do
// not: a dst-file of the same ConfigMap may be what changed). It runs until done is closed.
// Without inotify it logs a warning and the daemon relies on SIGHUP alone.
// reload must not block: a pending reload reads the file as it is then.
func watchFile(done <-chan struct{}, path string, reload func(trigger string), log *slog.Logger) {
	fw, err := fsnotify.NewWatcher()
	if err == nil {
		err = fw.Add(filepath.Dir(path))
		if err != nil {
			fw.Close()
		}
	}
	if err != nil {
		log.Warn("cannot watch the file for changes; reload it with SIGHUP (systemctl reload egress-snat)", "file", path, "err", err)
		return
	}
	last := fingerprint(path)
	go func() {
		defer fw.Close()
		var settled <-chan time.Time
		for {
			select {
			case <-done:
				return
			case ev, ok := <-fw.Events:
				if !ok {
					return
				}
				if ev.Op == fsnotify.Chmod {
					continue
				}
				settled = time.After(fileDebounce)
			case err, ok := <-fw.Errors:
				if !ok {
					return
				}
				log.Warn("watching the file's directory", "file", path, "err", err)
				settled = time.After(fileDebounce) // events may have been lost
			case <-settled:
				settled = nil
				now := fingerprint(path)
				if now == last {
					continue // another file of the directory changed
				}
				last = now
				reload(fileChange)
			}
		}
	}()
}

// fingerprint identifies what path leads to now: the resolved file and a
// hash of its contents (or the error reading it, so that a file that
// reappears counts as a change).
func fingerprint(path string) string {
	resolved, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "error: " + err.Error()
	}
	b, err := config.ReadFileBounded(resolved, config.MaxFileSize) // a FIFO swapped in must not hang it
	if err != nil {
		return "error: " + err.Error()
	}
	sum := sha256.Sum256(b)
	return resolved + " " + hex.EncodeToString(sum[:])
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
func (d *Daemon) reloadIfChanged() bool {
	now := stampOf(d.path)
	if now == d.stamp {
		return false
	}
	first := d.stamp == fileStamp{}
	d.stamp = now
	file, n, err := load(d.path)
	if err != nil {
		d.log.Error("file replaced but does not load: keeping the previous desired state", "file", d.path, "err", err)
		return false
	}
	d.file = file
	if !first {
		d.log.Info("file replaced: re-read", "file", d.path, "destinations", n)
	}
	return true
}
