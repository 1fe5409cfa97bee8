package snat

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
)

// DriftIPRuleAhead is a foreign ip rule, at a priority ahead of ours, that
// sends traffic one of our routes or marks promises a path for somewhere
// else: the promise is broken although every rule of ours is in place.
const DriftIPRuleAhead = "ip-rule-ahead"

// PathLooker is what checking foreign policy routing asks of the host.
type PathLooker interface {
	// Route is the kernel's real path for a new connection to dst with
	// fwmark mark (0: none), every policy rule included.
	Route(dst netip.Addr, mark uint32) (selector.Hop, error)
	// Foreign lists the ip rules of other tools, in priority order.
	Foreign(is4 bool) ([]routes.ForeignRule, error)
}

// maxPathLookups bounds the kernel lookups of one PolicyAhead beyond the
// destinations a foreign rule names: a rule without a destination selector
// (wg-quick's "not fwmark 0xca6c lookup 51820") is caught by the first of
// them already.
const maxPathLookups = 64

// PolicyAhead checks that the paths our routes and marks promise for the
// desired entries are the paths the kernel takes. Our rules sit at fixed
// priorities (7419-7423); another tool's rule at a lower priority (and an
// ip rule added without pref lands just below the first non-zero one, ahead
// of ours: wg-quick adds its rules so) is consulted first, and when its
// table has a route for a destination we route, that route wins. It looks
// the kernel up only when such a rule exists, for the entries whose
// destination it names and a bounded sample of the rest, and reports one
// finding per foreign rule, naming it as `ip rule` prints it.
func PolicyAhead(pl PathLooker, desired []Entry) ([]Finding, error) {
	var out []Finding
	for _, f := range Families {
		foreign, err := pl.Foreign(f == IPv4)
		if err != nil {
			return nil, err
		}
		ahead := slices.DeleteFunc(foreign, func(r routes.ForeignRule) bool { return r.Priority > routes.PrioReplies })
		if len(ahead) == 0 {
			continue
		}
		tables := routes.ReplyTables(pathsOf(f, desired))
		type broken struct {
			rule     routes.ForeignRule
			examples []string
			n        int
		}
		byRule := map[string]*broken{}
		var order []string
		lookups := 0
		for _, e := range OfFamily(desired, f) {
			if !e.Routed && !e.Marked {
				continue
			}
			named := slices.ContainsFunc(ahead, func(r routes.ForeignRule) bool { return r.To.IsValid() && r.To.Overlaps(e.Dst) })
			if !named && lookups >= maxPathLookups {
				continue
			}
			lookups++
			want, mark, prio := routes.Table, uint32(0), routes.PrioDestinations
			if e.Marked {
				t, ok := tables[e.To[0]]
				if !ok {
					continue // more sources than reply tables: no path was promised
				}
				want, mark, prio = t, routes.MarkOf(t), routes.PrioReplies
			}
			hop, err := pl.Route(probeAddr(e.Dst), mark)
			got := ""
			switch {
			case errors.Is(err, selector.ErrNoRoute) || selector.IsInput(err):
				got = "nowhere (" + err.Error() + ")"
			case err != nil:
				return nil, err
			case hop.Table == want:
				continue
			default:
				got = fmt.Sprintf("out of %s (table %s)", hop.Interface, routes.TableText(hop.Table))
			}
			rule, ok := routes.Decider(ahead, hop.Table, prio)
			if !ok {
				rule = ahead[0]
			}
			b := byRule[rule.Text]
			if b == nil {
				b = &broken{rule: rule}
				byRule[rule.Text] = b
				order = append(order, rule.Text)
			}
			b.n++
			if len(b.examples) < 3 {
				b.examples = append(b.examples, fmt.Sprintf("%s goes %s, not out of %s as the rule for %s -> %s says", e.Dst, got, e.Out, e.Match, e.ToString()))
			}
		}
		for _, k := range order {
			b := byRule[k]
			more := ""
			if b.n > len(b.examples) {
				more = fmt.Sprintf(" (and %d more)", b.n-len(b.examples))
			}
			out = append(out, Finding{Kind: DriftIPRuleAhead, Family: f.String(), Detail: fmt.Sprintf(
				"ip rule %q of another tool comes before egress-snat's (%d-%d): %s%s",
				b.rule.Text, routes.PrioExempt, routes.PrioEnd, strings.Join(b.examples, "; "), more)})
		}
	}
	return out, nil
}

// probeAddr is an address of p to look up for the whole prefix: the
// address itself for a host, else one clear of the addresses the kernel
// treats specially (the network's own, 0.0.0.0/8).
func probeAddr(p netip.Prefix) netip.Addr {
	if p.IsSingleIP() {
		return p.Addr()
	}
	for _, d := range DocPrefixes {
		if p.Bits() <= d.Bits() && p.Contains(d.Addr()) {
			return d.Addr().Next()
		}
	}
	return p.Addr().Next()
}

// DocPrefixes are the documentation and benchmarking ranges (RFC 5737,
// RFC 2544, RFC 3849): addresses no real host uses, safe to send probes
// to and to look up.
var DocPrefixes = []netip.Prefix{
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("203.0.113.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("2001:db8::/32"),
}
