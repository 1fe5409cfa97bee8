package main

// FuzzAPI: what a client of the daemon's socket sends, fuzzed. Each input
// is the bytes a peer writes after the greeting; the daemon's connection
// code (api.Server.ServeConn) decodes it and, when it is a request, runs it
// through the daemon's dispatch (runServed: the served app, the client's
// environment as flags, the client's working directory) against the fake
// host of FuzzCLI. Whatever the bytes, the connection must be answered
// with a well-formed answer or cut, never panic or hang, the exit status
// must be 0, 1 or 2, and a request that is not well-formed must run
// nothing. scripts/fuzz.sh runs it for a bounded time; plain `go test`
// runs the seeds below and testdata/fuzz/FuzzAPI, without root.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/api"
)

// fuzzConn is a connection whose peer has written in, and reads out.
type fuzzConn struct {
	in  *bytes.Reader
	out bytes.Buffer
}

func (c *fuzzConn) Read(p []byte) (int, error)       { return c.in.Read(p) }
func (c *fuzzConn) Write(p []byte) (int, error)      { return c.out.Write(p) }
func (c *fuzzConn) Close() error                     { return nil }
func (c *fuzzConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "daemon", Net: "unix"} }
func (c *fuzzConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "peer", Net: "unix"} }
func (c *fuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

// apiSeed is the request line a client sends for a command line.
func apiSeed(args []string) string {
	b, _ := json.Marshal(api.Request{V: api.Version, Args: args, Cwd: "@DIR@", WaitMS: 1000})
	return string(b) + "\n"
}

// panicLog fails the input when the server logs a panic it recovered.
type panicLog struct{ panicked []string }

func (p *panicLog) Enabled(context.Context, slog.Level) bool { return true }
func (p *panicLog) Handle(_ context.Context, r slog.Record) error {
	if strings.Contains(r.Message, "panicked") {
		var b strings.Builder
		r.Attrs(func(a slog.Attr) bool { b.WriteString(a.String() + " "); return true })
		p.panicked = append(p.panicked, r.Message+": "+b.String())
	}
	return nil
}
func (p *panicLog) WithAttrs([]slog.Attr) slog.Handler { return p }
func (p *panicLog) WithGroup(string) slog.Handler      { return p }

func FuzzAPI(f *testing.F) {
	dir := f.TempDir()
	for name, content := range cliFiles {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			f.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "partners.fifo"), 0o600); err != nil {
		f.Fatal(err)
	}
	f.Setenv("PATH", f.TempDir()) // nothing on the host runs
	permanent := filepath.Join(dir, "permanent.yaml")
	wd, err := os.Getwd()
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range cliSeeds {
		f.Add(apiSeed(strings.Split(strings.Split(s, cliRunSep)[0], cliArgSep)))
	}
	for _, s := range []string{
		"",
		"\n",
		"garbage\n",
		"{}\n",
		`{"v":1}` + "\n",
		`{"v":2,"args":["clear"]}` + "\n",
		`{"v":1,"args":["clear"],"cwd":"@DIR@","env":{"EGRESS_SNAT_BACKEND":"legacy"}}` + "\n",
		`{"v":1,"args":["list"],"cwd":"@DIR@","env":{"EGRESS_SNAT_CONFIG":"@DIR@/permanent.yaml"},"wait_ms":1}` + "\n",
		`{"v":1,"args":["set","--to","192.0.2.22"],"cwd":"@DIR@","unknown":1}` + "\n",
		`{"v":1,"args":["set","--to","192.0.2.22"],"cwd":"@DIR@"}{"v":1}` + "\n",
		`{"v":1,"args":["set","--to","192.0.2.22"],"cwd":"@DIR@"` + "\n",
		`{"v":1,"args":["list"],"cwd":"@DIR@","wait_ms":-5}` + "\n",
		`{"v":1,"args":[1,2],"cwd":"@DIR@"}` + "\n",
		`{"v":1e400}` + "\n",
		`[{"v":1}]` + "\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		input = strings.ReplaceAll(input, "@DIR@", dir)
		os.Remove(permanent)
		h := newDaemonHost()
		ran := false
		log := &panicLog{}
		srv := &api.Server{
			Allow: func(api.Peer) bool { return true },
			Log:   slog.New(log),
			Handle: func(ctx context.Context, _ api.Peer, r api.Request) api.Result {
				// The target's own directory and permanent file, and
				// nothing that may not run in this process.
				r.Cwd = dir
				if r.Env == nil {
					r.Env = map[string]string{}
				}
				r.Env["EGRESS_SNAT_CONFIG"] = permanent
				if !cliSafe(r.Args, dir) {
					return api.Result{Decline: "unsafe in a test"}
				}
				ran = true
				m := h.manager()
				return runServed(ctx, &served{base: h.fakeEnv(nil, m), mgr: m, cwd: wd}, r)
			},
		}
		c := &fuzzConn{in: bytes.NewReader([]byte(input))}
		done := make(chan struct{})
		go func() { defer close(done); srv.ServeConn(context.Background(), c, api.Peer{}) }()
		select {
		case <-done:
		case <-time.After(cliBound):
			t.Fatalf("%q: still served after %s", input, cliBound)
		}
		if got, _ := os.Getwd(); got != wd {
			t.Fatalf("%q: the daemon's working directory is %s, want %s", input, got, wd)
		}
		for _, p := range log.panicked {
			t.Errorf("%q: %s", input, p)
		}
		checkAnswer(t, input, c.out.Bytes(), ran)
	})
}

// checkAnswer checks what the daemon wrote: its greeting, then one
// well-formed answer: output of the lengths it announces and an exit
// status of 0, 1 or 2 (2 for a request that is not well-formed, which
// must not have run), or a decline; or nothing after the greeting when
// the request was cut off.
func checkAnswer(t *testing.T, input string, out []byte, ran bool) {
	t.Helper()
	br := bufio.NewReader(bytes.NewReader(out))
	greeting, err := br.ReadBytes('\n')
	if err != nil || string(greeting) != `{"v":1,"ready":true}`+"\n" {
		t.Fatalf("%q: greeting %q, %v", input, greeting, err)
	}
	line, err := br.ReadBytes('\n')
	if err == io.EOF && len(line) == 0 {
		if !strings.HasSuffix(input, "\n") && !ran {
			return // cut off before its end: nothing to answer
		}
		t.Fatalf("%q: no answer", input)
	}
	var a struct {
		V       int    `json:"v"`
		Exit    int    `json:"exit"`
		Stdout  int    `json:"stdout"`
		Stderr  int    `json:"stderr"`
		Decline string `json:"decline"`
	}
	if err := json.Unmarshal(line, &a); err != nil {
		t.Fatalf("%q: answer %q: %v", input, line, err)
	}
	rest, _ := io.ReadAll(br)
	if a.Decline != "" {
		if len(rest) > 0 || a.Stdout != 0 || a.Stderr != 0 {
			t.Errorf("%q: a decline with output: %q", input, rest)
		}
		return
	}
	if len(rest) != a.Stdout+a.Stderr {
		t.Fatalf("%q: %d bytes of output, the answer announces %d and %d", input, len(rest), a.Stdout, a.Stderr)
	}
	if a.Exit != exitOK && a.Exit != exitFailure && a.Exit != exitUsage {
		t.Errorf("%q: exit %d, want 0, 1 or 2\n%s", input, a.Exit, rest)
	}
	if !ran && a.Exit != exitUsage {
		t.Errorf("%q: nothing ran, but exit %d, want 2 (a bad request)\n%s", input, a.Exit, rest)
	}
}
