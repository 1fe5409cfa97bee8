package nft

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"iter"
	"net/netip"
	"slices"
	"strings"
	"unsafe"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// ifNameMax is the longest interface name the kernel has (IFNAMSIZ - 1).
const ifNameMax = 15

// Render turns the domain's normalized entries (as snat.Normalize returns
// them, both families) into our table. It is pure: the same entries always
// give the same table and names. Entries that are not in chain order are
// sorted in place first (snat.SortEntries); Normalize's output is.
//
// The nat chain is always there, with its keeper last, even with no rule:
// see the package comment. The mark chains are there only when an entry is
// marked.
func Render(entries []snat.Entry) (*Table, error) {
	snat.SortEntries(entries)
	return RenderSeq(func(yield func(*snat.Entry) bool) {
		for i := range entries {
			if !yield(&entries[i]) {
				return
			}
		}
	})
}

// RenderSeq is Render for entries yielded in chain order (snat.SortEntries'
// order), which it walks once, or twice when some entry is marked. It
// keeps nothing an entry points to but To slices, so a caller may yield
// one Entry rewritten for each destination: at a million destinations the
// table then costs its packed elements (4 MB), not a million 208-byte
// entries.
func RenderSeq(entries iter.Seq[*snat.Entry]) (*Table, error) {
	type markedEntry struct {
		i int
		e snat.Entry
	}
	var (
		g      grouper
		hold   grouper
		marked []markedEntry
		paths  = map[snat.Family][]routes.Path{}
		n      int
		err    error
	)
	for e := range entries {
		if err = check(e); err != nil {
			break
		}
		if e.Routed || e.Marked {
			f := e.Family()
			paths[f] = append(paths[f], routes.Path{Dst: e.Dst, Dev: e.Out, Via: e.Via, Src: e.To[0], Replies: e.Replies, Marked: e.Marked})
		}
		if e.Marked {
			marked = append(marked, markedEntry{n, *e})
		}
		if !e.Routed { // else a route of ours carries it: no rule
			g.add(ChainNAT, e, natAction(e))
		}
		if e.Hold && !e.Routed {
			hold.add(ChainHold, e, Action{Kind: ActDrop})
		}
		n++
	}
	if err != nil {
		return nil, err
	}
	t := &Table{}
	nat := Chain{Name: ChainNAT, Hook: Hook{Type: "nat", Hook: "postrouting", Priority: NATPriority}}
	nat.Rules = append(g.rules(t), keeper)
	t.Chains = append(t.Chains, nat)

	// The mark chains, as snat's mangle chains have them, per family: in
	// the nat chain's precedence order, a marked entry marks what no rule
	// marked before, and an entry that stays on its interface but comes
	// first returns, when a marked entry after it would otherwise take
	// its traffic. Host senders are never marked (a route carries them),
	// nor routed entries.
	out, fwd := &grouper{}, &grouper{}
	if len(marked) > 0 {
		tables := map[snat.Family]map[netip.Addr]int{}
		for f, ps := range paths {
			tables[f] = routes.ReplyTables(ps)
		}
		i := 0
		for e := range entries {
			i++
			f := e.Family()
			if e.Sender.IsHost() || e.Routed || e.IsSpill() || !slices.ContainsFunc(marked, func(m markedEntry) bool { return m.e.Family() == f }) {
				continue
			}
			g := out
			if !e.Sender.Local() {
				g = fwd
			}
			if e.Marked {
				t, ok := tables[f][e.To[0]]
				if !ok {
					continue // more addresses than reply tables: no route takes it
				}
				g.add("mark", e, Action{Kind: ActMark, Mark: routes.MarkOf(t)})
				continue
			}
			if slices.ContainsFunc(marked, func(m markedEntry) bool {
				o := &m.e
				return m.i >= i && o.Family() == f && o.Dst.Overlaps(e.Dst) && (o.Sender.Contains(e.Sender) || e.Sender.Contains(o.Sender))
			}) {
				g.add("mark", e, Action{Kind: ActReturn})
			}
		}
	}
	for _, c := range []struct {
		name string
		hook Hook
		g    *grouper
	}{
		{ChainMarkOut, Hook{Type: "route", Hook: "output", Priority: MarkPriority}, out},
		{ChainMarkFwd, Hook{Type: "filter", Hook: "prerouting", Priority: MarkPriority}, fwd},
	} {
		rules := c.g.rules(t)
		if !slices.ContainsFunc(rules, func(r Rule) bool { return r.Action.Kind == ActMark }) {
			continue
		}
		if c.name == ChainMarkOut {
			rules = withConnmark(rules)
		}
		t.Chains = append(t.Chains, Chain{Name: c.name, Hook: c.hook, Rules: rules})
	}
	if rules := hold.rules(t); len(rules) > 0 {
		t.Chains = append(t.Chains, Chain{Name: ChainHold, Hook: Hook{Type: "filter", Hook: "forward", Priority: HoldPriority}, Rules: rules})
	}
	slices.SortFunc(t.Sets, func(a, b Set) int { return strings.Compare(a.Name, b.Name) })
	return t, nil
}

// keeper is the nat chain's last rule. It counts the new connections no
// rule of ours translated, and its conntrack expression keeps conntrack on
// in the namespace: the kernel turns conntrack off when its last user goes
// (a nat statement is one), and then translates no packet of the
// connections NATed before, not even with the nat chain in place. Found on
// the wire: a live TCP connection through a rule of ours is reset when the
// rule goes, unless a rule with a ct expression stays (and the nat chain:
// another table's ct rule alone does not keep it either).
var keeper = Rule{CtNew: true, Counter: true, Action: Action{Kind: ActCount}, Comment: "new connections passed on"}

// check refuses what the kernel would: names it cannot hold, addresses of
// the other family.
func check(e *snat.Entry) error {
	f := e.Family()
	switch {
	case e.Out == "" && !e.Routed:
		return fmt.Errorf("entry %s: no output interface", e)
	case len(e.Out) > ifNameMax:
		return fmt.Errorf("entry %s: interface name %q is longer than the kernel's %d bytes", e, e.Out, ifNameMax)
	case e.Sender.Local() && !e.Routed && !e.Natural.IsValid():
		return fmt.Errorf("entry %s: a local sender's rule needs the natural source", e)
	case e.Natural.IsValid() && snat.FamilyOf(e.Natural) != f:
		return fmt.Errorf("entry %s: natural source %s is not of the destination's family", e, e.Natural)
	case e.Sender.Kind == snat.SenderFrom && snat.FamilyOf(e.Sender.From.Addr()) != f:
		return fmt.Errorf("entry %s: --from %s is not of the destination's family", e, e.Sender.From)
	case (e.Marked || e.Routed) && len(e.To) == 0:
		return fmt.Errorf("entry %s: a routed or marked entry needs its source", e)
	case len(e.Sender.Cgroup) > 4095:
		return fmt.Errorf("entry %s: cgroup path of %d bytes is longer than the kernel's 4095", e, len(e.Sender.Cgroup))
	}
	for _, a := range e.To {
		if snat.FamilyOf(a) != f {
			return fmt.Errorf("entry %s: source %s is not of the destination's family", e, a)
		}
	}
	if e.Pool.IsValid() {
		if err := snat.CheckPool(e.Pool); err != nil || f != snat.IPv6 {
			return fmt.Errorf("entry %s: pool %s is not an IPv6 pool of the destination's family", e, e.Pool)
		}
		if (e.Sticky == snat.StickyPeriod) != (len(e.To) == 1) || len(e.To) == 1 && !snat.InPool(e.Pool, e.To[0]) {
			return fmt.Errorf("entry %s: pool %s per %s with sources %v: a period has one address of its pool, other pools none", e, e.Pool, e.Sticky, e.To)
		}
	}
	return nil
}

func natAction(e *snat.Entry) Action {
	if e.Keep() {
		return Action{Kind: ActAccept}
	}
	if e.IsPool() {
		return Action{Kind: ActSNAT, Pool: e.Pool, Sticky: e.Sticky, To: e.To} // To: a period's address
	}
	return Action{Kind: ActSNAT, To: e.To, Ports: e.Ports}
}

// withConnmark surrounds the output mark chain's rules with the ct mark
// rules: a local connection's packets that the kernel sends without its
// socket (the last ACK after close) match no owner or cgroup, and get the
// connection's mark back from conntrack. One rule per mark value, because a
// rule can load either the packet's or the connection's mark, not both; a
// value of zero saved resets a connection no rule marks any more.
func withConnmark(rules []Rule) []Rule {
	var marks []uint32
	for _, r := range rules {
		if r.Action.Kind == ActMark && !slices.Contains(marks, r.Action.Mark) {
			marks = append(marks, r.Action.Mark)
		}
	}
	slices.Sort(marks)
	var out []Rule
	for _, m := range marks {
		out = append(out, Rule{Action: Action{Kind: ActRestoreMark, Mark: m}})
	}
	out = append(out, rules...)
	for _, m := range append([]uint32{0}, marks...) {
		out = append(out, Rule{Action: Action{Kind: ActSaveMark, Mark: m}})
	}
	return out
}

// A group is the entries of one rule: one chain, family, sender, prefix
// length, interface, natural source and action. Its destinations go into
// one set, or one rule each when they are few.
type group struct {
	chain   string // "nat" or "mark": names differ, the rule shape too
	fam     snat.Family
	sender  snat.Sender
	bits    int
	out     string
	natural netip.Addr
	action  Action
	actKey  string
	elems   Elems
	// proto and dport are a spill entry's (snat/spill.go): one rule per
	// destination, never a set, ahead of its sender's other rules.
	proto string
	dport uint16
}

type groupKey struct {
	chain   string
	fam     snat.Family
	sender  snat.Sender
	bits    int
	out     string
	natural netip.Addr
	actKey  string
	proto   string
	dport   uint16
}

// grouper collects entries into groups. Consecutive entries usually share
// their group (entries are sorted, and entries resolved from one rule share
// their To slice), so it remembers the last one: at a million
// destinations, a map lookup with a 150-byte key per entry would be a
// tenth of the render.
type grouper struct {
	groups map[groupKey]*group
	last   *group
	lastTo *netip.Addr
	lastN  int
}

func (g *grouper) add(chain string, e *snat.Entry, a Action) {
	bits := e.Dst.Bits()
	if l := g.last; l != nil && l.bits == bits && l.chain == chain && l.sender == e.Sender && l.out == e.Out &&
		l.natural == e.Natural && l.action.Kind == a.Kind && l.action.Mark == a.Mark && l.action.Ports == a.Ports &&
		l.action.Pool == a.Pool && l.action.Sticky == a.Sticky &&
		unsafe.SliceData(a.To) == g.lastTo && len(a.To) == g.lastN && l.fam == e.Family() &&
		l.dport == e.DPort && l.proto == e.Proto {
		l.elems.Add(e.Dst.Masked().Addr())
		return
	}
	k := groupKey{chain: chain, fam: e.Family(), sender: e.Sender, bits: bits, out: e.Out, natural: e.Natural, actKey: a.key(), proto: e.Proto, dport: e.DPort}
	if g.groups == nil {
		g.groups = map[groupKey]*group{}
	}
	gr := g.groups[k]
	if gr == nil {
		gr = &group{chain: chain, fam: k.fam, sender: k.sender, bits: bits, out: k.out, natural: k.natural,
			action: a, actKey: k.actKey, elems: NewElems(k.fam), proto: k.proto, dport: k.dport}
		g.groups[k] = gr
	}
	gr.elems.Add(e.Dst.Masked().Addr())
	g.last, g.lastTo, g.lastN = gr, unsafe.SliceData(a.To), len(a.To)
}

func (a Action) key() string {
	s := string(a.Kind)
	if a.Mark != 0 {
		s += fmt.Sprintf(" %#x", a.Mark)
	}
	for _, to := range a.To {
		s += " " + to.String()
	}
	if a.Pool.IsValid() {
		s += " pool " + a.Pool.String() + " " + string(a.Sticky)
	}
	if !a.Ports.IsZero() {
		s += " ports " + a.Ports.String()
	}
	return s
}

// rules returns the groups' rules in precedence order, adding the sets
// they use to t. The order is snat's (snat.SortEntries on one entry per
// group standing for it: family, sender, longest prefix first, then
// interface and natural source), then the action, so the first rule that
// matches a packet is the entry snat.Effective picks.
func (g *grouper) rules(t *Table) []Rule {
	type rep struct {
		e      snat.Entry
		groups []*group
	}
	reps := map[groupKey]*rep{}
	var es []snat.Entry
	for k, gr := range g.groups {
		k.chain, k.actKey = "", ""
		r := reps[k]
		if r == nil {
			zero := netip.IPv4Unspecified()
			if gr.fam == snat.IPv6 {
				zero = netip.IPv6Unspecified()
			}
			r = &rep{e: snat.Entry{Match: snat.Match{Sender: gr.sender, Dst: netip.PrefixFrom(zero, gr.bits), Out: gr.out, Proto: gr.proto, DPort: gr.dport}, Natural: gr.natural}}
			reps[k] = r
			es = append(es, r.e)
		}
		r.groups = append(r.groups, gr)
	}
	snat.SortEntries(es)
	var out []Rule
	for _, e := range es {
		r := reps[groupKey{fam: e.Family(), sender: e.Sender, bits: e.Dst.Bits(), out: e.Out, natural: e.Natural, proto: e.Proto, dport: e.DPort}]
		slices.SortFunc(r.groups, func(a, b *group) int { return strings.Compare(a.actKey, b.actKey) })
		for _, gr := range r.groups {
			out = append(out, gr.render(t)...)
		}
	}
	return out
}

// render returns the group's rules, adding its set to t when it has one.
// A port range's rules come once for each protocol with ports, then once
// without the range for the rest (see snat.Ports).
func (gr *group) render(t *Table) []Rule {
	rules := gr.renderOnce(t)
	if gr.dport != 0 {
		for i := range rules {
			rules[i].Proto, rules[i].DPort = gr.proto, gr.dport
		}
		return rules
	}
	if gr.action.Ports.IsZero() {
		return rules
	}
	out := make([]Rule, 0, (len(snat.PortProtocols)+1)*len(rules))
	for _, proto := range snat.PortProtocols {
		for _, r := range rules {
			r.Proto = proto
			out = append(out, r)
		}
	}
	for _, r := range rules {
		r.Action.Ports = snat.Ports{}
		out = append(out, r)
	}
	return out
}

func (gr *group) renderOnce(t *Table) []Rule {
	gr.elems.normalize()
	base := Rule{Family: gr.fam, Counter: gr.chain == ChainNAT, Action: gr.action, Comment: comment(gr.sender)}
	switch gr.chain {
	case ChainNAT:
		base.Out = gr.out
	case ChainHold:
		// Counted: stats says how many packets standing by dropped.
		base.Out, base.CtNewOrInvalid, base.Counter = gr.out, true, true
		base.Comment = comment(gr.sender) + holdNote
	}
	if gr.action.Kind == ActMark {
		base.Unmarked = true
	}
	switch s := gr.sender; s.Kind {
	case snat.SenderFrom:
		base.Src, base.Forwarded = s.From, true
	default:
		base.Src = netip.PrefixFrom(gr.natural, gr.natural.BitLen())
		base.HasUID, base.UID = s.Kind == snat.SenderUID, s.UID
		if s.Kind == snat.SenderCgroup {
			base.Cgroup = s.Cgroup
		}
	}
	if gr.bits == 0 {
		return []Rule{base} // every destination: no match on it
	}
	if gr.elems.Len() < snat.SetThreshold || gr.dport != 0 {
		var out []Rule
		for a := range gr.elems.All() {
			r := base
			r.Dst = netip.PrefixFrom(a, gr.bits)
			out = append(out, r)
		}
		return out
	}
	s := Set{Name: gr.setName(), Family: gr.fam, Bits: gr.bits, Elems: gr.elems}
	t.Sets = append(t.Sets, s)
	base.Set, base.SetBits = s.Name, s.Bits
	return []Rule{base}
}

// maxComment is the longest rule comment written: nft(8) takes up to 128
// bytes, and a comment read back must equal the one rendered.
const maxComment = 128

// comment is a rule's comment: its sender, for people reading the ruleset
// (the cgroup match itself lists as `xt match "cgroup"`, without its path).
func comment(s snat.Sender) string {
	c := s.String()
	if len(c) > maxComment-len(holdNote) {
		c = c[:maxComment-len(holdNote)-3] + "..."
	}
	return c
}

// holdNote ends a hold rule's comment, after its sender.
const holdNote = ", standing by"

// setName derives a set's name from its group's identity, not from its
// content: a destination that comes or goes is an element added or
// deleted, and the rule that uses the set stays as it is. "d" sets hold
// the nat chain's destinations, "m" sets the mark chains', "h" the hold's.
func (gr *group) setName() string {
	kind := "m"
	switch gr.chain {
	case ChainNAT:
		kind = "d"
	case ChainHold:
		kind = "h"
	}
	h := sha256.Sum256([]byte(strings.Join([]string{gr.chain, gr.sender.String(), gr.out, gr.natural.String(), gr.actKey}, "\x00")))
	return fmt.Sprintf("%s%d-%d-%s", kind, gr.fam, gr.bits, hex.EncodeToString(h[:])[:10])
}
