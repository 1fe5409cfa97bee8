package snat

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/egress-snat/egress-snat/routes"
)

// Connections outlive rules. Removing a rule changes what new connections
// do; a connection that already exists must keep working until it ends.
// Two things in the kernel serve existing connections after their rule is
// gone, and a plan keeps them, make before break, for as long as live
// flows or sockets need them (Liveness), then takes them away on a later
// run: a later write, watch, or clear --now at once.
//
//   - Conntrack. A NAT'd connection's packets are translated by its
//     conntrack entry alone, but only while conntrack is registered in the
//     namespace, and it is registered only while something uses it: every
//     SNAT rule does. Removing the last one unregisters it, and the
//     connection's next packet leaves untranslated: the far side resets
//     it. The backend keeps conntrack held for such connections (the
//     iptables backend's keep chain, backend/iptables/keep.go) and says so
//     in its plan's Lingering.
//
//   - A reply route. A connection from an address on another interface
//     (--method route, another NIC) leaves by that address's reply rule
//     and table (routes.PrioReplies). Its socket keeps the address when the
//     rule goes; the reply rule and table stay (routes.Path.Linger) while
//     sockets or flows leave with the address.
//
// Forwarded senders marked out of another interface lose their mark with
// their rule; their established connections are not kept.

// Liveness is what live flows and sockets hold of the host's addresses
// (conntrack.Usage): Translated counts live flows translated to each
// address, Sources live flows and sockets leaving with it.
type Liveness struct {
	Translated map[netip.Addr]int
	Sources    map[netip.Addr]int
}

// Flows reads Liveness. Its cost grows with the host's flows, so a plan
// asks for it only when it would take something away (see Manager.Plan).
type Flows interface {
	Live() (Liveness, error)
}

// lingerPaths are the reply paths of addresses no desired entry of f
// routes any more, that live sockets or flows still leave with: their
// reply rule and table stay, made from the installed ones.
func lingerPaths(st *State, f Family, wanted []routes.Path) []routes.Path {
	if st.Live == nil {
		return nil
	}
	have := st.Routing[f]
	var out []routes.Path
	for _, r := range have.Rules {
		if r.Priority != routes.PrioReplies || !r.From.IsValid() {
			continue
		}
		a := r.From.Addr()
		if st.Live.Sources[a] == 0 || slices.ContainsFunc(wanted, func(p routes.Path) bool { return p.Src == a && (p.Replies || p.Marked) }) {
			continue
		}
		for _, rt := range have.Routes {
			if rt.Table == r.Table {
				out = append(out, routes.Path{Dst: rt.Dst, Dev: rt.Dev, Via: rt.Via, Src: a, Replies: true, Linger: true})
				break
			}
		}
	}
	return out
}

// pathsFor are the routing paths of f after a plan for desired: the
// entries' own and the lingering ones. Reply tables are numbered over all
// of them, so a lingering address keeps its table and nobody's changes.
func pathsFor(st *State, f Family, desired []Entry) []routes.Path {
	paths := pathsOf(f, desired)
	return append(paths, lingerPaths(st, f, paths)...)
}

// strands reports whether plan p, made without Liveness, takes away
// something live connections may use: what the backend says of its part
// (a family's last SNAT rule, what it keeps), or a reply rule.
func (p Plan) strands(st *State) bool {
	if p.NAT != nil && p.NAT.Strands() {
		return true
	}
	for _, f := range Families {
		for _, r := range st.Routing[f].Rules {
			if r.Priority == routes.PrioReplies && r.From.IsValid() && !slices.Contains(p.Routing[f].Rules, r) {
				return true
			}
		}
	}
	return false
}

// Lingering describes, for people, what the plan keeps only for live
// connections: "the NAT of connections translated to 192.0.2.22", "the
// reply route of 203.0.113.130".
func (p Plan) Lingering() []string {
	var out []string
	if p.NAT != nil {
		out = append(out, p.NAT.Lingering()...)
	}
	for _, f := range Families {
		for _, path := range p.Paths[f] {
			if path.Linger {
				out = append(out, fmt.Sprintf("the reply route of %s (out of %s), for live connections leaving with it", path.Src, path.Dev))
			}
		}
	}
	return out
}

// Kept reads what st keeps only for live connections, for list. It plans
// (which costs as much as a no-op apply) only when something may be kept:
// a reply rule that serves no installed entry, or what the backend says
// it may keep (Lingerer).
func (m *Manager) Kept(st *State) ([]string, error) {
	stray := false
	if l, ok := st.NAT.(Lingerer); ok && l.Lingers() {
		stray = true
	}
	for _, f := range Families {
		paths := pathsOf(f, st.Entries())
		for _, r := range st.Routing[f].Rules {
			if r.Priority == routes.PrioReplies && r.From.IsValid() &&
				!slices.ContainsFunc(paths, func(p routes.Path) bool { return p.Src == r.From.Addr() }) {
				stray = true
			}
		}
	}
	if !stray {
		return nil, nil
	}
	p, err := m.Plan(st, st.Entries())
	return p.Lingering(), err
}

// Lingerer is an Installation that may hold something kept only for live
// connections (the iptables backend's keep chain).
type Lingerer interface {
	Lingers() bool
}
