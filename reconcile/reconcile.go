package reconcile

import (
	"maps"
	"net/netip"
	"runtime/debug"
	"slices"
	"time"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// reconcile resolves the desired state against the host as it is now and
// applies it through the one write path.
func (d *Daemon) reconcile(reason string) error {
	var skipped []snat.Skipped
	start := time.Now()
	again := d.resolve.Swap(false) || d.plan.Desired == nil
	if again {
		d.hostChanged.Store(false)
		d.router.Forget() // addresses and routes may have changed
	}
	req := snat.Request{LockTimeout: d.lockTimeout}
	if !again {
		// Repairing drift: what was written last is known; reading the
		// sets' members again is most of a repair's time at 100k
		// destinations.
		req.Known = d.written
	}
	req.Desired = func(st *snat.State) ([]snat.Entry, error) {
		// Under the lock a --permanent run's file and kernel agree: a file
		// replaced since the last read is read now, not after the canary
		// has undone the run with the old one.
		if d.reloadIfChanged() {
			again = true
		}
		if !again {
			return d.spill.withSpill(d.keepPeriods(st, d.base)), nil
		}
		intents, err := d.file.Intents()
		if err != nil {
			return nil, &snat.InvalidError{Err: err}
		}
		desired, s, err := snat.ResolveAvailable(d.router, intents)
		skipped = s
		if err != nil {
			return desired, err
		}
		d.holdArrived(desired)
		d.base = desired
		if !d.spill.seeded {
			// A daemon that starts takes over the spills it finds.
			d.spill.seed(st.Entries(), desired)
			d.spill.tick(desired)
		}
		return d.spill.withSpill(d.keepPeriods(st, desired)), nil
	}
	_, plan, err := d.m.Update(req)
	if err != nil {
		if again {
			d.resolve.Store(true)
		}
		d.written = nil // a write may have failed part way: read it all next
		return err
	}
	d.written = snat.Remembered(plan.NAT)
	if again {
		d.reportSkipped(skipped)
	}
	previous := d.plan.Desired
	d.plan = plan
	d.plan.Steps, d.plan.Changes = nil, nil // written; not needed again
	d.wantRules = map[snat.Family][]routes.IPRule{}
	for _, f := range snat.Families {
		d.wantRules[f] = plan.Routing[f].Rules
	}
	// Our own write moved the generations: start from them.
	if gens, err := d.m.Generations(); err == nil {
		d.gens = gens
	}
	d.lastQuick, d.lastFull = time.Now(), time.Now() // Update read everything
	// A reconcile of a large file reads and renders far more than the
	// daemon keeps; give that back, so an idle daemon stays small.
	defer debug.FreeOSMemory()
	if plan.Empty() {
		d.log.Debug("in sync", "reason", reason)
		return nil
	}
	d.applies++
	d.log.Info("converged", "reason", reason, "summary", plan.Summary(), "took", time.Since(start).Round(time.Millisecond))
	d.flushVanished(previous, plan.Desired)
	return nil
}

// keepPeriods gives a period's entry (snat's pool.go) the address
// installed, else the one the daemon wrote last: a rule lost behind its
// back comes back with its period's address, and a rotate by another
// process (installed) wins over what the daemon remembers.
func (d *Daemon) keepPeriods(st *snat.State, desired []snat.Entry) []snat.Entry {
	return snat.KeepPeriods(desired, st.Entries(), d.plan.Desired)
}

// reportSkipped warns of each cause of rules left out (an address that
// left the host, an interface that went down) when it first appears, with
// the number of rules it takes out, and says when it is gone, instead of a
// line per destination, or per resolve while the cause lasts: the log of
// a flapping address does not grow with the number of destinations.
func (d *Daemon) reportSkipped(skipped []snat.Skipped) {
	now := map[string]int{}
	first := map[string]snat.Match{}
	for _, s := range skipped {
		if now[s.Cause] == 0 {
			first[s.Cause] = s.Match
		}
		now[s.Cause]++
	}
	for _, cause := range slices.Sorted(maps.Keys(now)) {
		if d.leftOut[cause] == 0 {
			d.log.Warn("rule left out until its address or route returns", "why", cause, "rules", now[cause], "first", first[cause].String())
		}
	}
	for _, cause := range slices.Sorted(maps.Keys(d.leftOut)) {
		if now[cause] == 0 {
			d.log.Info("rule left out is back", "was", cause, "rules", d.leftOut[cause])
		}
	}
	d.leftOut = now
}

// flushVanished deletes the conntrack entries of flows NATed to a source
// that left the host: they would otherwise keep using it until they end.
// One deletion (one pass over the conntrack table) and one line per
// address, for all the destinations it served.
func (d *Daemon) flushVanished(previous, now []snat.Entry) {
	current := map[snat.Match]snat.Entry{}
	for _, e := range now {
		current[e.Match] = e
	}
	gone := map[netip.Addr]bool{} // by address: left the host
	served := map[netip.Addr][]netip.Prefix{}
	var order []netip.Addr
	for _, old := range previous {
		if old.Standby {
			// Its connections moved to the peer with the address: the
			// peer commits them from conntrackd's cache, and deleting
			// them here would be replicated to it as deletions racing
			// that commit. conntrackd's purge clears them later.
			continue
		}
		// A period's address is never the host's (HostSources): it
		// cannot vanish, and its connections keep it, as a rotate's do.
		for _, a := range old.HostSources() {
			if n, ok := current[old.Match]; ok && len(n.To) > 0 && n.To[0] == a {
				continue
			}
			left, known := gone[a]
			if !known {
				_, err := d.router.Owner(a)
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
		n, err := d.conntrack.DeleteBinding(conntrack.Binding{Dsts: dsts, To: a})
		if err != nil {
			d.log.Warn("deleting conntrack entries of a vanished address failed", "address", a, "rules", len(dsts), "err", err)
			continue
		}
		d.log.Info("deleted conntrack entries bound to a vanished address", "address", a, "entries", n, "rules", len(dsts))
	}
}
