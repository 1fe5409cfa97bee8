package reconcile

import (
	"maps"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/egress-snat/egress-snat/snat"
)

// standby is what the daemon knows of the addresses of standby rules (see
// snat/standby.go): which were away at the last resolve, and which arrived
// since and are held until they are activated. An address arrives when it
// was away; one the host has when the daemon starts is active at once, so
// a restart of the daemon on the active gateway holds nothing.
//
// The hold must outlast the arrival by as long as conntrackd takes to
// commit the peer's connections into the kernel: a packet of a taken-over
// connection that comes before the commit would be translated afresh and
// reset by the far side. Whoever knows the commit is done activates: the
// HA hook's SIGHUP (Reload), or any Reconcile asked from outside. after is
// the fallback, for a pair without the hook.
type standby struct {
	after    time.Duration
	away     map[netip.Addr]bool // nil until the first resolve
	arrived  map[netip.Addr]time.Time
	activate atomic.Bool // an outside request came: activate what arrived
	timer    *time.Timer
}

// holdArrived updates what the daemon knows from a fresh resolve, logs the
// transitions, and holds in desired the standby entries whose address
// arrived and is not activated yet.
func (d *Daemon) holdArrived(desired []snat.Entry) {
	s := &d.standby
	now := time.Now()
	asked := s.activate.Swap(false)
	away, here := map[netip.Addr]int{}, map[netip.Addr]int{}
	for _, e := range desired {
		if !e.Standby || len(e.To) == 0 {
			continue
		}
		if e.Hold {
			away[e.To[0]]++
		} else {
			here[e.To[0]]++
		}
	}
	if s.arrived == nil {
		s.arrived = map[netip.Addr]time.Time{}
	}
	for _, a := range slices.SortedFunc(maps.Keys(away), netip.Addr.Compare) {
		if !s.away[a] {
			d.log.Info("standing by: the address is not here (the peer holds it); its rules stay, new connections of their clients are dropped", "address", a, "rules", away[a])
		}
		delete(s.arrived, a)
	}
	for _, a := range slices.SortedFunc(maps.Keys(here), netip.Addr.Compare) {
		if s.away[a] && s.after > 0 {
			s.arrived[a] = now
			d.log.Info("standby address arrived; its rules stay held until activated", "address", a, "rules", here[a], "fallback", s.after)
		}
	}
	for _, a := range slices.SortedFunc(maps.Keys(s.arrived), netip.Addr.Compare) {
		since := s.arrived[a]
		switch {
		case here[a] == 0:
			delete(s.arrived, a) // left again before it was activated
		case asked:
			delete(s.arrived, a)
			d.log.Info("standby rules activated", "address", a, "rules", here[a], "by", "request", "held", now.Sub(since).Round(time.Millisecond))
		case now.Sub(since) >= s.after:
			delete(s.arrived, a)
			d.log.Warn("standby rules activated by the fallback: nobody activated them (is the HA hook installed?)", "address", a, "rules", here[a], "held", now.Sub(since).Round(time.Millisecond))
		}
	}
	s.away = map[netip.Addr]bool{}
	for a := range away {
		s.away[a] = true
	}
	snat.HoldWhile(desired, func(a netip.Addr) bool { _, held := s.arrived[a]; return held })
	d.scheduleActivation(now)
}

// scheduleActivation sets the fallback timer for the earliest held arrival.
func (d *Daemon) scheduleActivation(now time.Time) {
	s := &d.standby
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	if len(s.arrived) == 0 {
		return
	}
	first := slices.MinFunc(slices.Collect(maps.Values(s.arrived)), time.Time.Compare)
	s.timer = time.AfterFunc(first.Add(s.after).Sub(now), func() { d.changed("standby fallback after " + s.after.String()) })
}
