// Package reconcile is the daemon behind `egress-snat watch`: it keeps the
// host converged on a desired-state file. It owns the daemon's state (the
// file as read, the last plan written, the generations and ip rules its
// canary compares with, the rules left out and why), what makes it look
// again (netlink address, link and route changes, the file replaced, a
// Reload or Reconcile from outside: SIGHUP, a socket, a notify hook), the
// coalescing of a burst of those into one write, the canary tiers (the
// generations and ip rules every tick, a quick drift check, a full read),
// the re-checks of what is kept for live connections, the deletion of the
// conntrack entries bound to an address that left, the aggregated report
// of rules left out, the health file for probes, and the canary that
// checks real flows (package verify).
//
// Every write goes through snat.Manager.Update, under the lock every
// egress-snat run takes. The daemon holds no state of the kernel beyond
// what its last write planned: a canary that finds the kernel differs
// writes that plan back; a change of the host or the file resolves the
// file again.
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/internal/api"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/verify"
)

// Router is what a reconcile asks of the host's routing: snat.Router to
// resolve the file, and Forget, to drop what it cached when the host
// changed. A selector.Selector that excludes our own routes is the real
// one.
type Router interface {
	snat.Router
	// Forget drops cached links and addresses after the host changed.
	Forget()
}

// Conntrack deletes the conntrack entries of flows bound to a source:
// conntrack.Netlink is the real one.
type Conntrack interface {
	DeleteBinding(b conntrack.Binding) (uint, error)
}

// Config is what a daemon is built from.
type Config struct {
	// Path is the desired-state file followed, and File what it held when
	// the command read it (config.LoadIntents), before the daemon started:
	// a bad file is refused then, not logged.
	Path string
	File *config.File
	// Manager writes, reads and compares the kernel's rules.
	Manager *snat.Manager
	Router  Router
	// Conntrack deletes the flows of an address that left the host.
	Conntrack Conntrack
	// Flows reads conntrack for the spill rules (spill.go), every
	// SpillEvery (0: DefaultSpillEvery); nil: the namespace's own table.
	Flows       conntrack.Table
	SpillEvery  time.Duration
	LockTimeout time.Duration
	Log         *slog.Logger
	// Backend names the backend in use, for the start line of the log.
	Backend string
	// Resync is how often the canary looks (it costs no process); the
	// quick drift check runs when it sees a change and at least every 10
	// seconds, a full read every FullResync.
	Resync, FullResync time.Duration
	// Settle is how long a burst of events must be quiet before a
	// reconcile; 0 does not wait.
	Settle time.Duration
	// VerifyEvery is how often a real flow per rule is checked (0:
	// never), through Verify, which may also send to Probes.
	VerifyEvery time.Duration
	Verify      verify.Host
	Probes      []netip.Addr
	// ActivateAfter is how long a standby rule whose address arrived stays
	// held when nobody activates it sooner (see standby.go): a pair
	// without the HA hook still works. 0 activates at once.
	ActivateAfter time.Duration
	// HealthFile, when set, is kept for probes (egress-snat health): its
	// time is the last turn of the loop, its first line "ready" or "not
	// ready: WHY" after the last reconcile.
	HealthFile string
	// Events subscribes to changes of the host until done is closed,
	// calling changed with a reason for each; nil is Netlink (address,
	// link and route changes). Unit tests give one of their own.
	Events func(done <-chan struct{}, changed func(reason string)) error
	// Commands, when set, serves the CLI's commands on the network
	// namespace's socket in APIDir (snat.LockDir when empty): see
	// api.go. AllowPeer is the peer check (nil: api.Privileged), and
	// Refusal what a peer it refuses is told.
	Commands  Commands
	APIDir    string
	AllowPeer func(api.Peer) bool
	Refusal   string
}

// DefaultSpillEvery is how often the daemon reads conntrack for its spill
// rules: ports run out over seconds, and a busy host's table is large.
const DefaultSpillEvery = time.Second

// ErrStopped is what Reconcile and Reload return once the daemon stopped.
var ErrStopped = errors.New("the daemon stopped")

// Daemon keeps the host converged: see the package comment. Build it with
// New, run it with Run; Reconcile and Reload may be called from any
// goroutine.
type Daemon struct {
	m           *snat.Manager
	router      Router
	conntrack   Conntrack
	lockTimeout time.Duration
	path        string
	// file is the desired state as read, checked; its intents are made
	// only to resolve them (see config.LoadIntents).
	file    *config.File
	log     *slog.Logger
	backend string
	events  func(done <-chan struct{}, changed func(string)) error
	resync  time.Duration
	settle  time.Duration
	// health tells probes how the loop and the last reconcile went.
	health *healthFile
	// verifyEvery is how often a real flow per rule is checked; 0: never.
	verifyEvery time.Duration
	verify      verify.Host
	// probes are the --probe addresses verify may send to, and
	// verifySkipSaid whether the rules it cannot verify were logged.
	probes         []netip.Addr
	verifySkipSaid bool
	// plan is the last reconcile's plan: its Desired entries and Chains
	// are what the kernel should hold, and wantRules our ip rules, for the
	// canary. Nothing else of a reconcile is kept.
	plan snat.Plan
	// base is the file as last resolved: plan's Desired without the spill
	// entries, which spill adds while they last (spill.go).
	base      []snat.Entry
	spill     spiller
	wantRules map[snat.Family][]routes.IPRule
	applies   int
	// leftOut counts the rules the last resolve left out, by cause.
	leftOut map[string]int
	// stamp is the version of the file that file was read from.
	stamp fileStamp
	// standby is what the daemon knows of the standby rules' addresses.
	standby standby
	// gens are the table generations the canary last saw.
	gens                  map[snat.Family]uint64
	resolve               atomic.Bool // the host changed since the last resolve
	lastQuick, lastFull   time.Time
	quickEvery, fullEvery time.Duration

	// trigger holds the reason of the next reconcile, reloads that of the
	// next reload of the file: one pending of each covers every request
	// until it runs.
	trigger, reloads chan string
	// written is the backend's part of the last plan written, by a
	// reconcile or by a command the daemon ran (nil: not known, the next
	// read reads everything); commands' reads trust it (api.go).
	written snat.NATPlan
	// hostChanged says the host changed since the router last forgot
	// what it cached: a command resolves against the host as it is.
	hostChanged atomic.Bool
	// The API: what runs a request, and the requests for the loop;
	// loopDone is closed when the loop has ended.
	commands  Commands
	apiDir    string
	allowPeer func(api.Peer) bool
	refusal   string
	requests  chan *job
	loopDone  chan struct{}

	// mu guards what callers of Reconcile and Reload wait on: waiting is
	// answered by the next reconcile that starts, reloading by the next
	// reload; stopped refuses new ones.
	mu                 sync.Mutex
	waiting, reloading []chan<- error
	stopped            bool
}

// New builds a daemon from c. It removes a health file left by an earlier
// run, so a probe waits for this run's first reconcile.
func New(c Config) (*Daemon, error) {
	if c.File == nil {
		return nil, fmt.Errorf("reconcile: no desired state read from %s", c.Path)
	}
	health, err := newHealthFile(c.HealthFile)
	if err != nil {
		return nil, err
	}
	d := &Daemon{
		m: c.Manager, router: c.Router, conntrack: c.Conntrack, lockTimeout: c.LockTimeout,
		path: c.Path, file: c.File, log: c.Log, backend: c.Backend, events: c.Events,
		resync: c.Resync, settle: c.Settle, health: health,
		verifyEvery: c.VerifyEvery, verify: c.Verify, probes: c.Probes,
		quickEvery: max(10*time.Second, c.Resync), fullEvery: c.FullResync,
		standby: standby{after: c.ActivateAfter},
		trigger: make(chan string, 1), reloads: make(chan string, 1),
		commands: c.Commands, apiDir: c.APIDir, allowPeer: c.AllowPeer, refusal: c.Refusal,
		requests: make(chan *job), loopDone: make(chan struct{}),
	}
	if d.apiDir == "" {
		d.apiDir = snat.LockDir
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	d.spill = spiller{flows: c.Flows, log: d.log, every: c.SpillEvery}
	if d.spill.every == 0 {
		d.spill.every = DefaultSpillEvery
	}
	if d.spill.flows == nil {
		d.spill.flows = conntrack.Netlink{}
	}
	if d.events == nil {
		d.events = d.netlinkEvents
	}
	return d, nil
}

// Reconcile makes the daemon converge now, for reason: it looks the host
// up again (its addresses and routes may have changed: an HA notify hook,
// a request on a socket) and writes what differs. A request made while
// one waits is served by the same reconcile. Being asked from outside, it
// also activates the standby rules whose address is here (standby.go). It
// returns that reconcile's error once it ran, ctx's error when ctx ends
// first, or ErrStopped.
func (d *Daemon) Reconcile(ctx context.Context, reason string) error {
	// Asked for before the waiter is counted: a reconcile that answers
	// it resolves again.
	d.standby.activate.Store(true)
	d.resolve.Store(true)
	done := make(chan error, 1)
	if !d.await(&d.waiting, done) {
		return ErrStopped
	}
	d.kick(reason)
	return d.wait(ctx, done)
}

// Reload reads the file again, as SIGHUP does (a bad file is logged and
// the previous desired state kept), then reconciles as Reconcile does,
// activating the standby rules whose address is here: the HA hook sends
// SIGHUP once conntrackd committed the peer's connections. trigger names
// what asked ("hangup"). It returns the reload's error, or the
// reconcile's.
func (d *Daemon) Reload(ctx context.Context, trigger string) error {
	d.standby.activate.Store(true)
	done := make(chan error, 1)
	if !d.await(&d.reloading, done) {
		return ErrStopped
	}
	d.requestReload(trigger)
	return d.wait(ctx, done)
}

// requestReload asks the loop to read the file again; one pending reload
// reads it as it is when it runs.
func (d *Daemon) requestReload(trigger string) {
	select {
	case d.reloads <- trigger:
	default:
	}
}

// kick asks the loop for a reconcile.
func (d *Daemon) kick(reason string) {
	select {
	case d.trigger <- reason:
	default: // one pending reconcile covers every event until it runs
	}
}

// changed is a change of the host or the file: the intents must be
// resolved again. Drift the canary saw only needs the last desired state
// written back, which at 100,000 destinations is most of the repair time
// saved.
func (d *Daemon) changed(reason string) {
	d.resolve.Store(true)
	d.hostChanged.Store(true)
	d.kick(reason)
}

// await adds done to a list of waiters, unless the daemon stopped.
func (d *Daemon) await(list *[]chan<- error, done chan<- error) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopped {
		return false
	}
	*list = append(*list, done)
	return true
}

func (d *Daemon) wait(ctx context.Context, done <-chan error) error {
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// take empties a list of waiters and returns them.
func (d *Daemon) take(list *[]chan<- error) []chan<- error {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := *list
	*list = nil
	return out
}

func answer(waiters []chan<- error, err error) {
	for _, w := range waiters {
		w <- err // buffered: never blocks
	}
}

// stop refuses new requests and answers those waiting.
func (d *Daemon) stop() {
	d.mu.Lock()
	d.stopped = true
	waiting := append(d.waiting, d.reloading...)
	d.waiting, d.reloading = nil, nil
	d.mu.Unlock()
	answer(waiting, ErrStopped)
}

// Run applies the file, then keeps the host converged until ctx ends; the
// rules stay in place then. It returns an error when it cannot start (the
// host's events cannot be subscribed to) or when the file is refused by
// the first reconcile (bad input); a failed write is logged and retried.
func (d *Daemon) Run(ctx context.Context) error {
	defer d.stop()
	defer close(d.loopDone)
	done := make(chan struct{})
	defer close(done)
	d.resolve.Store(true)
	if err := d.events(done, d.changed); err != nil {
		return err
	}
	watchFile(done, d.path, d.requestReload, d.log) // a changed file reloads like SIGHUP
	stopAPI := d.serveAPI(ctx)
	defer stopAPI()

	d.log.Info("watch started", "file", d.path, "backend", d.backend, "resync", d.resync)
	waiters := d.take(&d.waiting)
	err := d.reconcile("start")
	d.health.reconciled(err)
	answer(waiters, err)
	if err != nil {
		var inv *snat.InvalidError
		if errors.As(err, &inv) {
			return err
		}
		d.log.Error("initial apply failed; retrying on the next event or resync", "err", err)
	}
	tick := time.NewTicker(d.resync)
	defer tick.Stop()
	verifyTick, stopVerify := d.verifyTicker()
	defer stopVerify()
	for {
		select {
		case <-ctx.Done():
			d.log.Info("stopping; rules stay in place", "applies", d.applies)
			return nil
		case trigger := <-d.reloads: // SIGHUP, or the file changed (watchfile.go)
			waiters := d.take(&d.reloading)
			file, n, err := load(d.path)
			if err != nil {
				d.log.Error("reload: keeping the previous desired state", "trigger", trigger, "err", err)
				answer(waiters, err)
				continue
			}
			d.file = file
			d.log.Info("reload: file re-read", "trigger", trigger, "file", d.path, "destinations", n)
			// Answered by the reconcile of the new file.
			d.mu.Lock()
			d.waiting = append(d.waiting, waiters...)
			d.mu.Unlock()
			d.changed("reload (" + trigger + ")")
		case <-tick.C:
			d.health.beat()
			if reason := d.canary(); reason != "" {
				d.kick(reason)
			} else if d.spill.tick(d.base) {
				d.kick("spill")
			}
		case <-verifyTick:
			d.verifyCanary()
		case j := <-d.requests: // a command sent to the socket (api.go)
			j.done <- d.serve(ctx, j)
			// A command reads and renders the whole file as a
			// reconcile does: give that back once it is answered, or
			// the heap stays at the memory limit (250 MB at 100,000
			// destinations instead of 40 when idle).
			debug.FreeOSMemory()
		case reason := <-d.trigger:
			// Asked from outside (the HA hook, after conntrackd's
			// commit), it does not settle: the clients' new
			// connections wait on it.
			if !d.standby.activate.Load() {
				reason = d.coalesce(ctx, reason)
			}
			waiters := d.take(&d.waiting)
			err := d.reconcile(reason)
			d.health.reconciled(err)
			answer(waiters, err)
			if err != nil {
				d.log.Error("reconcile failed; retrying on the next event or resync", "reason", reason, "err", err)
				// The canary took the generations it saw before the
				// failed write as seen: forget them, so that it looks
				// again on its next tick instead of the quick tier's.
				d.gens = nil
			}
		}
	}
}

// coalesce waits for a burst of triggers to end, so that the dozen route
// and address events of one `ip addr del` cause one apply.
func (d *Daemon) coalesce(ctx context.Context, first string) string {
	if d.settle == 0 {
		return first
	}
	n := 1
	timer := time.NewTimer(d.settle)
	defer timer.Stop()
	for {
		select {
		case <-d.trigger:
			n++
		case <-timer.C:
			if n > 1 {
				return fmt.Sprintf("%s (+%s)", first, snat.Plural(n-1, "more event"))
			}
			return first
		case <-ctx.Done():
			return first
		}
	}
}

// load reads and checks the file: the file, kept, and the number of its
// intents, which are dropped.
func load(path string) (*config.File, int, error) {
	f, intents, err := config.LoadIntents(path)
	return f, len(intents), err
}
