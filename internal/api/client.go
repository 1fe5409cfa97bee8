package api

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// ErrNoDaemon means no daemon took the request, and nothing was sent: no
// socket, a socket nobody listens on (its daemon died), a daemon of
// another version, or none that greeted within the bound (a daemon
// stopped). The caller runs the command itself, as without a daemon.
var ErrNoDaemon = errors.New("no daemon serves this network namespace")

// Greeting is how long a client waits for a daemon's greeting before it
// runs the command itself. A daemon greets from a goroutine of its own at
// once; one that does not in half a second is stopped or starved, and a
// run of its own is what the client would do without it.
const Greeting = 500 * time.Millisecond

// Call sends r to the daemon serving this network namespace's API in dir,
// waiting at most greet for its greeting, and returns its answer: what the
// command printed and its exit status, or a Decline. ErrNoDaemon (wrapped)
// means nothing was sent. Any other error means the request was sent and
// its answer did not come back whole: the command may or may not have run.
func Call(dir string, r Request, greet time.Duration) (Result, error) {
	path, err := SocketPath(dir)
	if err != nil {
		return Result{}, fmt.Errorf("%w: %v", ErrNoDaemon, err)
	}
	c, err := net.DialTimeout("unix", path, greet)
	if err != nil {
		return Result{}, fmt.Errorf("%w: %v", ErrNoDaemon, err)
	}
	defer c.Close()
	// Only root makes sockets in dir; a socket of anyone else is not a
	// daemon of ours.
	if p, err := PeerOf(c); err != nil || (p.UID != 0 && p.UID != uint32(os.Geteuid())) {
		return Result{}, fmt.Errorf("%w: the socket's owner is not root", ErrNoDaemon)
	}
	br := bufio.NewReaderSize(c, 64<<10)
	_ = c.SetReadDeadline(time.Now().Add(greet))
	h, err := readHeader(br)
	if err != nil {
		return Result{}, fmt.Errorf("%w: no greeting: %v", ErrNoDaemon, err)
	}
	if !h.Ready {
		// A final answer before any request: the daemon refused this
		// peer, as a run of its own would refuse it.
		return readOutput(br, h)
	}
	if h.V != Version {
		return Result{}, fmt.Errorf("%w: the daemon speaks version %d", ErrNoDaemon, h.V)
	}
	b, err := json.Marshal(r)
	if err != nil {
		return Result{}, fmt.Errorf("%w: %v", ErrNoDaemon, err)
	}
	if len(b) >= MaxRequest {
		return Result{}, fmt.Errorf("%w: the command line is too long for a request", ErrNoDaemon)
	}
	_ = c.SetWriteDeadline(time.Now().Add(RequestTimeout))
	if _, err := c.Write(append(b, '\n')); err != nil {
		// The line did not arrive whole: the daemon runs nothing.
		return Result{}, fmt.Errorf("%w: sending the request: %v", ErrNoDaemon, err)
	}
	// The command runs now, for as long as it takes.
	_ = c.SetReadDeadline(time.Time{})
	h, err = readHeader(br)
	if err != nil {
		return Result{}, fmt.Errorf("the daemon (egress-snat watch) ended before it answered (%v): the command may or may not have run; egress-snat list shows what is installed", err)
	}
	if h.Decline != "" {
		return Result{Decline: h.Decline}, nil
	}
	return readOutput(br, h)
}

// readHeader reads one answer line of at most MaxAnswerHeader bytes.
func readHeader(br *bufio.Reader) (answer, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > MaxAnswerHeader {
			return answer{}, fmt.Errorf("an answer line longer than %d bytes", MaxAnswerHeader)
		}
		if err == nil {
			break
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return answer{}, err
		}
	}
	var h answer
	if err := json.Unmarshal(line, &h); err != nil {
		return answer{}, fmt.Errorf("a malformed answer: %v", err)
	}
	return h, nil
}

// readOutput reads the stdout and stderr h announces.
func readOutput(br *bufio.Reader, h answer) (Result, error) {
	if h.Stdout < 0 || h.Stderr < 0 || h.Stdout > MaxOutput || h.Stderr > MaxOutput {
		return Result{}, fmt.Errorf("a malformed answer: output of %d and %d bytes", h.Stdout, h.Stderr)
	}
	res := Result{Exit: h.Exit, Stdout: make([]byte, h.Stdout), Stderr: make([]byte, h.Stderr)}
	if _, err := io.ReadFull(br, res.Stdout); err != nil {
		return Result{}, fmt.Errorf("the daemon's answer was cut off: %v", err)
	}
	if _, err := io.ReadFull(br, res.Stderr); err != nil {
		return Result{}, fmt.Errorf("the daemon's answer was cut off: %v", err)
	}
	return res, nil
}
