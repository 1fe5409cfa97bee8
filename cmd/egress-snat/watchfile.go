package main

import (
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/egress-snat/egress-snat/config"
)

// watch re-reads its file by itself when the file changes, through the same
// path as SIGHUP: nobody sends a signal when a Kubernetes ConfigMap is
// updated, or when Ansible or an editor replaces the file.
//
// The kubelet updates a mounted ConfigMap with an atomic symlink swap: the
// file is a symlink through ..data to a timestamped directory, and a new
// directory plus a rename of ..data_tmp over ..data replace every key at
// once. Editors and Ansible write a temporary file and rename it over the
// old one. Either way the watched inode is replaced, so the directory is
// watched, not the file.

// fileChange is what the file watcher sends on watch's reload channel, in
// place of SIGHUP.
type fileChange struct{}

func (fileChange) String() string { return "file change" }
func (fileChange) Signal()        {}

// fileDebounce lets a burst of directory events (a kubelet swap is four or
// five, a rewrite two or three) end before the file is read.
const fileDebounce = 100 * time.Millisecond

// watchFile sends fileChange on reload when what path leads to has changed
// (its contents, or the file a symlink chain resolves to, which changes with
// every kubelet swap even when the main file's bytes do not: a dst-file of
// the same ConfigMap may be what changed). It runs until done is closed.
// Without inotify it logs a warning and watch relies on SIGHUP alone.
func watchFile(done <-chan struct{}, path string, reload chan<- os.Signal, log *slog.Logger) {
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
				select {
				case reload <- fileChange{}:
				default: // a reload is pending; it reads the file as it is now
				}
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
