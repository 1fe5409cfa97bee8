package snat

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Family is an address family: each has its own nat table and chain.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Families lists both in the order they are written.
var Families = []Family{IPv4, IPv6}

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// FamilyOf returns the family of a.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Entry is one managed rule. New connections matching its Match (who
// sends, to Dst, leaving by Out) get source To; with several To addresses,
// new connections are spread over them in turn. For the host's own traffic
// (host, uid and cgroup senders) the rule matches only packets that would
// leave with the natural source Natural, so applications that bind another
// address keep theirs; forwarded traffic (from senders) has no natural
// source. An Entry with no To keeps the natural source: it carves its match
// out of a broader entry.
type Entry struct {
	Match
	Natural netip.Addr
	To      []netip.Addr
	// Routed entries are carried by a route of ours (package routes)
	// instead of a SNAT rule: the route's src makes To the natural source,
	// and it sends the traffic out of Out through Via (invalid: on-link).
	// Natural is then To[0]. Replies says that Out is another interface
	// than the host's own routes use, so traffic already leaving with To
	// (replies, applications bound to it) is sent that way too.
	Routed  bool
	Via     netip.Addr
	Replies bool
	// Marked entries are a sender's traffic sent out of Out, another
	// interface than its destination's route, by a mark (see
	// backend/iptables/mangle.go); Replies is then true too, and Via is
	// Out's gateway.
	Marked bool
	// Hold says the entry is standing by (see standby.go): its SNAT rule
	// is installed, and the clients' packets that belong to no connection
	// the kernel knows are dropped, until the entry is activated. The
	// backends write and read it back.
	Hold bool
	// Standby says the entry's rule may legitimately have its source on
	// the peer gateway (the rule's standby: key), so an absent source
	// holds it instead of leaving it out. It is the rule's, not the
	// kernel's: it is never read back and takes no part in Equal.
	Standby bool
	// Pool is the IPv6 prefix new connections take their source from
	// (see pool.go), and Sticky how; To is then empty, the kernel picks,
	// but for a period's entry, whose To is the period's one address.
	Pool   netip.Prefix
	Sticky Sticky
	// Ports is the range of source ports SNAT gives (see ports.go); zero:
	// the kernel's own.
	Ports Ports
	// Spill are the addresses of the rule's list that the watch daemon
	// may spill new connections over when an address of To runs out of
	// ports toward one destination port (see spill.go); nil: the rule
	// does not spill. Like Standby it is the rule's, not the kernel's:
	// never read back, no part of Equal.
	Spill []netip.Addr
}

// Method is how an entry is realized: "snat" (a rule in the nat chain) or
// "route" (a route with src, the article's method one).
func (e Entry) Method() string {
	if e.Routed {
		return "route"
	}
	return "snat"
}

// entryJSON is the stable JSON form of an Entry, flat for scripts:
// {"dst", "out", "natural", "to"} as before senders existed, plus "sender"
// and the sender's own field ("from", "uid" or "cgroup"). "to" is null for
// a rule keeping the natural source.
type entryJSON struct {
	Sender  string       `json:"sender"`
	From    string       `json:"from,omitempty"`
	UID     *uint32      `json:"uid,omitempty"`
	Cgroup  string       `json:"cgroup,omitempty"`
	Dst     netip.Prefix `json:"dst"`
	Out     string       `json:"out"`
	Natural string       `json:"natural,omitempty"`
	To      []netip.Addr `json:"to"`
	// Weights are the shares of a weighted spread, one per address of
	// To (which then names each address once); absent when unweighted.
	Weights []int  `json:"weights,omitempty"`
	Method  string `json:"method"`
	Via     string `json:"via,omitempty"`
	// Hold is true while the entry stands by (see Entry.Hold).
	Hold bool `json:"hold,omitempty"`
	// Pool and Sticky: a pool entry's prefix and stickiness; "to" is
	// then [] (the kernel picks), or a period's one address.
	Pool   string `json:"pool,omitempty"`
	Sticky string `json:"sticky,omitempty"`
	// Ports is the source port range, "40000-40099", when one is given.
	Ports string `json:"ports,omitempty"`
	// Proto and DPort: a spill entry's destination port (see spill.go).
	Proto string `json:"proto,omitempty"`
	DPort uint16 `json:"dport,omitempty"`
}

func (e Entry) MarshalJSON() ([]byte, error) {
	j := entryJSON{Sender: e.Sender.kind().String(), Dst: e.Dst, Out: e.Out, To: e.To, Method: e.Method(), Hold: e.Hold}
	if addrs, weights, weighted := Weights(e.To); weighted {
		j.To, j.Weights = addrs, weights
	}
	if e.Via.IsValid() {
		j.Via = e.Via.String()
	}
	if e.Pool.IsValid() {
		j.Pool, j.Sticky = e.Pool.String(), string(e.Sticky)
		if j.To == nil {
			j.To = []netip.Addr{} // not null: null is a kept natural source
		}
	}
	if e.Natural.IsValid() {
		j.Natural = e.Natural.String()
	}
	if !e.Ports.IsZero() {
		j.Ports = e.Ports.String()
	}
	j.Proto, j.DPort = e.Proto, e.DPort
	j.From, j.UID, j.Cgroup = e.Sender.jsonFields()
	return json.Marshal(j)
}

// jsonFields are the sender's own JSON fields: the --from prefix, the uid
// or the cgroup, whichever it has.
func (s Sender) jsonFields() (from string, uid *uint32, cgroup string) {
	switch s.kind() {
	case SenderFrom:
		from = s.From.String()
	case SenderUID:
		u := s.UID
		uid = &u
	case SenderCgroup:
		cgroup = s.Cgroup
	}
	return from, uid, cgroup
}

// Family of the entry.
func (e Entry) Family() Family { return FamilyOf(e.Dst.Addr()) }

// Keep reports whether the entry keeps the natural source.
func (e Entry) Keep() bool { return len(e.To) == 0 && !e.Pool.IsValid() }

// IsPool reports whether the kernel picks the entry's source from its pool.
func (e Entry) IsPool() bool { return e.Pool.IsValid() }

// PeriodAddr is the address of a period's entry (see pool.go), when the
// entry is one and has it.
func (e Entry) PeriodAddr() (netip.Addr, bool) {
	if e.Sticky != StickyPeriod || len(e.To) != 1 || !InPool(e.Pool, e.To[0]) {
		return netip.Addr{}, false
	}
	return e.To[0], true
}

// HostSources are the sources the entry needs the host to have: To, but
// none of a pool's (a period's address is the pool's, routed to the host,
// never one of its addresses).
func (e Entry) HostSources() []netip.Addr {
	if e.IsPool() {
		return nil
	}
	return e.To
}

// Sources reports whether a is a source the entry gives: one of To, or an
// address of its pool.
func (e Entry) Sources(a netip.Addr) bool {
	if e.IsPool() {
		return InPool(e.Pool, a)
	}
	return slices.Contains(e.To, a)
}

// Equal compares two entries field by field.
func (e Entry) Equal(o Entry) bool {
	return e.Match == o.Match && e.Natural == o.Natural && slices.Equal(e.To, o.To) &&
		e.Routed == o.Routed && e.Via == o.Via && e.Replies == o.Replies && e.Marked == o.Marked &&
		e.Hold == o.Hold && e.Pool == o.Pool && e.Sticky == o.Sticky && e.Ports == o.Ports
}

// ToString renders To for people: "192.0.2.23", "192.0.2.22,192.0.2.23",
// "192.0.2.22=3,192.0.2.23=1" for a weighted spread (see Weigh), or
// "(natural)" for a kept natural source; a port range follows as
// " ports 40000-40099".
func (e Entry) ToString() string {
	if !e.Ports.IsZero() && !e.Keep() {
		p := e
		p.Ports = Ports{}
		return p.ToString() + " ports " + e.Ports.String()
	}
	if e.Keep() {
		return "(natural " + e.Natural.String() + ")"
	}
	if e.IsPool() {
		return poolString(e.Pool, e.Sticky, e.To)
	}
	if addrs, weights, weighted := Weights(e.To); weighted {
		return weightList(addrs, weights)
	}
	s := make([]string, len(e.To))
	for i, a := range e.To {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func (e Entry) String() string {
	if e.Routed {
		via := ""
		if e.Via.IsValid() {
			via = " via " + e.Via.String()
		}
		replies := ""
		if e.Replies {
			replies = ", with its replies"
		}
		return fmt.Sprintf("%s route%s dev %s src %s%s", e.Dst, via, e.Out, e.ToString(), replies)
	}
	marked := ""
	if e.Marked {
		marked = " (marked out of " + e.Out + " via " + e.Via.String() + ")"
	}
	if e.Hold {
		marked += " (standing by)"
	}
	dst := e.Dst.String()
	if e.IsSpill() {
		dst += " " + e.Proto + "/" + strconv.Itoa(int(e.DPort))
	}
	if !e.Sender.Local() {
		return fmt.Sprintf("%s to %s via %s -> %s%s", e.Sender, dst, e.Out, e.ToString(), marked)
	}
	who := ""
	if !e.Sender.IsHost() {
		who = e.Sender.String() + " "
	}
	return fmt.Sprintf("%s%s via %s from %s -> %s%s", who, dst, e.Out, e.Natural, e.ToString(), marked)
}

// NeedsNoRule reports whether the entry asks for the source its traffic
// already has, the natural one: Normalize drops it, and nothing is
// installed for it (list and explain still show it when a file asks for it).
func (e Entry) NeedsNoRule() bool { return e.selfTarget() }

// selfTarget reports whether the entry asks for the source the traffic
// already has: such an entry needs no SNAT.
func (e Entry) selfTarget() bool {
	return !e.Routed && e.Sender.Local() && len(e.To) == 1 && e.To[0] == e.Natural
}

// OfFamily returns f's entries, sorted. Sorted input (entries are sorted by
// family first) gives a subslice without copying.
func OfFamily(entries []Entry, f Family) []Entry {
	if sortedEntries(entries) {
		lo, _ := slices.BinarySearchFunc(entries, f, func(e Entry, f Family) int { return int(e.Family()) - int(f) })
		hi := lo
		for hi < len(entries) && entries[hi].Family() == f {
			hi++
		}
		return entries[lo:hi]
	}
	var mine []Entry
	for _, e := range entries {
		if e.Family() == f {
			mine = append(mine, e)
		}
	}
	SortEntries(mine)
	return mine
}

// SetThreshold is the number of destinations sharing interface, natural
// source and target from which a backend puts them into one set (an ipset,
// a set of the nftables table) instead of one rule each. Below it, single
// rules are easier to read in iptables -S or nft list ruleset.
const SetThreshold = 8

// SortEntries orders entries the way the chain evaluates them for single
// rules: family, then longest prefix first, then address, so rendering is
// deterministic.
func SortEntries(es []Entry) {
	if !sortedEntries(es) {
		sort.Slice(es, func(i, j int) bool { return compareEntryRefs(&es[i], &es[j]) < 0 })
	}
}

// sortedEntries is slices.IsSortedFunc(es, CompareEntries) without copying
// two entries into every comparison: at 100,000 entries, checking order by
// value was a tenth of a no-op apply.
func sortedEntries(es []Entry) bool {
	for i := 1; i < len(es); i++ {
		if compareEntryRefs(&es[i-1], &es[i]) > 0 {
			return false
		}
	}
	return true
}

// CompareEntries is the chain's order, which is the precedence: family,
// then who sends (a rule naming a sender before destination-only rules, the
// more specific sender first), then the longest destination prefix first.
// The rest only makes the order total.
func CompareEntries(a, b Entry) int { return compareEntryRefs(&a, &b) }

func compareEntryRefs(a, b *Entry) int {
	if a4, b4 := a.Dst.Addr().Is4(), b.Dst.Addr().Is4(); a4 != b4 {
		if a4 {
			return -1 // IPv4 first, as Families are
		}
		return 1
	}
	// Most neighbours share their sender: the equality test is far
	// cheaper than ranking both.
	if a.Sender != b.Sender {
		if c := a.Sender.compare(b.Sender); c != 0 {
			return c
		}
	}
	if a.IsSpill() != b.IsSpill() {
		if a.IsSpill() {
			return -1 // one port of a destination: narrower than any prefix
		}
		return 1
	}
	if a.Dst.Bits() != b.Dst.Bits() {
		return b.Dst.Bits() - a.Dst.Bits()
	}
	if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
		return c
	}
	if c := strings.Compare(a.Out, b.Out); c != 0 {
		return c
	}
	if c := a.Natural.Compare(b.Natural); c != 0 {
		return c
	}
	if c := strings.Compare(a.Proto, b.Proto); c != 0 {
		return c
	}
	return int(a.DPort) - int(b.DPort)
}

// Normalize returns the entries that need a rule:
//   - an entry whose only target is its natural source needs a rule only
//     when an entry later in the chain that rewrites would otherwise match
//     its traffic; it becomes a keep-natural entry;
//   - a keep-natural entry with nothing later in the chain to protect its
//     traffic from is dropped.
//
// The result is sorted. Normalize is idempotent.
func Normalize(es []Entry) []Entry {
	var keeps []Entry
	for _, e := range es {
		if e.Keep() || e.selfTarget() {
			e.To = nil
			keeps = append(keeps, e)
		}
	}
	if len(keeps) == 0 && sortedEntries(es) {
		// Nothing to drop and in order (Resolve sorts, and a normalized
		// list stays so): the entries as they are, not a copy of every
		// one, which at a million destinations is 200 MB.
		return es
	}
	out := make([]Entry, 0, len(es))
	// Only keep-natural entries look at the rewriting ones: with none (the
	// common case) the copy of every entry is not made.
	var rewriting []Entry
	if len(keeps) > 0 {
		rewriting = make([]Entry, 0, len(es))
		for _, e := range es {
			if !e.Keep() && !e.selfTarget() && !e.Routed {
				rewriting = append(rewriting, e)
			}
		}
	}
	for _, e := range es {
		if e.selfTarget() {
			e.To = nil
		}
		if e.Keep() && !shadowedLater(e, rewriting, keeps) {
			continue
		}
		out = append(out, e)
	}
	SortEntries(out)
	return out
}

// shadowedLater reports whether a rewriting entry that comes after e in the
// chain matches traffic e matches: e then needs its RETURN rule. Within one
// sender a later rule is a broader destination; a later sender's rule (the
// host's, after a uid's) may also be a narrower one. A broader keep-natural
// entry that holds all of e's traffic stops the search: what it keeps, e
// need not (198.51.100.4 kept inside a kept 198.51.100.0/24).
func shadowedLater(e Entry, rewriting, keeps []Entry) bool {
	var cover *Entry
	for i, k := range keeps {
		if k.Match == e.Match || k.Out != e.Out || k.Natural != e.Natural || CompareEntries(k, e) <= 0 {
			continue
		}
		if k.Dst.Bits() <= e.Dst.Bits() && k.Dst.Contains(e.Dst.Addr()) && k.Sender.Contains(e.Sender) &&
			(cover == nil || CompareEntries(k, *cover) < 0) {
			cover = &keeps[i]
		}
	}
	for _, o := range rewriting {
		if o.Out != e.Out || o.Natural != e.Natural || CompareEntries(o, e) <= 0 {
			continue
		}
		if cover != nil && CompareEntries(o, *cover) > 0 {
			continue
		}
		if o.Dst.Overlaps(e.Dst) && o.Sender.Contains(e.Sender) {
			return true
		}
	}
	return false
}

// Effective returns the entry that decides the source of a new connection
// like p: the first entry of the chain (in chain order, see CompareEntries)
// whose rule matches it. Nil means no rule applies.
func Effective(entries []Entry, p Packet) *Entry {
	var best *Entry
	for i, e := range entries {
		if !e.matches(p) {
			continue
		}
		if best == nil || CompareEntries(e, *best) < 0 {
			best = &entries[i]
		}
	}
	return best
}

// Promise returns the entry whose rule the operator set for traffic like
// p: the first entry in chain order whose sender and destination take p,
// whatever the path the kernel takes now. Nil means no rule of ours is
// about this traffic. Unlike Effective, which models what the chain does
// with p, Promise ignores the interface and the natural source an entry
// was resolved with: those are how the rule was realized, and a path that
// changed since (a foreign ip rule ahead of ours, a route with another
// src) makes the rule miss p without changing what was promised. Where
// entries of one sender and destination differ only in their interface
// (set --out), the one for p's interface wins. Judge tells whether the
// promised entry's rule still takes p.
func Promise(entries []Entry, p Packet) *Entry {
	var best *Entry
	for i := range entries {
		e := &entries[i]
		if !e.Dst.Contains(p.Dst) || !e.Sender.takes(p) || e.IsSpill() {
			continue
		}
		if best == nil || promiseBefore(e, best, p.Out) {
			best = e
		}
	}
	return best
}

// promiseBefore orders candidates for Promise: chain order, but between two
// entries of one match but for the interface, the one on out first.
func promiseBefore(a, b *Entry, out string) bool {
	if a.Sender == b.Sender && a.Dst == b.Dst && a.Out != b.Out {
		return a.Out == out
	}
	return compareEntryRefs(a, b) < 0
}

// Judge tells whether e's rule takes p on the path p describes (for a
// marked entry, the path its mark gives). It returns "" when it does,
// else what differs, for people.
func (e Entry) Judge(p Packet) string {
	switch {
	case e.Routed && p.Out != e.Out:
		return fmt.Sprintf("the rule's route sends it out of %s, but the kernel sends it out of %s now", e.Out, p.Out)
	case e.Routed && p.Src != e.To[0]:
		return fmt.Sprintf("the rule's route gives it source %s, but the kernel picks %s now", e.To[0], p.Src)
	case e.Routed:
		return ""
	case p.Out != e.Out:
		return fmt.Sprintf("the rule is for traffic leaving by %s, but it leaves by %s now", e.Out, p.Out)
	case e.Sender.Local() && p.Src != e.Natural:
		return fmt.Sprintf("the rule rewrites natural source %s, but the kernel picks %s now", e.Natural, p.Src)
	}
	return ""
}

// takes reports whether s selects the traffic of p, by who sends alone.
func (s Sender) takes(p Packet) bool {
	switch s.kind() {
	case SenderFrom:
		return p.Forwarded && s.From.Contains(p.Src)
	case SenderUID:
		return !p.Forwarded && p.HasUID && p.UID == s.UID
	case SenderCgroup:
		return !p.Forwarded && p.Cgroup != "" && s.Contains(Cgroup(p.Cgroup))
	}
	return !p.Forwarded
}

// Merge returns installed with the entries of updates added, replacing any
// installed entry for the same sender and destination: setting a
// destination again replaces its source, as routes do.
func Merge(installed, updates []Entry) []Entry {
	type who struct {
		Sender Sender
		Dst    netip.Prefix
	}
	replaced := map[who]bool{}
	for _, u := range updates {
		replaced[who{u.Sender, u.Dst}] = true
	}
	out := make([]Entry, 0, len(updates)+len(installed))
	out = append(out, updates...)
	for _, e := range installed {
		if !replaced[who{e.Sender, e.Dst}] {
			out = append(out, e)
		}
	}
	return out
}
