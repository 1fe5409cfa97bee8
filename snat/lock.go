package snat

import (
	"errors"
	"fmt"
	"time"

	"github.com/egress-snat/egress-snat/internal/lockfile"
)

// ErrBusy means another egress-snat run held the lock past the bound.
var ErrBusy = errors.New("another egress-snat run is holding the lock")

// LockDir holds the lock files, one per network namespace in use (the
// files of namespaces that are gone are removed: see lockfile.Sweep).
const LockDir = "/run/egress-snat"

// Locker serializes the writers of one network namespace. FileLock is the
// real one; unit tests pass a lock of their own, so they never take the
// host's.
type Locker interface {
	Lock(timeout time.Duration) (unlock func(), err error)
}

// FileLock is the lock every egress-snat process takes: see Lock. Dir is
// where its files live, LockDir when empty; tests give a directory of their
// own so that they never contend with, or hold, the host's lock.
type FileLock struct{ Dir string }

func (l FileLock) Lock(timeout time.Duration) (func(), error) {
	dir := l.Dir
	if dir == "" {
		dir = LockDir
	}
	return lockIn(dir, timeout)
}

// Lock serializes egress-snat runs that change the same network namespace:
// a cron rotation overlapping a manual set waits here instead of racing it.
// The lock is per namespace (named by the namespace's inode) so that runs in
// different namespaces do not wait for each other. It waits at most timeout
// and returns ErrBusy after that. The lock is released by the returned
// function, or by the kernel when the process dies, so a killed run never
// leaves it held. Once held, it removes the lock files of namespaces that
// are gone, so they do not pile up.
func Lock(timeout time.Duration) (unlock func(), err error) { return lockIn(LockDir, timeout) }

// lockPrefix names the run lock's files: netns-INODE.lock.
const lockPrefix = "netns"

func lockIn(dir string, timeout time.Duration) (unlock func(), err error) {
	ino, err := lockfile.Netns()
	if err != nil {
		return nil, err
	}
	path := lockfile.Path(dir, lockPrefix, ino, "lock")
	unlock, err = lockfile.Lock(path, timeout)
	if errors.Is(err, lockfile.ErrTimeout) {
		return nil, fmt.Errorf("%w (%s) after %s; try again, or raise --lock-timeout", ErrBusy, path, timeout)
	}
	if err != nil {
		return nil, err
	}
	// Best effort: a file that cannot be removed now is tried again by
	// the next run.
	_, _ = lockfile.Sweep(dir, lockfile.LiveNetns, lockPrefix)
	return unlock, nil
}
