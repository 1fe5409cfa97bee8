// Package api is the local API of the daemon (egress-snat watch): a unix
// socket per network namespace through which the CLI's commands run inside
// the daemon, against the state it keeps, instead of each run rebuilding
// the whole world. It owns the socket's file and lock, the peer check, the
// wire protocol and its bounds; what a request runs is the daemon's.
//
// The socket is /run/egress-snat/api-INODE.sock, named by the network
// namespace's inode as the lock files are (package lockfile), mode 0600: a
// peer must be root, or hold CAP_DAC_OVERRIDE, to connect at all, and the
// server then asks SO_PEERCRED for the peer's process and refuses it
// unless it holds CAP_NET_ADMIN in its effective set, or is uid 0 where
// that set cannot be read: what a one-shot run asks of itself (see
// Privileged). The daemon reads and writes files for its clients (-f,
// --config) as root; a peer that can connect is root or can read and
// write any file itself.
//
// The protocol is one exchange per connection, each message a line of JSON:
//
//	server: {"v":1,"ready":true}                  (or a final Answer: a refusal)
//	client: {"v":1,"args":[...],"env":{...},"cwd":"/...","wait_ms":10000}
//	server: {"v":1,"exit":0,"stdout":N,"stderr":M} then N bytes of stdout, M of stderr
//	    or: {"v":1,"decline":"why"}               (nothing ran: the client runs it itself)
//
// The greeting comes from the connection's own goroutine at once, so a
// client that gets none within a short bound (a daemon stopped, or gone with
// its socket file left) has sent nothing and can safely run the command
// itself. Once it has sent the request it waits for the answer: the command
// may already be running.
package api

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
	"unicode/utf8"

	"github.com/egress-snat/egress-snat/internal/lockfile"
)

// Version is the protocol's; a peer of another version is declined (the
// client then runs the command itself).
const Version = 1

// Bounds of what a connection may send or take, so that no peer can make
// the daemon hold much memory or wait for long.
const (
	// MaxRequest bounds a request line: an argument vector is at most
	// ARG_MAX (2 MiB on most hosts), and JSON escapes a few bytes more.
	MaxRequest = 4 << 20
	// MaxArgs bounds the number of arguments.
	MaxArgs = 1 << 16
	// MaxAnswerHeader bounds an answer's or greeting's JSON line.
	MaxAnswerHeader = 4 << 10
	// MaxOutput bounds each of an answer's stdout and stderr for a
	// client, which is not the one holding memory: list of a million
	// destinations prints about 100 MB.
	MaxOutput = 1 << 30
	// MaxWait bounds how long a request may wait for its turn.
	MaxWait = time.Hour
	// RequestTimeout is how long a peer has to send its request once
	// greeted; AnswerTimeout how long it has to take the answer. A
	// peer that is slower is cut off; the daemon never waits on it
	// while it serves others.
	RequestTimeout = 10 * time.Second
	AnswerTimeout  = 60 * time.Second
)

// Env names the environment variables a request carries: those that
// change what a command does (the global flags' defaults, and where
// check and list find the HA pair's keepalived.conf). Others are not
// sent, and refused if they are.
var Env = []string{"EGRESS_SNAT_BACKEND", "EGRESS_SNAT_IPTABLES", "EGRESS_SNAT_CONFIG", "EGRESS_SNAT_KEEPALIVED_CONF"}

// Request is a command line the client was given.
type Request struct {
	V int `json:"v"`
	// Args are the arguments after the program's name, as given.
	Args []string `json:"args"`
	// Env holds those of Env the client's environment sets.
	Env map[string]string `json:"env,omitempty"`
	// Cwd is the client's working directory: relative paths (-f FILE,
	// --config) are the client's.
	Cwd string `json:"cwd"`
	// WaitMS is how long the request may wait for its turn, in
	// milliseconds: the client's --lock-timeout, as a one-shot run
	// waits that long for the lock.
	WaitMS int64 `json:"wait_ms"`
}

// Wait is the request's WaitMS as a duration, within [0, MaxWait].
func (r Request) Wait() time.Duration {
	return min(max(time.Duration(r.WaitMS)*time.Millisecond, 0), MaxWait)
}

// ErrBadRequest wraps what Check finds wrong with a request.
var ErrBadRequest = errors.New("bad request")

// Check refuses a request no client of this version sends: what is
// refused is said in the error, which wraps ErrBadRequest.
func (r Request) Check() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadRequest, fmt.Sprintf(format, args...))
	}
	switch {
	case len(r.Args) > MaxArgs:
		return bad("%d arguments, at most %d", len(r.Args), MaxArgs)
	case r.Cwd == "" || !filepath.IsAbs(r.Cwd):
		return bad("the working directory %q is not an absolute path", r.Cwd)
	case r.WaitMS < 0:
		return bad("wait_ms %d is negative", r.WaitMS)
	}
	for k := range r.Env {
		if !isEnv(k) {
			return bad("environment variable %q is not one a request carries", k)
		}
	}
	return nil
}

func isEnv(k string) bool {
	for _, e := range Env {
		if k == e {
			return true
		}
	}
	return false
}

// Representable reports whether a command line survives JSON as it is:
// JSON strings are UTF-8, and a byte sequence that is not would be
// replaced, changing the command. Such a command runs one-shot.
func Representable(r Request) bool {
	for _, a := range r.Args {
		if !utf8.ValidString(a) {
			return false
		}
	}
	for _, v := range r.Env {
		if !utf8.ValidString(v) {
			return false
		}
	}
	return utf8.ValidString(r.Cwd)
}

// Result is what a command printed and how it ended, or why it did not
// run (Decline).
type Result struct {
	Stdout, Stderr []byte
	Exit           int
	// Decline, when set, says why the daemon did not run the command:
	// the client runs it itself.
	Decline string
}

// answer is the JSON line of a greeting or an answer.
type answer struct {
	V       int    `json:"v"`
	Ready   bool   `json:"ready,omitempty"`
	Exit    int    `json:"exit,omitempty"`
	Stdout  int    `json:"stdout,omitempty"`
	Stderr  int    `json:"stderr,omitempty"`
	Decline string `json:"decline,omitempty"`
}

// filePrefix names the API's files: api-INODE.sock and its lock,
// api-INODE.lock.
const filePrefix = "api"

// SocketPath is the socket of this process's network namespace in dir
// (snat.LockDir on a host).
func SocketPath(dir string) (string, error) {
	ino, err := lockfile.Netns()
	if err != nil {
		return "", err
	}
	return lockfile.Path(dir, filePrefix, ino, "sock"), nil
}

// lockPath is the lock the serving daemon holds.
func lockPath(dir string) (string, error) {
	ino, err := lockfile.Netns()
	if err != nil {
		return "", err
	}
	return lockfile.Path(dir, filePrefix, ino, "lock"), nil
}

// sweep removes the API files of namespaces that are gone (see
// lockfile.Sweep): a socket left by a daemon of a namespace deleted since.
func sweep(dir string) {
	_, _ = lockfile.Sweep(dir, lockfile.LiveNetns, filePrefix)
}

// removeStale removes a socket file nobody serves (its daemon died): the
// caller holds the lock, so no live daemon can be serving it.
func removeStale(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the stale socket %s: %w", path, err)
	}
	return nil
}
