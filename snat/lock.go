package snat

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// ErrBusy means another egress-snat run held the lock past the bound.
var ErrBusy = errors.New("another egress-snat run is holding the lock")

// LockDir holds one lock file per network namespace.
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
// leaves it held.
func Lock(timeout time.Duration) (unlock func(), err error) { return lockIn(LockDir, timeout) }

func lockIn(dir string, timeout time.Duration) (unlock func(), err error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		return nil, fmt.Errorf("identifying network namespace: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	path := filepath.Join(dir, fmt.Sprintf("netns-%d.lock", st.Ino))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock %s: %w", path, err)
	}
	deadline := time.Now().Add(timeout)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%w (%s) after %s; try again, or raise --lock-timeout", ErrBusy, path, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
