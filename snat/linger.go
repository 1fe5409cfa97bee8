package snat

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

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
//     SNAT rule does. Removing the last one (with either iptables backend,
//     and unless another tool's NAT or conntrack rule is there) unregisters
//     it: the connection's next packet leaves untranslated and the far side
//     resets it. The keep chain holds conntrack for them, in the family's
//     nat table, referenced by no jump, so it sees no packet:
//
//     nat EGRESS-SNAT-KEEP
//     -m conntrack --ctstate ESTABLISHED -m comment --comment "egress-snat: kept for connections translated to 192.0.2.22"
//
//     Each rule's conntrack match holds conntrack; its comment names an
//     address whose translated connections it is kept for: the kernel is
//     the only state. It is written in the same iptables-restore
//     transaction that removes the rules, which takes the new rules'
//     hold before it lets the old ones go. With iptables-nft, the nat
//     table (whose chains hold the NAT hooks) is deleted only once the
//     keep chain is gone.
//
//   - A reply route. A connection from an address on another interface
//     (--method route, another NIC) leaves by that address's reply rule
//     and table (routes.PrioReplies). Its socket keeps the address when the
//     rule goes; the reply rule and table stay (routes.Path.Linger) while
//     sockets or flows leave with the address.
//
// Forwarded senders marked out of another interface lose their mark with
// their rule; their established connections are not kept.

// KeepChain is the keep chain's name. Never rename it: see the package
// comment.
const KeepChain = "EGRESS-SNAT-KEEP"

// keepComment starts the comment of each keep rule; the address follows.
const keepComment = "egress-snat: kept for connections translated to "

// KeepSpec is the keep chain's rule for address a, as iptables arguments.
func KeepSpec(a netip.Addr) []string {
	return []string{"-m", "conntrack", "--ctstate", "ESTABLISHED", "-m", "comment", "--comment", keepComment + a.String()}
}

// parseKeep reads a keep chain rule back: the address it is kept for.
func parseKeep(spec []string) (netip.Addr, bool) {
	var a netip.Addr
	state := false
	for i := 0; i+1 < len(spec); i++ {
		switch spec[i] {
		case "--ctstate":
			state = spec[i+1] == "ESTABLISHED"
		case "--comment":
			v, ok := strings.CutPrefix(spec[i+1], keepComment)
			if !ok {
				return a, false
			}
			var err error
			if a, err = netip.ParseAddr(v); err != nil {
				return a, false
			}
		}
	}
	return a, state && a.IsValid() && len(spec) == len(KeepSpec(a))
}

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

// keepFor returns the addresses f's keep chain must hold conntrack for
// after a plan whose chain for f is c: those it holds it for already, and
// the sources of f's installed SNAT rules when c has none left, that live
// flows are translated to. A chain with rules needs no keep chain: its own
// rules hold conntrack. Without st.Live it keeps what is.
func keepFor(st *State, f Family, c Chain) []netip.Addr {
	in := st.Installed[f]
	if st.Live == nil {
		return in.Keep
	}
	if len(c.Rules) > 0 {
		return nil
	}
	cands := slices.Clone(in.Keep)
	for _, e := range in.Entries {
		cands = append(cands, e.To...)
	}
	var out []netip.Addr
	for _, a := range cands {
		if st.Live.Translated[a] > 0 && !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
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
// something live connections may need: a family's last SNAT rule, a keep
// chain, or a reply rule.
func (p Plan) strands(st *State) bool {
	for _, f := range Families {
		in := st.Installed[f]
		if len(in.Keep) > 0 || len(p.Chains[f].Rules) == 0 && len(in.Rules) > 0 {
			return true
		}
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
	for _, f := range Families {
		if keep := p.Chains[f].Keep; len(keep) > 0 {
			out = append(out, fmt.Sprintf("conntrack (the %s keep chain %s), for live connections translated to %s", f, KeepChain, addrList(keep)))
		}
		for _, path := range p.Paths[f] {
			if path.Linger {
				out = append(out, fmt.Sprintf("the reply route of %s (out of %s), for live connections leaving with it", path.Src, path.Dev))
			}
		}
	}
	return out
}

// Kept reads what st keeps only for live connections, for list: nothing
// to read (and no plan made, which costs as much as a no-op apply) unless
// a keep chain exists or a reply rule serves no installed entry.
func (m *Manager) Kept(st *State) ([]string, error) {
	stray := false
	for _, f := range Families {
		paths := pathsOf(f, st.Entries())
		for _, r := range st.Routing[f].Rules {
			if r.Priority == routes.PrioReplies && r.From.IsValid() &&
				!slices.ContainsFunc(paths, func(p routes.Path) bool { return p.Src == r.From.Addr() }) {
				stray = true
			}
		}
	}
	if len(st.Installed[IPv4].Keep)+len(st.Installed[IPv6].Keep) == 0 && !stray {
		return nil, nil
	}
	p, err := m.Plan(st, st.Entries())
	return p.Lingering(), err
}
