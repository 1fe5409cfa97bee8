package api

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/caps"
)

// serve starts a server on dir's socket with handle, until the test ends.
func serve(t *testing.T, dir string, s *Server) *Listener {
	t.Helper()
	l, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		l.Close()
	})
	return l
}

func request(args ...string) Request {
	return Request{V: Version, Args: args, Cwd: "/", WaitMS: 1000}
}

// echo answers with its arguments on stdout, and exit 3 for "fail".
func echo(_ context.Context, _ Peer, r Request) Result {
	res := Result{Stdout: []byte(strings.Join(r.Args, " ") + "\n"), Stderr: []byte(r.Cwd)}
	if len(r.Args) > 0 && r.Args[0] == "fail" {
		res.Exit = 3
	}
	if len(r.Args) > 0 && r.Args[0] == "decline" {
		return Result{Decline: "not mine"}
	}
	if len(r.Args) > 0 && r.Args[0] == "panic" {
		panic("boom")
	}
	return res
}

// TestRoundTrip: a request's answer comes back whole, its stdout, stderr
// and exit status, a Decline as a Decline, and a panic of the handler as
// exit 1 that leaves the server serving.
func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	l := serve(t, dir, &Server{Handle: echo})
	fi, err := os.Stat(l.Path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %s: %v, mode %v; want a socket of mode 0600", l.Path, err, fi.Mode())
	}
	for _, tt := range []struct {
		args    []string
		stdout  string
		exit    int
		decline string
	}{
		{[]string{"set", "--to", "192.0.2.22"}, "set --to 192.0.2.22\n", 0, ""},
		{[]string{"fail", strings.Repeat("x", 200000)}, "fail " + strings.Repeat("x", 200000) + "\n", 3, ""},
		{[]string{"decline"}, "", 0, "not mine"},
		{[]string{"panic"}, "", 1, ""},
		{[]string{"list"}, "list\n", 0, ""},
	} {
		res, err := Call(dir, request(tt.args...), time.Second)
		if err != nil {
			t.Fatalf("Call %.20q: %v", tt.args, err)
		}
		if string(res.Stdout) != tt.stdout || res.Exit != tt.exit || res.Decline != tt.decline {
			t.Errorf("Call %.20q: stdout %.30q, exit %d, decline %q; want %.30q, %d, %q", tt.args, res.Stdout, res.Exit, res.Decline, tt.stdout, tt.exit, tt.decline)
		}
		if tt.args[0] == "panic" && !strings.Contains(string(res.Stderr), "internal error") {
			t.Errorf("a panic answered %q, want an internal error", res.Stderr)
		}
	}
}

// TestNoDaemon: no socket, a socket file nobody listens on (its daemon
// died), and a daemon that does not greet (stopped) are ErrNoDaemon:
// the client runs the command itself, nothing having been sent.
func TestNoDaemon(t *testing.T) {
	dir := t.TempDir()
	if _, err := Call(dir, request("list"), 100*time.Millisecond); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("no socket: %v, want ErrNoDaemon", err)
	}
	// A daemon killed: its socket file stays, nobody listens.
	l, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	path := l.Path
	l.UnixListener.Close() // not Close: the file stays, as after kill -9
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the socket file went: %v", err)
	}
	if _, err := Call(dir, request("list"), 100*time.Millisecond); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("stale socket: %v, want ErrNoDaemon", err)
	}
	l.unlock()
	// A daemon that listens but never accepts (stopped, or wedged).
	l, err = Listen(dir)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l.Close()
	start := time.Now()
	if _, err := Call(dir, request("list"), 200*time.Millisecond); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("no greeting: %v, want ErrNoDaemon", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("no greeting: waited %s", d)
	}
}

// TestListenOnce: a second daemon in the namespace does not take the
// socket; once the first closes, the socket file is gone and the next
// one can serve.
func TestListenOnce(t *testing.T) {
	dir := t.TempDir()
	l, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(dir); !errors.Is(err, ErrServed) {
		t.Errorf("second Listen: %v, want ErrServed", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(l.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Close, the socket file: %v, want none", err)
	}
	l2, err := Listen(dir)
	if err != nil {
		t.Fatalf("Listen after Close: %v", err)
	}
	l2.Close()
}

// TestRefused: a peer the check refuses is told the refusal, exit 1, and
// nothing it sends runs.
func TestRefused(t *testing.T) {
	dir := t.TempDir()
	var ran atomic.Bool
	serve(t, dir, &Server{
		Handle:  func(ctx context.Context, p Peer, r Request) Result { ran.Store(true); return Result{} },
		Allow:   func(p Peer) bool { return false },
		Refusal: "this needs root or CAP_NET_ADMIN",
	})
	res, err := Call(dir, request("clear"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if res.Exit != 1 || string(res.Stderr) != "egress-snat: this needs root or CAP_NET_ADMIN\n" || len(res.Stdout) != 0 {
		t.Errorf("refused peer: exit %d, stdout %q, stderr %q", res.Exit, res.Stdout, res.Stderr)
	}
	if ran.Load() {
		t.Error("a refused peer's request ran")
	}
}

// TestPrivileged: a peer's effective CAP_NET_ADMIN decides; uid 0 only
// where its set cannot be read, and a pid of 0 is never read as this
// process.
func TestPrivileged(t *testing.T) {
	self := int32(os.Getpid())
	has, ok := caps.Read(0)
	if !ok {
		t.Skip("this process's capabilities cannot be read")
	}
	if got := Privileged(Peer{PID: self, UID: 1000}); got != has {
		t.Errorf("this process as a peer: %v, want its CAP_NET_ADMIN, %v", got, has)
	}
	if !Privileged(Peer{PID: 0, UID: 0}) {
		t.Error("root whose process cannot be named refused")
	}
	if Privileged(Peer{PID: 0, UID: 1000}) {
		t.Error("an unnamed non-root peer allowed")
	}
	if Privileged(Peer{PID: 1 << 30, UID: 1000}) {
		t.Error("a non-root peer without a process allowed")
	}
}

// raw connects to dir's socket and reads the greeting.
func raw(t *testing.T, dir string) (net.Conn, *bufio.Reader) {
	t.Helper()
	path, err := SocketPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	br := bufio.NewReader(c)
	h, err := readHeader(br)
	if err != nil || !h.Ready {
		t.Fatalf("greeting: %+v, %v", h, err)
	}
	return c, br
}

// TestHostile: garbage, a request too large, unknown fields and bad
// values are answered with exit 2 and never run; a peer that sends
// nothing is cut off after the bound, and one that never reads its
// answer does not hold up the others.
func TestHostile(t *testing.T) {
	dir := t.TempDir()
	var ran atomic.Int32
	serve(t, dir, &Server{
		Handle: func(ctx context.Context, p Peer, r Request) Result {
			ran.Add(1)
			return Result{Stdout: []byte(strings.Repeat("y", 8<<20))}
		},
		RequestTimeout: 200 * time.Millisecond,
		AnswerTimeout:  time.Second,
		MaxConns:       2,
	})
	for _, in := range []string{
		"garbage\n",
		"{}\n",
		`{"v":1,"args":["list"],"cwd":"/","wait_ms":10,"extra":1}` + "\n",
		`{"v":1,"args":["list"],"cwd":"relative","wait_ms":10}` + "\n",
		`{"v":1,"args":["list"],"cwd":"/","wait_ms":-1}` + "\n",
		`{"v":1,"args":["list"],"cwd":"/","env":{"PATH":"/tmp"}}` + "\n",
		`{"v":1,"args":["list"],"cwd":"/"} {"v":1}` + "\n",
		`{"v":1,"args":"list","cwd":"/"}` + "\n",
	} {
		c, br := raw(t, dir)
		c.Write([]byte(in))
		h, err := readHeader(br)
		if err != nil {
			t.Errorf("%.60q: no answer: %v", in, err)
			continue
		}
		res, err := readOutput(br, h)
		if err != nil || res.Exit != 2 || !strings.Contains(string(res.Stderr), "bad request") {
			t.Errorf("%.60q: exit %d, stderr %q, %v; want exit 2, a bad request", in, res.Exit, res.Stderr, err)
		}
	}
	// A request too large: the server stops reading at the bound; the
	// peer still writing may see its connection reset before the answer.
	c, br := raw(t, dir)
	go c.Write([]byte(`{"v":1,"args":["` + strings.Repeat("a", 2*MaxRequest) + `"],"cwd":"/"}` + "\n"))
	if h, err := readHeader(br); err == nil {
		if res, err := readOutput(br, h); err != nil || res.Exit != 2 || !strings.Contains(string(res.Stderr), "longer than") {
			t.Errorf("a request too large: exit %d, stderr %q, %v; want exit 2, too long", res.Exit, res.Stderr, err)
		}
	}
	if n := ran.Load(); n != 0 {
		t.Errorf("%d malformed requests ran", n)
	}
	// A peer that sends nothing is cut off.
	c, _ = raw(t, dir)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := c.Read(make([]byte, 1)); err == nil || time.Since(start) > 4*time.Second {
		t.Errorf("a silent peer: read %v after %s, want the connection closed after 200ms", err, time.Since(start))
	}
	// Peers that never read their (large) answer: the server cuts them
	// off and goes on serving others, though only two are served at once.
	for range 3 {
		c, _ := raw(t, dir)
		c.Write([]byte(`{"v":1,"args":["list"],"cwd":"/","wait_ms":10}` + "\n"))
	}
	time.Sleep(100 * time.Millisecond)
	res, err := Call(dir, request("list"), 10*time.Second)
	if err != nil || len(res.Stdout) != 8<<20 {
		t.Errorf("after peers that do not read: %v, %d bytes", err, len(res.Stdout))
	}
}

// TestVersion: a request of another version is declined (the client runs
// it itself), never run.
func TestVersion(t *testing.T) {
	dir := t.TempDir()
	serve(t, dir, &Server{Handle: echo})
	c, br := raw(t, dir)
	c.Write([]byte(`{"v":2,"args":["list"],"cwd":"/","whatever":true}` + "\n"))
	h, err := readHeader(br)
	if err != nil || h.Decline == "" {
		t.Errorf("version 2: %+v, %v; want declined", h, err)
	}
}

// TestRepresentable: a command line that is not UTF-8 would change in
// JSON, so it runs one-shot.
func TestRepresentable(t *testing.T) {
	if !Representable(request("set", "--to", "192.0.2.22")) {
		t.Error("a plain command line is not representable")
	}
	if Representable(request("set", "--dst", "\xff")) {
		t.Error("a command line with a byte that is not UTF-8 is representable")
	}
}
