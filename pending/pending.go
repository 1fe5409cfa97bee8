// Package pending owns `apply --confirm`: an apply that reverts itself
// unless `egress-snat confirm` runs first. It keeps the record of the apply
// that waits (what to restore, by when, and which detached process will
// restore it), and runs the three sides of it: Store.Apply writes and
// leaves the reverter, Store.Confirm keeps the new state, Store.Revert is
// the reverter's work. The command line only reads flags and prints.
//
// The record lives in /run (volatile, root-only), one per network
// namespace, so a reboot forgets it along with the rules it would revert.
// The reverter is a separate process in its own session, so neither a
// hang-up nor a kill of the applying shell's process group reaches it.
//
// Every operation on the record happens under the record's own lock, taken
// before egress-snat's run lock when both are needed (apply, revert), never
// after; confirm needs only the record's. So confirm and the revert cannot
// both win: whoever takes the lock first removes the record, and the other
// finds nothing to do.
package pending

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/egress-snat/egress-snat/internal/lockfile"
)

// Record is one pending apply.
type Record struct {
	// Token identifies this apply; the reverter carries it on its command
	// line, which is how a pid is known to be ours.
	Token    string    `json:"token"`
	Deadline time.Time `json:"deadline"`
	Applied  time.Time `json:"applied"`
	// PID is the reverter's process.
	PID int `json:"pid"`
	// Netns is the inode of the network namespace the record is for.
	Netns uint64 `json:"netns"`
	// Previous is what to restore, opaque here (the command's entries).
	Previous json.RawMessage `json:"previous"`
	// RevertError is set by a reverter that could not restore.
	RevertError string `json:"revert_error,omitempty"`
}

// Store is the directory holding records, one per network namespace.
type Store struct {
	Dir string
	// Netns is the namespace's inode; zero means this process's namespace.
	Netns uint64
}

// ErrLocked means the record's lock was held past the bound.
var ErrLocked = errors.New("another egress-snat run holds the pending-apply lock")

func (s Store) netns() (uint64, error) {
	if s.Netns != 0 {
		return s.Netns, nil
	}
	return lockfile.Netns()
}

// filePrefix names the record's files: pending-INODE.lock and .json.
const filePrefix = "pending"

func (s Store) path(ext string) (string, error) {
	ino, err := s.netns()
	if err != nil {
		return "", err
	}
	return lockfile.Path(s.Dir, filePrefix, ino, ext), nil
}

// Lock takes the record's lock, waiting at most timeout. The kernel drops
// it if the process dies. Once held, it removes the records and locks of
// namespaces that are gone (lockfile.Sweep), so they do not pile up.
func (s Store) Lock(timeout time.Duration) (unlock func(), err error) {
	path, err := s.path("lock")
	if err != nil {
		return nil, err
	}
	unlock, err = lockfile.Lock(path, timeout)
	if errors.Is(err, lockfile.ErrTimeout) {
		return nil, fmt.Errorf("%w (%s) after %s", ErrLocked, path, timeout)
	}
	if err != nil {
		return nil, err
	}
	_, _ = lockfile.Sweep(s.Dir, lockfile.LiveNetns, filePrefix)
	return unlock, nil
}

// Load returns the record, or nil when nothing is pending.
func (s Store) Load() (*Record, error) {
	path, err := s.path("json")
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return &r, nil
}

// Save writes the record atomically (a temporary file renamed over it),
// readable by root only.
func (s Store) Save(r *Record) error {
	path, err := s.path("json")
	if err != nil {
		return err
	}
	if r.Netns, err = s.netns(); err != nil {
		return err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// Remove deletes the record; a missing one is not an error.
func (s Store) Remove() error {
	path, err := s.path("json")
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// NewToken returns a fresh random token.
func NewToken() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Alive reports whether the record's reverter is running: its pid exists
// and carries the record's token on its command line (a reused pid does
// not).
func Alive(r *Record) bool {
	if r == nil || r.PID <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", r.PID))
	if err != nil {
		return false
	}
	return bytes.Contains(cmdline, []byte(r.Token))
}

// Stop ends the record's reverter if it is still running.
func Stop(r *Record) error {
	if !Alive(r) {
		return nil
	}
	if err := syscall.Kill(r.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stopping the reverter (pid %d): %w", r.PID, err)
	}
	return nil
}

// Spawn starts argv as a detached process: a new session (no controlling
// terminal, so no SIGHUP when the terminal goes; its own process group, so
// a kill of the caller's group misses it), stdio on /dev/null, and not
// waited for. It inherits the caller's network namespace. It returns the
// pid.
func Spawn(argv []string) (int, error) {
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer null.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, null, null
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("starting the reverter: %w", err)
	}
	pid := cmd.Process.Pid
	// Not waited for: when the caller exits, init (or the subreaper)
	// adopts and reaps it.
	if err := cmd.Process.Release(); err != nil {
		return pid, err
	}
	return pid, nil
}
