package snat

import (
	"net/netip"
	"slices"

	"github.com/egress-snat/egress-snat/routes"
)

// routedEntries reads our routes back as entries: one per destination
// route in routes.Table, with Replies when a reply rule sends its source
// out of the same interface.
func routedEntries(s routes.State) []Entry {
	replyDev := map[int]string{}
	for _, r := range s.Routes {
		if r.Table != routes.Table {
			replyDev[r.Table] = r.Dev
		}
	}
	var out []Entry
	for _, r := range s.Routes {
		if r.Table != routes.Table || !r.Src.IsValid() {
			continue
		}
		e := Entry{Match: Match{Dst: r.Dst, Out: r.Dev}, Natural: r.Src, To: []netip.Addr{r.Src}, Routed: true, Via: r.Via}
		e.Replies = slices.ContainsFunc(s.Rules, func(ru routes.Rule) bool {
			return ru.Priority == routes.PrioReplies && ru.From.Addr() == r.Src && replyDev[ru.Table] == r.Dev
		})
		out = append(out, e)
	}
	return out
}

// RoutingOf renders the routed entries of f as the rules and routes they
// need: what the kernel holds of ours after a plan with these entries.
func RoutingOf(f Family, entries []Entry) routes.State { return routingOf(f, entries) }

func routingOf(f Family, entries []Entry) routes.State {
	var paths []routes.Path
	for _, e := range entries {
		if e.Routed && e.Family() == f {
			paths = append(paths, routes.Path{Dst: e.Dst, Dev: e.Out, Via: e.Via, Src: e.To[0], Replies: e.Replies})
		}
	}
	return routes.Desired(paths)
}
