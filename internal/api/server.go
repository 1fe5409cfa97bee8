package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/internal/caps"
	"github.com/egress-snat/egress-snat/internal/lockfile"
)

// ErrServed means another daemon already serves this network namespace's
// API (a second watch in the namespace): it holds the API's lock.
var ErrServed = errors.New("another egress-snat watch serves this network namespace's API")

// Listener is the namespace's socket, served by one daemon: it holds the
// API's lock for as long as it is open, so that a second daemon cannot
// take the socket over, and so that a socket file whose lock is free is
// known to be stale.
type Listener struct {
	*net.UnixListener
	// Path is the socket's file.
	Path   string
	unlock func()
	once   sync.Once
}

// Listen takes this namespace's API in dir: its lock (ErrServed when
// another daemon holds it), then its socket, mode 0600. A socket file
// left by a daemon that died is replaced; those of namespaces that are
// gone are removed. The socket is bound under a private name and renamed
// into place, so it is never reachable with another mode.
func Listen(dir string) (*Listener, error) {
	lp, err := lockPath(dir)
	if err != nil {
		return nil, err
	}
	unlock, err := lockfile.Lock(lp, 0)
	if errors.Is(err, lockfile.ErrTimeout) {
		return nil, fmt.Errorf("%w (%s is held)", ErrServed, lp)
	}
	if err != nil {
		return nil, err
	}
	l, err := listen(dir)
	if err != nil {
		unlock()
		return nil, err
	}
	l.unlock = unlock
	sweep(dir)
	return l, nil
}

func listen(dir string) (*Listener, error) {
	path, err := SocketPath(dir)
	if err != nil {
		return nil, err
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(dir, ".api-") // 0700
	if err != nil {
		return nil, fmt.Errorf("making the socket: %w", err)
	}
	defer os.RemoveAll(tmp)
	bound := filepath.Join(tmp, "sock")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: bound, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("making the socket %s: %w", path, err)
	}
	ul.SetUnlinkOnClose(false) // its name is path's now: Close removes that
	if err := os.Chmod(bound, 0o600); err != nil {
		ul.Close()
		return nil, fmt.Errorf("making the socket %s: %w", path, err)
	}
	if err := os.Rename(bound, path); err != nil {
		ul.Close()
		return nil, fmt.Errorf("making the socket %s: %w", path, err)
	}
	return &Listener{UnixListener: ul, Path: path}, nil
}

// Close stops listening, removes the socket's file and releases the lock,
// in that order: a client then finds no socket and runs the command
// itself. It may be called more than once.
func (l *Listener) Close() error {
	var err error
	l.once.Do(func() {
		err = l.UnixListener.Close()
		if rerr := os.Remove(l.Path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
			err = rerr
		}
		if l.unlock != nil {
			l.unlock()
		}
	})
	return err
}

// Peer is the process at the other end of a connection, as SO_PEERCRED
// gives it (pid 0 when it cannot be named in this PID namespace).
type Peer struct {
	PID      int32
	UID, GID uint32
}

// PeerOf reads SO_PEERCRED of a unix connection.
func PeerOf(c net.Conn) (Peer, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Peer{}, fmt.Errorf("not a unix socket: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, err
	}
	if credErr != nil {
		return Peer{}, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	return Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// Privileged is the default peer check, the one a one-shot run makes of
// itself (caps.NetAdmin): CAP_NET_ADMIN in the effective set of the peer's
// process, or, when that set cannot be read (a process of another PID
// namespace, pid 0, or gone), uid 0. Root that dropped CAP_NET_ADMIN (a
// container's) is refused, as its own run would be; a pid of 0 is never
// read as this process.
func Privileged(p Peer) bool {
	if p.PID > 0 {
		if has, ok := caps.Read(int(p.PID)); ok {
			return has
		}
	}
	return p.UID == 0
}

// Server serves the API on a Listener.
type Server struct {
	// Handle runs a request and returns what the command printed, or a
	// Decline. It is called from the connection's goroutine, one per
	// client, and may block until the daemon takes the request; ctx ends
	// when the server stops.
	Handle func(ctx context.Context, p Peer, r Request) Result
	// Allow says whether a peer may use the API: nil is Privileged.
	Allow func(Peer) bool
	// Refusal is what a peer Allow refuses is told (exit 1): the CLI's
	// own words for a run without the privilege.
	Refusal string
	Log     *slog.Logger
	// MaxConns bounds the connections served at once (0: 8); more wait in
	// the socket's backlog, where a client's greeting times out and it
	// runs the command itself.
	MaxConns int
	// RequestTimeout and AnswerTimeout are those of the package when 0.
	RequestTimeout, AnswerTimeout time.Duration
}

func (s *Server) timeouts() (req, ans time.Duration) {
	req, ans = RequestTimeout, AnswerTimeout
	if s.RequestTimeout > 0 {
		req = s.RequestTimeout
	}
	if s.AnswerTimeout > 0 {
		ans = s.AnswerTimeout
	}
	return req, ans
}

// Serve accepts connections on l until ctx ends, then closes l. Each is
// served on a goroutine of its own (ServeConn); a panic there is logged
// and ends that connection alone.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	n := s.MaxConns
	if n <= 0 {
		n = 8
	}
	slots := make(chan struct{}, n)
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		c, err := l.Accept()
		if err != nil {
			<-slots
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			s.log().Warn("api: accepting a connection failed", "err", err)
			time.Sleep(50 * time.Millisecond) // EMFILE and the like: let it pass
			continue
		}
		wg.Go(func() {
			defer func() { <-slots }()
			defer c.Close()
			p, err := PeerOf(c)
			if err != nil {
				s.log().Warn("api: reading the peer's credentials failed; refused", "err", err)
				p = Peer{UID: ^uint32(0)} // nobody: refused below
			}
			s.ServeConn(ctx, c, p)
		})
	}
}

func (s *Server) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// ServeConn serves one connection from peer p: the check, the greeting,
// the request (bounded in size and time), Handle, the answer (bounded in
// time). Whatever the peer sends, it returns: a malformed request is
// answered with exit 2 and never run, a peer too slow is cut off, and a
// panic is recovered, logged, and answered with exit 1 when it can be.
func (s *Server) ServeConn(ctx context.Context, c net.Conn, p Peer) {
	answered := false
	defer func() {
		if v := recover(); v != nil {
			s.log().Error("api: a request panicked", "peer_pid", p.PID, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			if !answered {
				_ = writeAnswer(c, Result{Exit: 1, Stderr: []byte(fmt.Sprintf("egress-snat: internal error in the daemon: %v\n", v))})
			}
		}
	}()
	requestTimeout, answerTimeout := s.timeouts()
	_ = c.SetWriteDeadline(time.Now().Add(answerTimeout))
	allow := s.Allow
	if allow == nil {
		allow = Privileged
	}
	if !allow(p) {
		s.log().Warn("api: refused a peer without root or CAP_NET_ADMIN", "peer_pid", p.PID, "peer_uid", p.UID)
		answered = true
		_ = writeAnswer(c, Result{Exit: 1, Stderr: []byte("egress-snat: " + s.Refusal + "\n")})
		return
	}
	if err := writeLine(c, answer{V: Version, Ready: true}); err != nil {
		return
	}
	_ = c.SetReadDeadline(time.Now().Add(requestTimeout))
	r, err := ReadRequest(c)
	if err != nil {
		answered = true
		if errors.Is(err, errCut) {
			return // nothing to answer: the peer is gone or too slow
		}
		_ = writeAnswer(c, Result{Exit: 2, Stderr: []byte("egress-snat: " + err.Error() + "\n")})
		return
	}
	var res Result
	if r.V != Version {
		res = Result{Decline: fmt.Sprintf("protocol version %d; this daemon speaks %d", r.V, Version)}
	} else {
		res = s.Handle(ctx, p, r)
	}
	answered = true
	_ = c.SetWriteDeadline(time.Now().Add(answerTimeout))
	if err := writeAnswer(c, res); err != nil {
		s.log().Warn("api: the client did not take its answer", "peer_pid", p.PID, "err", err)
	}
}

// errCut is a request that ended before its line did: the peer hung up or
// was too slow.
var errCut = errors.New("the request was cut off")

// ReadRequest reads and decodes one request line of at most MaxRequest
// bytes, strictly: unknown fields, trailing data, no version and a
// request Check refuses are errors (wrapping ErrBadRequest), and so is a
// line too long. A request of another version is returned with its V
// alone. A line cut off (EOF, a deadline) is errCut. It never reads past
// the line's bound.
func ReadRequest(rd io.Reader) (Request, error) {
	br := bufio.NewReaderSize(io.LimitReader(rd, MaxRequest+1), 64<<10)
	line, err := br.ReadSlice('\n')
	var buf []byte
	for errors.Is(err, bufio.ErrBufferFull) {
		buf = append(buf, line...)
		line, err = br.ReadSlice('\n')
	}
	buf = append(buf, line...)
	switch {
	case len(buf) > MaxRequest:
		return Request{}, fmt.Errorf("%w: longer than %d bytes", ErrBadRequest, MaxRequest)
	case err != nil:
		return Request{}, fmt.Errorf("%w: %v", errCut, err)
	}
	// The version first: a request of another version is declined, not
	// judged by this version's fields.
	var v struct {
		V int `json:"v"`
	}
	if err := json.Unmarshal(buf, &v); err != nil {
		return Request{}, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	switch v.V {
	case 0:
		return Request{}, fmt.Errorf("%w: no protocol version", ErrBadRequest)
	case Version:
	default:
		return Request{V: v.V}, nil
	}
	var r Request
	dec := json.NewDecoder(bytes.NewReader(buf))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Request{}, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	if rest, _ := io.ReadAll(dec.Buffered()); len(bytes.TrimSpace(rest)) > 0 {
		return Request{}, fmt.Errorf("%w: data after the request", ErrBadRequest)
	}
	if err := r.Check(); err != nil {
		return Request{}, err
	}
	return r, nil
}

func writeLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// writeAnswer writes res: its header line, then stdout and stderr.
func writeAnswer(w io.Writer, res Result) error {
	if res.Decline != "" {
		return writeLine(w, answer{V: Version, Decline: res.Decline})
	}
	bw := bufio.NewWriterSize(w, 64<<10)
	if err := writeLine(bw, answer{V: Version, Exit: res.Exit, Stdout: len(res.Stdout), Stderr: len(res.Stderr)}); err != nil {
		return err
	}
	bw.Write(res.Stdout)
	bw.Write(res.Stderr)
	return bw.Flush()
}
