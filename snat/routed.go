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
		e.Replies = slices.ContainsFunc(s.Rules, func(ru routes.IPRule) bool {
			return ru.Priority == routes.PrioReplies && ru.From.Addr() == r.Src && replyDev[ru.Table] == r.Dev
		})
		out = append(out, e)
	}
	return out
}

// pathsOf are the routing paths of f's entries (a plan adds lingering
// ones: see pathsFor).
func pathsOf(f Family, entries []Entry) []routes.Path {
	var paths []routes.Path
	var pools []netip.Prefix
	for _, e := range entries {
		if e.Family() != f {
			continue
		}
		switch {
		case e.Routed || e.Marked:
			paths = append(paths, routes.Path{Dst: e.Dst, Dev: e.Out, Via: e.Via, Src: e.To[0], Replies: e.Replies, Marked: e.Marked})
		case e.Pool.IsValid() && !slices.Contains(pools, e.Pool):
			// The pool's AnyIP local route (routes.Path.Pool): one
			// for all the entries of a pool.
			pools = append(pools, e.Pool)
			paths = append(paths, routes.Path{Dst: e.Pool, Pool: true})
		}
	}
	return paths
}

// ReplyMark is the fwmark that sends a marked entry's traffic to its
// source's reply table, as the mangle chains set it for entries rendered
// together with all of entries. It reports false when e is not marked or
// its source got no table.
func ReplyMark(entries []Entry, e Entry) (uint32, bool) {
	if !e.Marked {
		return 0, false
	}
	t, ok := routes.ReplyTables(pathsOf(e.Family(), entries))[e.To[0]]
	if !ok {
		return 0, false
	}
	return routes.MarkOf(t), true
}
