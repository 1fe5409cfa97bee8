package permanent

import (
	"net/netip"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// SpecOf is the file rule that reproduces an installed entry through
// apply -f: its destination, its match, and its sources (spread when there
// are several: a failover list is installed as the one address in use). An
// entry that keeps the natural source names it as its source, which apply
// turns back into a kept natural source. A routed entry is a rule with
// method: route (and its via). A pool's source is its prefix and sticky.
// ok is false for an entry the file cannot state: one keeping the source
// of forwarded traffic, which has no natural source to name, and a spill
// entry, which watch makes and removes by itself (snat/spill.go).
func SpecOf(e snat.Entry) (s config.Spec, ok bool) {
	if e.IsSpill() {
		return s, false
	}
	to := e.To
	if e.IsPool() {
		to = nil // a period's address is the kernel's, not the file's
	}
	if e.Keep() {
		if !e.Natural.IsValid() {
			return s, false
		}
		to = []netip.Addr{e.Natural}
	}
	s = config.Spec{
		Match:  config.Match{Sender: e.Sender, Out: e.Out},
		Dst:    []netip.Prefix{e.Dst},
		To:     to,
		Spread: len(to) > 1,
		Via:    e.Via,
		Pool:   e.Pool,
		Sticky: e.Sticky,
		Ports:  e.Ports,
	}
	if e.Routed {
		s.Method = snat.MethodRoute
	}
	return s, true
}

// intentSpec is the file rule of an intent, as the operator gave it (no
// resolved interface unless --out was given).
func intentSpec(in snat.Intent) config.Spec {
	return config.Spec{Match: config.Match{Sender: in.Sender, Out: in.Out}, Dst: []netip.Prefix{in.Dst},
		To: in.To, Spread: in.Spread, Via: in.Via, Method: in.Method, Pool: in.Pool, Sticky: in.Sticky, Ports: in.Ports, Spill: in.Spill}
}

// Put is set's edit of the permanent file: each intent becomes the rule of
// its destination.
func Put(intents []snat.Intent) func(*config.Doc) {
	return func(d *config.Doc) {
		for _, in := range intents {
			d.Put(intentSpec(in))
		}
	}
}

// Clear is clear's edit: no rule is left.
func Clear(d *config.Doc) { d.Clear() }

// Rotate is rotate's edit: each rule of a moved sender and destination
// gets the address it moved to, so that a reboot does not undo the
// rotation; one the file does not name yet gets a rule of its own. A
// period's move makes the rule the pool's, per period: its address is the
// kernel's (a reboot starts a new period). moves is read when the edit
// runs, after the rotation's Desired found them.
func Rotate(moves *[]snat.Move) func(*config.Doc) {
	return func(d *config.Doc) {
		for _, m := range *moves {
			if m.Pool.IsValid() {
				d.Put(config.Spec{Match: config.Match{Sender: m.Match.Sender}, Dst: []netip.Prefix{m.Match.Dst}, Pool: m.Pool, Sticky: snat.StickyPeriod})
				continue
			}
			if !d.ReplaceSource(m.Match.Sender, m.Match.Dst, m.To) {
				d.Put(config.Spec{Match: config.Match{Sender: m.Match.Sender}, Dst: []netip.Prefix{m.Match.Dst}, To: []netip.Addr{m.To}})
			}
		}
	}
}
