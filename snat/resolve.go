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

// InvalidError is bad input from the operator: a value that can never work
// on this host as it is. The CLI gives it its own exit status.
type InvalidError struct{ Err error }

func (e *InvalidError) Error() string { return e.Err.Error() }
func (e *InvalidError) Unwrap() error { return e.Err }

// Invalid formats an InvalidError.
func Invalid(format string, args ...any) error {
	return &InvalidError{fmt.Errorf(format, args...)}
}

// Router is what resolving needs from the host: the kernel's route choice
// and which interface holds an address. *selector.Selector implements it.
type Router interface {
	Natural(dst netip.Prefix, out string) (iface string, natural netip.Addr, err error)
	Owner(a netip.Addr) (iface string, err error)
	// Path is Natural plus the route's gateway (invalid when on-link).
	Path(dst netip.Prefix, out string) (iface string, gw, natural netip.Addr, err error)
	// Gateways lists the gateways of the host's routes leaving by iface,
	// in tables exclude does not name.
	Gateways(iface string, is4 bool, exclude func(table int) bool) ([]netip.Addr, error)
	// OnLink reports whether a is directly reachable on iface.
	OnLink(iface string, a netip.Addr) (bool, error)
	// PrefixUse tells what the host does with the addresses of a pool
	// prefix already: its addresses in it, the routes (of tables skip
	// does not name) that put part of it on-link.
	PrefixUse(p netip.Prefix, skip func(table int) bool) (selector.PrefixUse, error)
}

var _ Router = (*selector.Selector)(nil)

// Intent is what the operator asks for: new connections of Sender to Dst
// (leaving by Out, or as routed when Out is empty) get source To. With
// Spread they are spread over all of To in turn; without it, To is an
// ordered failover list and the first address present on the host is used.
type Intent struct {
	Sender Sender
	Dst    netip.Prefix
	To     []netip.Addr
	Out    string
	Spread bool
	// Via is the gateway for a source on another interface than the
	// destination's route; invalid: the one route the host has there.
	Via netip.Addr
	// Method is MethodSNAT (the default), MethodRoute or MethodAuto.
	Method Method
	// Standby says the source may be on the peer gateway of a pair: while
	// the host lacks it, the rule stands by (see standby.go) instead of
	// being an error or left out. Only for forwarded traffic, by SNAT.
	Standby bool
	// Pool is an IPv6 prefix to take sources from instead of To (see
	// pool.go), Sticky how; To is then empty.
	Pool   netip.Prefix
	Sticky Sticky
	// Ports is the range of source ports SNAT gives (see ports.go); zero:
	// the kernel's own. Only for SNAT to addresses.
	Ports Ports
	// Spill lets the watch daemon send new connections to one destination
	// port over the further addresses of To while an address runs out of
	// source ports toward it (see spill.go). Without the daemon the rule
	// is as without Spill. Only for SNAT to a list of two addresses or more.
	Spill bool
}

// Method is how an intent is realized.
type Method string

const (
	// MethodSNAT rewrites the source in the nat chain (method two).
	MethodSNAT Method = "snat"
	// MethodRoute installs a route with src (method one): no NAT, no
	// conntrack binding, and the application's socket carries the address.
	// Only for the host's own traffic, one source, not spread.
	MethodRoute Method = "route"
	// MethodAuto uses a route where it has the same effect, SNAT elsewhere.
	MethodAuto Method = "auto"
)

// ParseMethod reads --method and method:.
func ParseMethod(s string) (Method, error) {
	switch m := Method(s); m {
	case "", MethodSNAT:
		return MethodSNAT, nil
	case MethodRoute, MethodAuto:
		return m, nil
	}
	return "", Invalid("method %q: want snat, route or auto", s)
}

// routable reports whether a route can do what in asks: the host's own
// traffic by destination, to one source.
func (in Intent) routable() bool {
	return in.Sender.IsHost() && !in.Spread && in.Ports.IsZero() && !in.Spill
}

// Resolve validates intents against the host and turns them into entries,
// learning each destination's outgoing interface and natural source from
// the kernel. It changes nothing. Every problem is reported, each naming the
// value at fault, so the operator fixes a file in one pass.
func Resolve(r Router, intents []Intent) ([]Entry, error) {
	out, _, err := resolve(r, intents, false)
	return out, err
}

// ResolveAvailable is Resolve for a host that changes under a long-running
// reconciler: an intent none of whose sources is on the host any more, or
// whose destination has no route, is left out and reported in skipped
// instead of failing the whole state, so its traffic is not sent from an
// address the host lacks. Spread intents keep the sources still present.
func ResolveAvailable(r Router, intents []Intent) (entries []Entry, skipped []Skipped, err error) {
	return resolve(r, intents, true)
}

// Skipped is an intent ResolveAvailable left out, and why. Cause does not
// name the destination, so that one cause (an address that left the host,
// an interface that went down) is reported once however many rules it
// takes out.
type Skipped struct {
	Match Match
	Cause string
	Err   error
}

// skippedOf classifies a resolve error ResolveAvailable leaves an intent
// out for; false for any other error.
func skippedOf(in Intent, err error) (Skipped, bool) {
	s := Skipped{Match: Match{Sender: in.Sender, Dst: in.Dst.Masked(), Out: in.Out}, Err: err}
	var src *SourceError
	switch {
	case errors.As(err, &src):
		s.Cause = fmt.Sprintf("source %s: %v", src.Addr, src.Err)
	case errors.Is(err, selector.ErrNoRoute):
		// The innermost cause: "interface eth1 is down: no route", or
		// "no route" for a destination of its own.
		inner := err
		for u := errors.Unwrap(inner); u != nil && u != selector.ErrNoRoute; u = errors.Unwrap(inner) {
			inner = u
		}
		s.Cause = strings.TrimPrefix(inner.Error(), s.Match.Dst.String()+": ")
	default:
		return s, false
	}
	return s, true
}

// SourceError is a source address that cannot be used for a destination:
// not on the host, or not usable (selector.ErrNotUsable).
type SourceError struct {
	Addr netip.Addr
	Dst  netip.Prefix
	Err  error
}

func (e *SourceError) Error() string {
	return fmt.Sprintf("source %s for %s: %v", e.Addr, e.Dst, e.Err)
}
func (e *SourceError) Unwrap() error { return e.Err }

func resolve(r Router, intents []Intent, lenient bool) ([]Entry, []Skipped, error) {
	repeated, err := repeats(intents)
	if err != nil {
		return nil, nil, err
	}
	var errs []error
	var skipped []Skipped
	out := make([]Entry, 0, len(intents))
	for i := range intents {
		if repeated[i] {
			continue
		}
		e, err := resolveOne(r, intents[i], lenient)
		if err != nil {
			if s, ok := skippedOf(intents[i], err); lenient && ok {
				skipped = append(skipped, s)
				continue
			}
			errs = append(errs, err)
			continue
		}
		out = append(out, e)
	}
	// In chain order, so that Normalize need not copy them to sort.
	SortEntries(out)
	return out, skipped, errors.Join(errs...)
}

// Dedup drops repeated intents for the same match and refuses one match
// given two different sources: which one wins would be a guess.
func Dedup(intents []Intent) ([]Intent, error) {
	repeated, err := repeats(intents)
	if err != nil {
		return nil, err
	}
	out := make([]Intent, 0, len(intents))
	for i, in := range intents {
		if !repeated[i] {
			out = append(out, in)
		}
	}
	return out, nil
}

// repeats marks the intents that repeat an earlier one's match (dropped)
// and refuses a match given two different sources. It marks instead of
// copying: a million intents are a fifth of a gigabyte.
func repeats(intents []Intent) ([]bool, error) {
	var errs []error
	repeated := make([]bool, len(intents))
	// Keyed by destination and the index of the (sender, interface) pair:
	// hashing a whole Match, strings and all, 100,000 times was the
	// largest part of resolving a long dst-file, and one rule's intents
	// come in a run with the same pair.
	type who struct {
		Sender Sender
		Out    string
	}
	type key struct {
		Dst netip.Prefix
		Who int
	}
	whos := map[who]int{}
	last, lastIdx := who{}, -1
	seen := make(map[key]int, len(intents))
	for i := range intents {
		in := &intents[i]
		w := who{in.Sender, in.Out}
		if lastIdx < 0 || w != last {
			idx, ok := whos[w]
			if !ok {
				idx = len(whos)
				whos[w] = idx
			}
			last, lastIdx = w, idx
		}
		k := key{in.Dst.Masked(), lastIdx}
		if first, dup := seen[k]; dup {
			repeated[i] = true
			if prev := &intents[first]; !slices.Equal(prev.To, in.To) || prev.Spread != in.Spread || prev.Pool != in.Pool || prev.Sticky != in.Sticky || prev.Ports != in.Ports || prev.Spill != in.Spill {
				m := Match{Sender: in.Sender, Dst: k.Dst, Out: in.Out}
				errs = append(errs, Invalid("%s is given twice, with sources %s and %s", describe(m), prev.sources(), in.sources()))
			}
			continue
		}
		seen[k] = i
	}
	return repeated, errors.Join(errs...)
}

// describe names a match in messages: "destination 198.51.100.4/32", or
// "destination 198.51.100.4/32 from 10.77.0.0/24".
func describe(m Match) string {
	s := "destination " + m.Dst.String()
	if !m.Sender.IsHost() {
		s += " for " + m.Sender.String()
	}
	return s
}

// hostErr classifies an error of the host lookups: one that says the input
// cannot work here is bad input; a netlink failure is a runtime failure.
func hostErr(err error, format string, args ...any) error {
	wrapped := fmt.Errorf(format+": %w", append(args, err)...)
	if selector.IsInput(err) {
		return &InvalidError{wrapped}
	}
	return wrapped
}

func resolveOne(r Router, in Intent, lenient bool) (Entry, error) {
	dst := in.Dst.Masked()
	if !dst.IsValid() {
		return Entry{}, Invalid("destination %q is not a valid address or prefix", in.Dst)
	}
	if in.Pool.IsValid() {
		if in.Spill {
			return Entry{}, Invalid("%s: pool %s needs no spill: its addresses do not run out of ports (spill is for a list of addresses)", describe(Match{Sender: in.Sender, Dst: dst}), in.Pool)
		}
		if !in.Ports.IsZero() {
			return Entry{}, Invalid("%s: pool %s needs no --to-ports: its addresses do not run out of ports", describe(Match{Sender: in.Sender, Dst: dst}), in.Pool)
		}
		return resolvePool(r, in, dst)
	}
	if !in.Ports.IsZero() && in.Method == MethodRoute {
		return Entry{}, Invalid("%s: --to-ports %s needs method snat: a route does not translate ports", describe(Match{Sender: in.Sender, Dst: dst}), in.Ports)
	}
	if len(in.To) == 0 {
		return Entry{}, Invalid("%s: no source address given", describe(Match{Sender: in.Sender, Dst: dst}))
	}
	for _, to := range in.To {
		if to.Is4() != dst.Addr().Is4() {
			return Entry{}, Invalid("source %s and destination %s are of different address families", to, dst)
		}
	}
	if s := in.Sender; s.kind() == SenderFrom {
		switch {
		case !s.From.IsValid():
			return Entry{}, Invalid("--from: not a valid prefix")
		case s.From.Addr().Is4() != dst.Addr().Is4():
			return Entry{}, Invalid("--from %s and destination %s are of different address families", s.From, dst)
		case s.From.Masked() != s.From:
			return Entry{}, Invalid("--from %s has host bits set; did you mean %s?", s.From, s.From.Masked())
		}
	}
	if in.Standby {
		switch {
		case in.Sender.kind() != SenderFrom:
			return Entry{}, Invalid("%s: standby is for a gateway's forwarded traffic (a rule with from): the host's own connections cannot wait for an address the peer holds", describe(Match{Sender: in.Sender, Dst: dst}))
		case in.Method == MethodRoute:
			return Entry{}, Invalid("%s: standby needs method snat: a route's src must be an address the host has", describe(Match{Sender: in.Sender, Dst: dst}))
		}
	}
	if in.Method == MethodRoute && !in.routable() {
		return Entry{}, Invalid("%s: --method route can only choose the host's own traffic by destination, to one source (forwarded, uid, cgroup and spread traffic need --method snat or auto)", describe(Match{Sender: in.Sender, Dst: dst}))
	}
	iface, gw, natural, err := r.Path(dst, in.Out)
	if err != nil {
		return Entry{}, hostErr(err, "destination %s", dst)
	}
	var to []netip.Addr
	var missing error
	for i, a := range in.To {
		owner, err := r.Owner(a)
		switch {
		case errors.Is(err, selector.ErrNotLocal):
			if missing == nil {
				missing = &InvalidError{&SourceError{Addr: a, Dst: dst, Err: err}}
			}
			continue
		case err != nil:
			return Entry{}, hostErr(err, "source %s", a)
		case owner != iface:
			if !in.Ports.IsZero() {
				return Entry{}, Invalid("source %s is on %s, but traffic to %s leaves by %s: --to-ports is for a source of the outgoing interface", a, owner, dst, iface)
			}
			if in.Out != "" || len(to) > 0 {
				return Entry{}, Invalid("source %s is on %s, but traffic to %s leaves by %s: the source must be an address of the outgoing interface", a, owner, dst, iface)
			}
			return otherInterface(r, in, dst, a, owner, iface, natural)
		}
		if !in.Spread {
			// A failover list: the first present address. The slice
			// shares in.To's array, as all of one rule's entries do,
			// which the renderer's grouping counts on.
			to = in.To[i : i+1 : i+1]
			break
		}
		to = append(to, a)
	}
	if in.Spread && missing == nil && len(to) == len(in.To) {
		to = slices.Clip(in.To) // all present: share the rule's array
	}
	if len(to) == 0 && in.Standby {
		return standingBy(in, dst, iface), nil
	}
	if len(to) == 0 || (missing != nil && in.Spread && !lenient && !in.Standby) {
		return Entry{}, missing
	}
	if in.Via.IsValid() && in.Via != gw {
		return Entry{}, Invalid("--via %s: traffic to %s leaves by %s through %s already; --via is for a source on another interface", in.Via, dst, iface, gwName(gw))
	}
	e := Entry{Match: Match{Sender: in.Sender, Dst: dst, Out: iface}, To: to, Standby: in.Standby, Ports: in.Ports}
	if in.Spill {
		if e.Spill, err = spillAddrs(r, in, dst, iface); err != nil {
			return Entry{}, err
		}
	}
	if in.Sender.Local() {
		e.Natural = natural
	}
	if in.Method == MethodRoute || in.Method == MethodAuto && in.routable() {
		e.Routed, e.Natural, e.Via = true, to[0], gw
	}
	return e, nil
}

func gwName(gw netip.Addr) string {
	if gw.IsValid() {
		return gw.String()
	}
	return "no gateway (on-link)"
}

// otherInterface resolves an intent whose source a lives on owner, not on
// iface, the interface the host routes dst by: the destination is sent out
// of owner through its gateway, from a, by a route of ours; and traffic
// already leaving with a is sent that way too (replies to connections that
// came in on owner, applications bound to a).
//
// A sender's traffic (--from, --uid, --cgroup) cannot be told apart by a
// route: a mark sends it to a's reply table instead, and a SNAT rule for
// owner gives it a (see backend/iptables/mangle.go). natural is the source
// local traffic has before that, on iface.
func otherInterface(r Router, in Intent, dst netip.Prefix, a netip.Addr, owner, iface string, natural netip.Addr) (Entry, error) {
	switch {
	case in.Method == MethodRoute:
		return Entry{}, Invalid("source %s is on %s, but traffic to %s leaves by %s: --method route copies the destination's own path; use --method snat or auto to leave by %s", a, owner, dst, iface, owner)
	case in.Spread:
		return Entry{}, Invalid("source %s is on %s, but traffic to %s leaves by %s: a --spread pool must be on the outgoing interface", a, owner, dst, iface)
	}
	gw := in.Via
	if gw.IsValid() {
		if gw.Is4() != a.Is4() {
			return Entry{}, Invalid("--via %s and source %s are of different address families", gw, a)
		}
		onLink, err := r.OnLink(owner, gw)
		if err != nil {
			return Entry{}, hostErr(err, "--via %s", gw)
		}
		if !onLink {
			return Entry{}, Invalid("--via %s is not on a subnet of %s, where %s is: the gateway must be directly reachable on %s", gw, owner, a, owner)
		}
	} else {
		gws, err := r.Gateways(owner, a.Is4(), routes.OurTable)
		if err != nil {
			return Entry{}, hostErr(err, "gateways of %s", owner)
		}
		switch len(gws) {
		case 0:
			return Entry{}, Invalid("source %s is on %s, but traffic to %s leaves by %s, and the host has no route through %s to take its gateway from: give the gateway with --via", a, owner, dst, iface, owner)
		case 1:
			gw = gws[0]
		default:
			return Entry{}, Invalid("source %s is on %s, which has routes through %s gateways (%s): say which with --via", a, owner, fmt.Sprint(len(gws)), addrList(gws))
		}
	}
	if !in.Sender.IsHost() {
		e := Entry{Match: Match{Sender: in.Sender, Dst: dst, Out: owner}, To: []netip.Addr{a}, Via: gw, Replies: true, Marked: true, Standby: in.Standby}
		if in.Sender.Local() {
			e.Natural = natural
		}
		return e, nil
	}
	return Entry{Match: Match{Sender: in.Sender, Dst: dst, Out: owner}, Natural: a, To: []netip.Addr{a}, Routed: true, Via: gw, Replies: true}, nil
}

// sources renders an intent's sources for messages: its addresses, or its
// pool.
func (in Intent) sources() string {
	if in.Pool.IsValid() {
		return poolString(in.Pool, in.Sticky, in.To)
	}
	return Entry{To: in.To, Ports: in.Ports}.ToString()
}

func addrList(as []netip.Addr) string {
	return Entry{To: as}.ToString()
}

// resolvePool resolves an intent whose sources are a pool (see pool.go):
// the prefix must be one, of the destination's family; the host must not
// use an address of it, nor have it on a link where neighbours would ask
// for its addresses and nobody answers (no neighbour proxying there); the
// destination's route gives the interface and natural source, as for any
// rule. A pool is SNAT's: no route method, no standby (no peer holds a
// prefix), no via.
func resolvePool(r Router, in Intent, dst netip.Prefix) (Entry, error) {
	p := in.Pool
	what := describe(Match{Sender: in.Sender, Dst: dst})
	if err := CheckPool(p); err != nil {
		return Entry{}, err
	}
	sticky := in.Sticky
	if sticky == "" {
		sticky = StickyConnection
	}
	switch {
	case !dst.Addr().Is6():
		return Entry{}, Invalid("pool %s and destination %s are of different address families", p, dst)
	case in.Sender.kind() == SenderFrom && !in.Sender.From.Addr().Is6():
		return Entry{}, Invalid("--from %s and pool %s are of different address families", in.Sender.From, p)
	case in.Method == MethodRoute:
		return Entry{}, Invalid("%s: pool %s needs method snat: a route's src must be an address the host has", what, p)
	case in.Standby:
		return Entry{}, Invalid("%s: pool %s cannot stand by: standby is for an address the peer gateway may hold", what, p)
	case in.Via.IsValid():
		return Entry{}, Invalid("%s: pool %s leaves by the destination's route; --via is for an address of another interface", what, p)
	case len(in.To) > 0 && (sticky != StickyPeriod || len(in.To) > 1):
		return Entry{}, Invalid("%s: pool %s takes addresses of its own; give the pool or addresses, not both (%s)", what, p, addrList(in.To))
	case len(in.To) == 1 && !InPool(p, in.To[0]):
		return Entry{}, Invalid("%s: %s is not an address of pool %s", what, in.To[0], p)
	case in.Spread:
		return Entry{}, Invalid("%s: pool %s spreads by itself (per %s); --spread is for a list of addresses", what, p, sticky)
	}
	if _, err := ParseSticky(string(sticky)); err != nil {
		return Entry{}, err
	}
	if s := in.Sender; s.kind() == SenderFrom && s.From.Masked() != s.From {
		return Entry{}, Invalid("--from %s has host bits set; did you mean %s?", s.From, s.From.Masked())
	}
	if err := checkPoolUse(r, p); err != nil {
		return Entry{}, err
	}
	iface, _, natural, err := r.Path(dst, in.Out)
	if err != nil {
		return Entry{}, hostErr(err, "destination %s", dst)
	}
	// A period's address, when the intent has one (rotate's, or check's
	// of an installed entry); else settlePeriods gives it.
	e := Entry{Match: Match{Sender: in.Sender, Dst: dst, Out: iface}, Pool: p, Sticky: sticky, To: in.To}
	if in.Sender.Local() {
		e.Natural = natural
	}
	return e, nil
}

// checkPoolUse refuses a pool the host cannot take replies for, or already
// uses: an address of the host inside it (translated connections would
// collide with the host's own), or a route that puts it on a link without
// neighbour proxying, where the upstream router asks for each address by
// neighbour discovery and no one answers.
func checkPoolUse(r Router, p netip.Prefix) error {
	use, err := r.PrefixUse(p, routes.OurTable)
	if err != nil {
		return hostErr(err, "pool %s", p)
	}
	if len(use.Addrs) > 0 {
		a := use.Addrs[0]
		return Invalid("pool %s holds %s, an address of this host on %s: connections translated to the pool would collide with the host's own; choose a prefix the host does not use", p, a.Addr.Addr(), a.Iface)
	}
	for _, l := range use.OnLink {
		if !l.ProxyNDP {
			return Invalid("pool %s is on-link on %s (route %s dev %s): the neighbours there ask for each address by neighbour discovery, and nothing answers for it (net.ipv6.conf.%s.proxy_ndp is 0), so replies would never arrive; have the upstream router route the prefix to this host instead, or turn on neighbour proxying (proxy_ndp and an NDP proxy such as ndppd)", p, l.Iface, l.Route, l.Iface, l.Iface)
		}
	}
	return nil
}
