package snat

import (
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/egress-snat/egress-snat/selector"
)

// Order is how rotate picks the next pool member.
type Order string

const (
	OrderNext   Order = "next"
	OrderRandom Order = "random"
)

// NextSource picks the address to move to from current (the address new
// connections leave with now: the rule's, or the natural source when there
// is no rule). usable says which pool members are on the host now.
//
// With OrderNext it is the first usable member after current in pool order,
// wrapping around; when current is not in the pool, the first usable member.
// With OrderRandom it is a usable member other than current, chosen by rng.
// When current is the only usable member it stays. It reports false when no
// member is usable.
func NextSource(pool []netip.Addr, current netip.Addr, usable func(netip.Addr) bool, order Order, rng *rand.Rand) (netip.Addr, bool) {
	var ok []netip.Addr
	for _, a := range pool {
		if usable(a) {
			ok = append(ok, a)
		}
	}
	if len(ok) == 0 {
		return netip.Addr{}, false
	}
	if order == OrderRandom {
		others := slices.DeleteFunc(slices.Clone(ok), func(a netip.Addr) bool { return a == current })
		if len(others) == 0 {
			return current, true
		}
		return others[rng.IntN(len(others))], true
	}
	i := slices.Index(pool, current)
	if i < 0 {
		return ok[0], true
	}
	for step := 1; step <= len(pool); step++ {
		if a := pool[(i+step)%len(pool)]; usable(a) {
			return a, true
		}
	}
	return current, true
}

// Current returns the address new connections of exactly m's sender and
// destination leave with according to the installed entries: the managed
// entry's first source, or natural when m has no entry of its own or a
// pool's (whose addresses the kernel picks, none of them current).
func Current(installed []Entry, m Match, natural netip.Addr) netip.Addr {
	for _, e := range installed {
		if e.Sender == m.Sender && e.Dst == m.Dst && (m.Out == "" || e.Out == m.Out) && !e.Keep() && !e.IsPool() && !e.IsSpill() {
			return e.To[0]
		}
	}
	return natural
}

// Move is one match's rotation.
type Move struct {
	Match Match `json:"-"`
	// From is the address in use before, To the one after.
	From netip.Addr `json:"from"`
	To   netip.Addr `json:"to"`
	// Pool is the pool of a period's rotation (PlanPeriodRotation): To
	// is a new address of it.
	Pool             netip.Prefix `json:"pool,omitempty"`
	Skipped          []netip.Addr `json:"skipped,omitempty"`
	ConntrackDeleted *uint        `json:"conntrack_deleted,omitempty"`
}

// MarshalJSON flattens the match: {"sender", "dst", "out", "from", "to",
// ...}, with a --from sender's prefix as "from_prefix" ("from" is the
// address moved away from, as before senders existed).
func (m Move) MarshalJSON() ([]byte, error) {
	j := struct {
		Sender           string       `json:"sender"`
		FromPrefix       string       `json:"from_prefix,omitempty"`
		UID              *uint32      `json:"uid,omitempty"`
		Cgroup           string       `json:"cgroup,omitempty"`
		Dst              netip.Prefix `json:"dst"`
		Out              string       `json:"out"`
		From             netip.Addr   `json:"from"`
		To               netip.Addr   `json:"to"`
		Pool             string       `json:"pool,omitempty"`
		Skipped          []netip.Addr `json:"skipped,omitempty"`
		ConntrackDeleted *uint        `json:"conntrack_deleted,omitempty"`
	}{Sender: m.Match.Sender.kind().String(), Dst: m.Match.Dst, Out: m.Match.Out, From: m.From, To: m.To, Skipped: m.Skipped, ConntrackDeleted: m.ConntrackDeleted}
	if m.Pool.IsValid() {
		j.Pool = m.Pool.String()
	}
	j.FromPrefix, j.UID, j.Cgroup = m.Match.Sender.jsonFields()
	return json.Marshal(j)
}

// PlanRotation picks, for each match (sender and destination), the pool
// member after the address it uses now, and returns the moves and the
// intents that make them. Every pool member must be an address of the
// interface the match's traffic leaves by; a member no longer on the host
// is skipped and named in the move. It changes nothing.
func PlanRotation(r Router, st *State, pool []netip.Addr, targets []Match, order Order, rng *rand.Rand) ([]Move, []Intent, error) {
	installed := st.Entries()
	var moves []Move
	var intents []Intent
	for _, t := range targets {
		out := t.Out
		var ports Ports // the installed rule's port range goes along
		for _, en := range installed {
			if en.Sender == t.Sender && en.Dst == t.Dst && (t.Out == "" || en.Out == t.Out) {
				ports = en.Ports
				if t.Out == "" {
					out = en.Out
				}
			}
		}
		iface, natural, err := r.Natural(t.Dst, out)
		if err != nil {
			return nil, nil, hostErr(err, "--dst %s", t.Dst)
		}
		m := Move{Match: Match{Sender: t.Sender, Dst: t.Dst, Out: iface}}
		if t.Sender.Local() {
			m.From = Current(installed, m.Match, natural)
		} else {
			m.From = Current(installed, m.Match, netip.Addr{})
		}
		for _, a := range pool {
			owner, err := r.Owner(a)
			switch {
			case errors.Is(err, selector.ErrNotLocal):
				m.Skipped = append(m.Skipped, a)
			case err != nil:
				return nil, nil, hostErr(err, "pool member %s", a)
			case owner != iface:
				return nil, nil, Invalid("pool member %s is on %s, but traffic to %s leaves by %s", a, owner, t.Dst, iface)
			}
		}
		usable := func(a netip.Addr) bool { return !slices.Contains(m.Skipped, a) }
		next, ok := NextSource(pool, m.From, usable, order, rng)
		if !ok {
			return nil, nil, Invalid("no pool member is an address of this host: %s; nothing changed", addrList(pool))
		}
		m.To = next
		moves = append(moves, m)
		intents = append(intents, Intent{Sender: t.Sender, Dst: t.Dst, To: []netip.Addr{next}, Out: out, Ports: ports})
	}
	return moves, intents, nil
}

// PlanPeriodRotation starts a new period of pool (see pool.go) for each
// sender: one new address of the pool, other than the one its period has
// now, for every destination its period of the pool has and every one of
// dsts (every destination of the family when there is none): a sender's
// period is one address, so a --dst joins it rather than splitting it. It returns the moves and the intents that
// make them, which carry the new address (settlePeriods keeps it). It
// changes nothing.
func PlanPeriodRotation(r Router, st *State, pool netip.Prefix, senders []Sender, dsts []netip.Prefix, out string, rng *rand.Rand) ([]Move, []Intent, error) {
	if err := CheckPool(pool); err != nil {
		return nil, nil, err
	}
	installed := st.Entries()
	ofPeriod := func(e Entry, s Sender) bool {
		_, ok := e.PeriodAddr()
		return ok && e.Sender == s && e.Pool == pool
	}
	var moves []Move
	var intents []Intent
	for _, s := range senders {
		var ds []netip.Prefix
		var now netip.Addr
		for _, e := range installed {
			if ofPeriod(e, s) {
				if !now.IsValid() {
					now = e.To[0]
				}
				ds = append(ds, e.Dst)
			}
		}
		for _, d := range dsts {
			if d = d.Masked(); !slices.Contains(ds, d) {
				ds = append(ds, d)
			}
		}
		if len(ds) == 0 {
			ds = []netip.Prefix{netip.PrefixFrom(netip.IPv6Unspecified(), 0)}
		}
		next := RandomPoolAddr(pool, now, rng)
		for _, d := range ds {
			iface, natural, err := r.Natural(d, out)
			if err != nil {
				return nil, nil, hostErr(err, "--dst %s", d)
			}
			m := Move{Match: Match{Sender: s, Dst: d, Out: iface}, To: next, Pool: pool}
			if !s.Local() {
				natural = netip.Addr{}
			}
			m.From = Current(installed, m.Match, natural)
			for _, e := range installed {
				if ofPeriod(e, s) && e.Dst == d {
					m.From = e.To[0]
				}
			}
			moves = append(moves, m)
			intents = append(intents, Intent{Sender: s, Dst: d, Out: out, Pool: pool, Sticky: StickyPeriod, To: []netip.Addr{next}})
		}
	}
	return moves, intents, nil
}
