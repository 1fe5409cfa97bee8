package snat

import (
	"net/netip"
	"slices"
)

// A gateway pair (package ha) moves its egress address between two hosts
// that run the same desired-state file. A rule marked standby: is about
// such an address: on the host that lacks it, the rule stands by instead of
// being an error (apply), drift (check) or left out (watch). Measured on
// the wire (ha/e2e), standing by has to be more than waiting:
//
//   - The SNAT rule stays installed. Without any rule there is no nat
//     table, so no NAT or conntrack hook in the namespace: when the
//     address arrives, the clients' packets leave untracked and
//     untranslated (a leak of the clients' own addresses) until the
//     rule is written, and the connections conntrackd commits sit in a
//     table no hook consults.
//   - The clients' forwarded packets that belong to no connection the
//     kernel knows (conntrack state NEW or INVALID) are dropped: the hold.
//     Connections conntrackd commits are ESTABLISHED and pass; a packet of
//     a taken-over connection that arrives before the commit would
//     otherwise be picked up mid-stream, translated to a fresh port the
//     far side does not know, and reset. New connections are retransmitted
//     after the hold goes and are translated then.
//   - The hold goes when the entry is activated: by whoever knows the
//     commit is done (the HA hook, after conntrackd -c, signals the
//     daemon), or after a fallback delay, so a pair without the hook
//     still works. A one-shot apply activates at once what is present.
//
// Entry.Hold is the kernel's side of this (the backends write the hold
// and read it back); Entry.Standby is the rule's.

// standingBy is the entry of a standby intent none of whose sources the
// host has: its SNAT rule, held. It leaves by the destination's route
// (iface): where the address will be is unknown until it arrives.
func standingBy(in Intent, dst netip.Prefix, iface string) Entry {
	to := in.To[:1:1]
	if in.Spread {
		to = slices.Clip(in.To)
	}
	return Entry{Match: Match{Sender: in.Sender, Dst: dst, Out: iface}, To: to, Hold: true, Standby: true, Ports: in.Ports}
}

// HoldWhile holds the standby entries whose first source waiting reports
// true (an address that arrived but is not activated yet), in place.
func HoldWhile(entries []Entry, waiting func(netip.Addr) bool) {
	for i := range entries {
		e := &entries[i]
		if e.Standby && !e.Hold && len(e.To) > 0 && waiting(e.To[0]) {
			e.Hold = true
		}
	}
}

// Holding returns the sources of the held entries, sorted and unique: the
// addresses standing by.
func Holding(entries []Entry) []netip.Addr {
	var out []netip.Addr
	for _, e := range entries {
		if e.Hold {
			out = append(out, e.To...)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// Standing is one address whose rules stand by, for check and list.
type Standing struct {
	Address netip.Addr `json:"address"`
	// Rules counts its held entries.
	Rules int `json:"rules"`
	// Here says the host has the address: the rules wait to be activated
	// (the HA hook, or watch --activate-after); else the peer holds it.
	Here bool `json:"here"`
}

// StandingBy lists the addresses of the held entries, sorted, asking has
// whether the host has each.
func StandingBy(entries []Entry, has func(netip.Addr) bool) []Standing {
	n := map[netip.Addr]int{}
	for _, e := range entries {
		if e.Hold && len(e.To) > 0 {
			n[e.To[0]]++
		}
	}
	out := []Standing{}
	for _, a := range Holding(entries) {
		if n[a] > 0 {
			out = append(out, Standing{Address: a, Rules: n[a], Here: has(a)})
		}
	}
	return out
}
