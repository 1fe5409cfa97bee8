package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netlink"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

var watchCommand = &cli.Command{
	Name:      "watch",
	Usage:     "keep the host converged on a desired-state file (run by systemd)",
	UsageText: "egress-snat [--config PATH] watch [-f FILE] [--resync 500ms] [--settle 100ms] [--log-format text|json] [--health-file FILE]",
	Description: `Applies FILE (default: the permanent file, --config) at start, then keeps
the host converged:

   - on netlink address, link and route events (subscribed, not polled):
     routes and natural sources are looked up again;
   - every --resync, a canary that costs no process: the nftables
     generation (iptables-nft) or the nat table's shape (iptables-legacy),
     and egress-snat's ip rules. When they moved, and every 10 seconds in
     any case, it reads the nat chain, the jump and the sets' entry counts
     and re-applies when they differ (a firewalld reload or Docker restart
     that flushed POSTROUTING, a deleted chain, a rule inserted ahead of
     ours, a deleted ip rule);
   - every --full-resync, a full read, set members included (a member
     deleted or swapped by hand);
   - when FILE changes (its directory is watched with inotify, so an
     editor's or Ansible's rename and a Kubernetes ConfigMap's ..data
     symlink swap are seen), or on SIGHUP, FILE is read again (a bad file
     is logged and the old one kept). Each reconcile also looks, under
     the lock, whether the file was replaced, so a --permanent run that
     changed the kernel and the file is never undone with the old file.

Bursts of events are coalesced (--settle) into one apply. When a rule's
source address leaves the host, its rule is taken out (or moved to the next
address of its failover list) and the conntrack entries bound to the old
address are deleted, so no traffic keeps leaving from an address the host no
longer has; when the address returns, the rule is restored.

Logs go to stderr (the journal) with log/slog. SIGTERM or SIGINT stops it
cleanly and leaves the rules in place. scripts/egress-snat.service runs it
at boot, so the desired state survives reboots.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "file", Aliases: []string{"f"}, TakesFile: true, Usage: "desired-state YAML `FILE` (default: the permanent file, --config)"},
		&cli.DurationFlag{Name: "resync", Value: 500 * time.Millisecond, Usage: "how often the canary looks (it costs no process; half a second keeps a repair under a second)"},
		&cli.DurationFlag{Name: "settle", Value: 100 * time.Millisecond, Usage: "how long to wait for a burst of events to end before applying"},
		&cli.DurationFlag{Name: "full-resync", Value: 5 * time.Minute, Usage: "how often to compare everything, set members included"},
		enum(&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json; durations are Go duration strings in both (\"took\":\"12ms\")"}, "text", "json"),
		verifyEveryFlag,
		probeFlag,
		healthFileFlag,
	},
	Action: func(c *cli.Context) error {
		path, err := watchPath(c)
		if err != nil {
			return err
		}
		handler, err := newLogHandler(c.App.ErrWriter, c.String("log-format"))
		if err != nil {
			return err
		}
		if c.Duration("resync") <= 0 || c.Duration("settle") < 0 || c.Duration("full-resync") <= 0 {
			return usageError("--resync and --full-resync must be positive and --settle not negative")
		}
		debug.SetGCPercent(100) // long-running: the default suits it
		file, _, err := loadWatched(path)
		if err != nil {
			return err
		}
		probes, err := parseProbes(c)
		if err != nil {
			return err
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		health, err := newWatchHealth(c.String("health-file"))
		if err != nil {
			return err
		}
		w := &watcher{e: e, probes: probes, path: path, file: file, log: slog.New(handler), settle: c.Duration("settle"), health: health,
			quickEvery: max(10*time.Second, c.Duration("resync")), fullEvery: c.Duration("full-resync"), verifyEvery: c.Duration("verify-every")}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		return w.run(ctx, c.Duration("resync"))
	},
}

type watcher struct {
	e    *env
	path string
	// file is the desired state as read, checked; its intents are made
	// only to resolve them (see loadFile).
	file   *config.File
	log    *slog.Logger
	settle time.Duration
	// health tells probes how the loop and the last reconcile went.
	health *watchHealth
	// verifyEvery is how often a real flow per rule is checked; 0: never.
	verifyEvery time.Duration
	// probes are the --probe addresses verify may send to, and
	// verifySkipSaid whether the rules it cannot verify were logged.
	probes         []netip.Addr
	verifySkipSaid bool
	// plan is the last reconcile's plan: its Desired entries and Chains
	// are what the kernel should hold, and wantRules our ip rules, for the
	// canary. Nothing else of a reconcile is kept.
	plan      snat.Plan
	wantRules map[snat.Family][]routes.Rule
	applies   int
	// leftOut counts the rules the last resolve left out, by cause.
	leftOut map[string]int
	// stamp is the version of the file that file was read from.
	stamp fileStamp
	// gens are the table generations the canary last saw.
	gens                  map[snat.Family]uint64
	resolve               atomic.Bool // the host changed since the last resolve
	lastQuick, lastFull   time.Time
	quickEvery, fullEvery time.Duration
}

func (w *watcher) run(ctx context.Context, resync time.Duration) error {
	trigger := make(chan string, 1)
	kick := func(reason string) {
		select {
		case trigger <- reason:
		default: // one pending reconcile covers every event until it runs
		}
	}
	done := make(chan struct{})
	defer close(done)
	// Host changes (netlink events, a reloaded file) need the intents
	// resolved again; drift the canary saw only needs the last desired
	// state written back, which at 100,000 destinations is most of the
	// repair time saved.
	changed := func(reason string) { w.resolve.Store(true); kick(reason) }
	w.resolve.Store(true)
	if err := w.subscribe(done, changed); err != nil {
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	watchFile(done, w.path, hup, w.log) // a changed file reloads like SIGHUP

	w.log.Info("watch started", "file", w.path, "backend", w.e.flavour, "resync", resync)
	err := w.reconcile("start")
	w.health.reconciled(err)
	if err != nil {
		var inv *snat.InvalidError
		if errors.As(err, &inv) {
			return err
		}
		w.log.Error("initial apply failed; retrying on the next event or resync", "err", err)
	}
	tick := time.NewTicker(resync)
	defer tick.Stop()
	verifyTick, stopVerify := w.verifyTicker()
	defer stopVerify()
	for {
		select {
		case <-ctx.Done():
			w.log.Info("stopping; rules stay in place", "applies", w.applies)
			return nil
		case sig := <-hup: // SIGHUP, or the file changed (watchfile.go)
			file, n, err := loadWatched(w.path)
			if err != nil {
				w.log.Error("reload: keeping the previous desired state", "trigger", sig.String(), "err", err)
				continue
			}
			w.file = file
			w.log.Info("reload: file re-read", "trigger", sig.String(), "file", w.path, "destinations", n)
			changed("reload (" + sig.String() + ")")
		case <-tick.C:
			w.health.beat()
			if reason := w.canary(); reason != "" {
				kick(reason)
			}
		case <-verifyTick:
			w.verifyCanary()
		case reason := <-trigger:
			reason = w.coalesce(ctx, trigger, reason)
			err := w.reconcile(reason)
			w.health.reconciled(err)
			if err != nil {
				w.log.Error("reconcile failed; retrying on the next event or resync", "reason", reason, "err", err)
			}
		}
	}
}

// coalesce waits for a burst of triggers to end, so that the dozen route
// and address events of one `ip addr del` cause one apply.
func (w *watcher) coalesce(ctx context.Context, trigger <-chan string, first string) string {
	if w.settle == 0 {
		return first
	}
	n := 1
	timer := time.NewTimer(w.settle)
	defer timer.Stop()
	for {
		select {
		case <-trigger:
			n++
		case <-timer.C:
			if n > 1 {
				return fmt.Sprintf("%s (+%s)", first, plural(n-1, "more event", "more events"))
			}
			return first
		case <-ctx.Done():
			return first
		}
	}
}

// subscribe turns netlink address, link and route changes into triggers.
func (w *watcher) subscribe(done chan struct{}, kick func(string)) error {
	onErr := func(err error) {
		select {
		case <-done: // shutting down: the sockets were closed on purpose
		default:
			w.log.Warn("netlink subscription error", "err", err)
		}
	}
	addrs := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribing to address changes: %w", err)
	}
	links := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribing to link changes: %w", err)
	}
	routes := make(chan netlink.RouteUpdate, 64)
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribing to route changes: %w", err)
	}
	go func() {
		for {
			select {
			case u, ok := <-addrs:
				if !ok {
					return
				}
				verb := "removed"
				if u.NewAddr {
					verb = "added"
				}
				kick(fmt.Sprintf("address %s %s", u.LinkAddress.IP, verb))
			case _, ok := <-links:
				if !ok {
					return
				}
				kick("link change")
			case _, ok := <-routes:
				if !ok {
					return
				}
				kick("route change")
			}
		}
	}()
	return nil
}

// canary is the periodic check: does the kernel still hold what the last
// reconcile wrote? It catches what netlink does not report: iptables and
// ipset changes by other programs. Most ticks cost two netlink requests;
// see the command's description for the schedule.
func (w *watcher) canary() string {
	now := time.Now()
	if now.Sub(w.lastFull) >= w.fullEvery {
		w.lastFull, w.lastQuick = now, now
		return w.fullCheck()
	}
	gens, err := w.e.mgr.Generations()
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	rulesMoved, err := w.rulesDiffer()
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	if !rulesMoved && maps.Equal(gens, w.gens) && now.Sub(w.lastQuick) < w.quickEvery {
		return ""
	}
	if len(w.plan.Lingering()) > 0 {
		// What is kept for live connections goes once they end: look
		// whether they have, on the quick tier's schedule.
		w.lastQuick = now
		return "lingering: " + strings.Join(w.plan.Lingering(), "; ")
	}
	w.gens, w.lastQuick = gens, now
	drift, err := w.e.mgr.QuickDrift(w.plan)
	switch {
	case err != nil:
		return "canary read failed: " + err.Error()
	case drift != "":
		return "drift: " + drift
	}
	return ""
}

// rulesDiffer compares our ip rules with what the last reconcile wrote.
func (w *watcher) rulesDiffer() (bool, error) {
	if w.e.mgr.Routing == nil {
		return false, nil
	}
	for _, f := range snat.Families {
		have, err := w.e.mgr.Routing.Rules(f == snat.IPv4)
		if err != nil {
			return false, err
		}
		if !slices.Equal(have, w.wantRules[f]) {
			return true, nil
		}
	}
	return false, nil
}

// fullCheck reads everything, set members included, and plans.
func (w *watcher) fullCheck() string {
	st, err := w.e.mgr.Read()
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	p, err := w.e.mgr.Plan(st, w.plan.Desired)
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	if !p.Empty() {
		for _, f := range w.e.mgr.Diagnose(st, w.plan.Desired) {
			return "drift: " + f.Kind + ": " + f.Detail
		}
		return "drift"
	}
	return ""
}

// reconcile resolves the desired state against the host as it is now and
// applies it through the one write path.
func (w *watcher) reconcile(reason string) error {
	var skipped []snat.Skipped
	start := time.Now()
	again := w.resolve.Swap(false) || w.plan.Desired == nil
	if again {
		w.e.sel.Forget() // addresses and routes may have changed
	}
	req := snat.Request{LockTimeout: w.e.lockTimeout}
	if !again {
		// Repairing drift: what was written last is known; reading the
		// sets' members again is most of a repair's time at 100k
		// destinations.
		req.Known = w.plan.NAT
	}
	req.Desired = func(*snat.State) ([]snat.Entry, error) {
		// Under the lock a --permanent run's file and kernel agree: a file
		// replaced since the last read is read now, not after the canary
		// has undone the run with the old one.
		if w.reloadIfChanged() {
			again = true
		}
		if !again {
			return w.plan.Desired, nil
		}
		intents, err := w.file.Intents()
		if err != nil {
			return nil, &snat.InvalidError{Err: err}
		}
		desired, s, err := snat.ResolveAvailable(w.e.sel, intents)
		skipped = s
		return desired, err
	}
	_, plan, err := w.e.mgr.Update(req)
	if err != nil {
		if again {
			w.resolve.Store(true)
		}
		return err
	}
	if again {
		w.reportSkipped(skipped)
	}
	previous := w.plan.Desired
	w.plan = plan
	w.plan.Steps, w.plan.Changes = nil, nil // written; not needed again
	w.wantRules = map[snat.Family][]routes.Rule{}
	for _, f := range snat.Families {
		w.wantRules[f] = plan.Routing[f].Rules
	}
	// Our own write moved the generations: start from them.
	if gens, err := w.e.mgr.Generations(); err == nil {
		w.gens = gens
	}
	w.lastQuick, w.lastFull = time.Now(), time.Now() // Update read everything
	// A reconcile of a large file reads and renders far more than the
	// daemon keeps; give that back, so an idle daemon stays small.
	defer debug.FreeOSMemory()
	if plan.Empty() {
		w.log.Debug("in sync", "reason", reason)
		return nil
	}
	w.applies++
	w.log.Info("converged", "reason", reason, "summary", plan.Summary(), "took", time.Since(start).Round(time.Millisecond))
	w.flushVanished(previous, plan.Desired)
	return nil
}

// reportSkipped warns of each cause of rules left out (an address that
// left the host, an interface that went down) when it first appears, with
// the number of rules it takes out, and says when it is gone, instead of a
// line per destination, or per resolve while the cause lasts: the log of
// a flapping address does not grow with the number of destinations.
func (w *watcher) reportSkipped(skipped []snat.Skipped) {
	now := map[string]int{}
	first := map[string]snat.Match{}
	for _, s := range skipped {
		if now[s.Cause] == 0 {
			first[s.Cause] = s.Match
		}
		now[s.Cause]++
	}
	for _, cause := range slices.Sorted(maps.Keys(now)) {
		if w.leftOut[cause] == 0 {
			w.log.Warn("rule left out until its address or route returns", "why", cause, "rules", now[cause], "first", first[cause].String())
		}
	}
	for _, cause := range slices.Sorted(maps.Keys(w.leftOut)) {
		if now[cause] == 0 {
			w.log.Info("rule left out is back", "was", cause, "rules", w.leftOut[cause])
		}
	}
	w.leftOut = now
}

// flushVanished deletes the conntrack entries of flows NATed to a source
// that left the host: they would otherwise keep using it until they end.
// One deletion (one pass over the conntrack table) and one line per
// address, for all the destinations it served.
func (w *watcher) flushVanished(previous, now []snat.Entry) {
	current := map[snat.Match]snat.Entry{}
	for _, e := range now {
		current[e.Match] = e
	}
	gone := map[netip.Addr]bool{} // by address: left the host
	served := map[netip.Addr][]netip.Prefix{}
	var order []netip.Addr
	for _, old := range previous {
		for _, a := range old.To {
			if n, ok := current[old.Match]; ok && len(n.To) > 0 && n.To[0] == a {
				continue
			}
			left, known := gone[a]
			if !known {
				_, err := w.e.sel.Owner(a)
				left = err != nil
				gone[a] = left
				if left {
					order = append(order, a)
				}
			}
			if left {
				served[a] = append(served[a], old.Dst)
			}
		}
	}
	for _, a := range order {
		dsts := served[a]
		n, err := conntrack.DeleteBinding(w.e.nl, conntrack.Binding{Dsts: dsts, To: a})
		if err != nil {
			w.log.Warn("deleting conntrack entries of a vanished address failed", "address", a, "rules", len(dsts), "err", err)
			continue
		}
		w.log.Info("deleted conntrack entries bound to a vanished address", "address", a, "entries", n, "rules", len(dsts))
	}
}
