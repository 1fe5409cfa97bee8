package reconcile

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/egress-snat/egress-snat/internal/api"
	"github.com/egress-snat/egress-snat/snat"
)

// The daemon serves the CLI's commands on the namespace's socket
// (internal/api) when Config.Commands is set: set, unset, apply, rotate,
// clear, list, check and save then run inside the daemon, one at a time
// with its reconciles, against what it keeps, instead of each run reading
// the whole kernel again.
//
// What a command run through the daemon reads and writes is as a one-shot
// run's, with one difference: the daemon knows the last plan written (by
// it, or by a command it ran), so a read takes a set whose name and count
// the kernel still shows as holding what that plan put there (as its
// canary does), instead of reading every member again. A change behind its
// back that keeps every count is the full resync's to find.
//
// The daemon's desired state stays its file. A command that changes the
// kernel alone (set without --permanent, apply -f of another file) is
// undone by the next canary, within about a second, exactly as when a
// one-shot run makes it while the daemon runs; --permanent (and save)
// change the file in the same step, and the daemon follows the file.

// Commands runs one command line a client sent, as the CLI would run it,
// with m (the daemon's Manager, which knows what the daemon wrote last),
// and returns what it printed and its exit status; a Decline lets the
// client run it itself. It runs on the daemon's loop: one at a time, never
// beside a reconcile. cmd/egress-snat's is the real one.
type Commands func(ctx context.Context, m *snat.Manager, r api.Request) api.Result

// job is one request waiting for the loop.
type job struct {
	req  api.Request
	peer api.Peer
	done chan api.Result
}

// serveAPI listens on the namespace's socket and serves it until ctx
// ends; it returns at once. A second daemon in the namespace, or a
// socket that cannot be made, is logged: the daemon runs without it, and
// commands run one-shot as before.
func (d *Daemon) serveAPI(ctx context.Context) (stop func()) {
	if d.commands == nil {
		return func() {}
	}
	l, err := api.Listen(d.apiDir)
	if err != nil {
		d.log.Warn("not serving commands on the socket; they run on their own", "err", err)
		return func() {}
	}
	d.log.Info("serving commands", "socket", l.Path)
	srv := &api.Server{Handle: d.handle, Allow: d.allow, Refusal: d.refusal, Log: d.log}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, l); err != nil {
			d.log.Error("serving commands stopped", "err", err)
		}
	}()
	return func() {
		cancel()
		l.Close()
		<-done
	}
}

// handle hands a request to the loop and waits for its answer. A request
// the loop does not take within its wait (the client's --lock-timeout, as
// a one-shot run waits for the lock) is answered as a one-shot run that
// waited that long for the lock; one the daemon cannot take because it is
// stopping is declined, so the client runs it itself: nothing ran.
func (d *Daemon) handle(ctx context.Context, p api.Peer, r api.Request) api.Result {
	j := &job{req: r, peer: p, done: make(chan api.Result, 1)}
	wait := time.NewTimer(r.Wait())
	defer wait.Stop()
	select {
	case d.requests <- j:
	case <-wait.C:
		return api.Result{Exit: 1, Stderr: fmt.Appendf(nil, "egress-snat: %v: the daemon (egress-snat watch) was busy after %s; try again, or raise --lock-timeout\n", snat.ErrBusy, r.Wait())}
	case <-ctx.Done():
		return api.Result{Decline: "the daemon is stopping"}
	case <-d.loopDone:
		return api.Result{Decline: "the daemon stopped"}
	}
	return <-j.done // a job taken is always answered
}

// serve runs a request on the loop. The daemon's router answers as the
// host is now: when the host changed since it last looked (an event not
// reconciled yet), it forgets what it cached first. A panic of the
// command is the request's alone: it is logged and answered.
func (d *Daemon) serve(ctx context.Context, j *job) (res api.Result) {
	start := time.Now()
	defer func() {
		if v := recover(); v != nil {
			d.log.Error("a command panicked", "args", j.req.Args, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			res = api.Result{Exit: 1, Stderr: fmt.Appendf(nil, "egress-snat: internal error in the daemon: %v\n", v)}
		}
		if res.Decline != "" {
			d.log.Debug("command declined: the client runs it", "args", j.req.Args, "why", res.Decline)
			return
		}
		d.log.Info("command served", "args", j.req.Args, "peer_pid", j.peer.PID, "peer_uid", j.peer.UID,
			"exit", res.Exit, "took", time.Since(start).Round(time.Millisecond))
	}()
	if d.hostChanged.Swap(false) {
		d.router.Forget()
	}
	m := *d.m
	m.Memory = (*memory)(d)
	return d.commands(ctx, &m, j.req)
}

// memory is the daemon as snat.Memory: what it, or a command it ran,
// wrote last.
type memory Daemon

func (m *memory) Known() snat.NATPlan { return m.written }

func (m *memory) Wrote(p snat.Plan, err error) {
	if err != nil {
		m.written = nil // part of it may be in place: read everything next
		return
	}
	m.written = snat.Remembered(p.NAT)
}

// allow is the peer check: the Config's, else api.Privileged.
func (d *Daemon) allow(p api.Peer) bool {
	if d.allowPeer != nil {
		return d.allowPeer(p)
	}
	return api.Privileged(p)
}
