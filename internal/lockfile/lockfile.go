// Package lockfile is egress-snat's one flock helper, and it keeps the lock
// files of network namespaces from piling up.
//
// Two locks are taken per network namespace, each a file named after the
// namespace's inode: the run lock, netns-INODE.lock (package snat), and the
// pending-apply record's lock, pending-INODE.lock, beside its record
// pending-INODE.json (package pending). Both live in /run/egress-snat. A
// host that runs egress-snat in many short-lived namespaces (containers,
// tests) would keep two files for every namespace it ever used, so Sweep
// removes the files of namespaces that are gone, and Lock is written so
// that removing a lock file is safe:
//
//   - a file is only removed by a process holding its flock (Sweep takes it
//     without waiting, so a file in use is never touched);
//   - a process that obtains a flock then checks that the path still names
//     the file it locked; when it does not (the file was removed while it
//     waited), it starts over on the path's new file. So two processes can
//     never both hold "the" lock, one on the removed file and one on its
//     successor.
package lockfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrTimeout means the lock was held by another process past the bound.
// Callers wrap it in an error of their own that says whose lock it is.
var ErrTimeout = errors.New("lock held past the bound")

// pollEvery is how often a waiting Lock tries again. flock cannot wait with
// a timeout, and a blocked flock could not be given up.
const pollEvery = 20 * time.Millisecond

// Lock takes an exclusive flock on path, creating the file (mode 0600) and
// its directory (0755) when missing, and waits at most timeout for another
// holder: then it fails with an error wrapping ErrTimeout and naming path.
// The lock is released by the returned function, or by the kernel when the
// process dies, so a killed run never leaves it held. It is only ever held
// on the file path names at the time it is obtained (see the package
// comment).
func Lock(path string, timeout time.Duration) (unlock func(), err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	deadline := time.Now().Add(timeout)
	for {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return nil, fmt.Errorf("opening lock %s: %w", path, err)
		}
		for {
			err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			if err == nil || !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
				break
			}
			time.Sleep(pollEvery)
		}
		switch {
		case errors.Is(err, unix.EWOULDBLOCK):
			f.Close()
			return nil, fmt.Errorf("%w: %s after %s", ErrTimeout, path, timeout)
		case err != nil:
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		if same, err := samePath(f, path); err != nil {
			f.Close()
			return nil, err
		} else if !same {
			// Removed (by Sweep) while we waited: the lock that counts is
			// the one on the file path names now.
			f.Close()
			continue
		}
		return func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
	}
}

// samePath reports whether path still names the open file f.
func samePath(f *os.File, path string) (bool, error) {
	var have, now unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &have); err != nil {
		return false, fmt.Errorf("reading lock %s: %w", path, err)
	}
	if err := unix.Stat(path, &now); errors.Is(err, unix.ENOENT) {
		return false, nil
	} else if err != nil {
		return false, fmt.Errorf("reading lock %s: %w", path, err)
	}
	return have.Dev == now.Dev && have.Ino == now.Ino, nil
}

// Netns returns the inode of this process's network namespace, which names
// its lock files.
func Netns() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("identifying network namespace: %w", err)
	}
	return st.Ino, nil
}

// Path is the file dir/PREFIX-INODE.EXT of network namespace ino: ext is
// "lock" for a lock, or the extension of a file kept under that lock.
func Path(dir, prefix string, ino uint64, ext string) string {
	return filepath.Join(dir, prefix+"-"+strconv.FormatUint(ino, 10)+"."+ext)
}

// Liveness tells which network namespaces exist, and whether it saw every
// process (complete); it may stop looking once it found those of want.
// LiveNetns is the real one, tests pass their own.
type Liveness func(want map[uint64]bool) (live map[uint64]bool, complete bool, err error)

// Sweep removes from dir the files of the given prefixes that belong to
// network namespaces that no longer exist (see LiveNetns): PREFIX-INODE.lock
// and the files kept under it, PREFIX-INODE.*. For each such namespace it
// takes the lock without waiting; a lock someone holds is left alone, and
// the other files go first, the lock file last, while it is held. It returns
// the paths it removed.
//
// A lock file alone is safe to remove whenever nobody holds it (Lock checks
// the path after locking), so liveness only spares the files of namespaces
// in use a pointless removal. A file kept under a lock (a pending record)
// is removed only when live saw every process (complete), so a record is
// never lost while its namespace may still exist; when live cannot tell at
// all, nothing is removed. It reads /proc only when dir holds a file of
// another namespace than this process's.
func Sweep(dir string, live Liveness, prefixes ...string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	self, err := Netns()
	if err != nil {
		return nil, err
	}
	type group struct {
		prefix string
		ino    uint64
	}
	files := map[group][]string{}
	for _, e := range entries {
		prefix, ino, ok := parseName(e.Name(), prefixes)
		if !ok || ino == self {
			continue
		}
		g := group{prefix, ino}
		files[g] = append(files[g], e.Name())
	}
	if len(files) == 0 {
		return nil, nil
	}
	want := map[uint64]bool{}
	for g := range files {
		want[g.ino] = true
	}
	alive, complete, err := live(want)
	if err != nil {
		return nil, nil // cannot tell what is gone: keep everything
	}
	var removed []string
	var errs []error
	for g, names := range files {
		if alive[g.ino] || !complete && !slices.Equal(names, []string{filepath.Base(Path(dir, g.prefix, g.ino, "lock"))}) {
			continue
		}
		gone, err := sweepOne(dir, g.prefix, g.ino, names)
		removed = append(removed, gone...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	slices.Sort(removed)
	return removed, errors.Join(errs...)
}

// parseName splits PREFIX-INODE.EXT for one of prefixes.
func parseName(name string, prefixes []string) (string, uint64, bool) {
	for _, p := range prefixes {
		rest, ok := strings.CutPrefix(name, p+"-")
		if !ok {
			continue
		}
		digits, _, ok := strings.Cut(rest, ".")
		if !ok {
			continue
		}
		ino, err := strconv.ParseUint(digits, 10, 64)
		if err != nil {
			continue
		}
		return p, ino, true
	}
	return "", 0, false
}

// sweepOne removes the files of one gone namespace under its lock.
func sweepOne(dir, prefix string, ino uint64, names []string) ([]string, error) {
	lockPath := Path(dir, prefix, ino, "lock")
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock %s: %w", lockPath, err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil, nil // held: in use after all, or being swept by another run
	}
	if same, err := samePath(f, lockPath); err != nil || !same {
		return nil, err // swept by another run meanwhile
	}
	var removed []string
	for _, n := range names {
		p := filepath.Join(dir, n)
		if p == lockPath {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return removed, fmt.Errorf("removing %s: %w", p, err)
		}
		removed = append(removed, p)
	}
	if err := os.Remove(lockPath); err != nil {
		return removed, fmt.Errorf("removing %s: %w", lockPath, err)
	}
	return append(removed, lockPath), nil
}

// initPIDNamespace is the inode of the initial PID namespace
// (PROC_PID_INIT_INO, fixed since Linux 3.8).
const initPIDNamespace = 0xEFFFFFFC

// ErrCannotTell means LiveNetns cannot see the host's processes at all.
var ErrCannotTell = errors.New("in a PID namespace of its own: cannot see the host's processes")

// LiveNetns returns the network namespaces that exist: those bound to a
// path (ip netns add, Docker's netns files; nsfs mounts of this mount
// namespace) and those a thread of some process is in. A namespace that
// neither holds can still be kept by an open file descriptor, but no
// process can be in it, so no process can be using its lock files. It
// looks no further once every namespace of want is found (want nil: look
// everywhere): mounts first, then the processes, then their other threads,
// so that a host whose lock files all belong to live namespaces pays for a
// few reads only.
//
// complete is false when the namespace of some thread could not be read
// (another user's, without the right to trace it; a non-dumpable process).
// It fails with ErrCannotTell, and Sweep then removes nothing, in a PID
// namespace of its own (a container, such as the DaemonSet's pod, which
// shares /run/egress-snat with the node but sees none of its processes).
func LiveNetns(want map[uint64]bool) (live map[uint64]bool, complete bool, err error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/pid", &st); err != nil || st.Ino != initPIDNamespace {
		return nil, false, ErrCannotTell
	}
	live, complete = map[uint64]bool{}, true
	found := 0
	add := func(link string) bool {
		if ino, ok := nsInode(link); ok && !live[ino] {
			live[ino] = true
			if want[ino] {
				found++
			}
		}
		return want != nil && found == len(want)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, false, err
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT ... - FSTYPE SOURCE OPTIONS;
		// an nsfs mount's ROOT is the namespace, such as net:[4026532288].
		f := strings.Fields(line)
		if i := slices.Index(f, "-"); i > 3 && i+1 < len(f) && f[i+1] == "nsfs" && add(f[3]) {
			return live, complete, nil
		}
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, false, err
	}
	var pids []string
	for _, p := range procs {
		if p.Name()[0] >= '0' && p.Name()[0] <= '9' {
			pids = append(pids, p.Name())
		}
	}
	// readNS reads the namespace of /proc/PATH; a thread that exited (or a
	// kernel thread being reaped) is no one's.
	readNS := func(path string) bool {
		link, err := os.Readlink("/proc/" + path + "/ns/net")
		if errors.Is(err, os.ErrPermission) {
			complete = false
			return false
		}
		return err == nil && add(link)
	}
	for _, pid := range pids {
		if readNS(pid) {
			return live, complete, nil
		}
	}
	// The other threads of each process may be in namespaces of their own
	// (a Go program that switched one thread, say).
	for _, pid := range pids {
		tasks, err := os.ReadDir("/proc/" + pid + "/task")
		if err != nil {
			continue // exited
		}
		for _, t := range tasks {
			if t.Name() != pid && readNS(pid+"/task/"+t.Name()) {
				return live, complete, nil
			}
		}
	}
	return live, complete, nil
}

// nsInode reads the inode of a namespace link, net:[4026531840].
func nsInode(link string) (uint64, bool) {
	s, ok := strings.CutPrefix(link, "net:[")
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, "]")
	if !ok {
		return 0, false
	}
	ino, err := strconv.ParseUint(s, 10, 64)
	return ino, err == nil
}
