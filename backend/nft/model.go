package nft

import (
	"bytes"
	"fmt"
	"iter"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// Table is our table, typed: what Render wants and what Read found. Chains
// are in a fixed order (ChainNAT, ChainMarkOut, ChainMarkFwd, ChainHold, as present),
// sets sorted by name.
type Table struct {
	Chains []Chain
	Sets   []Set
	// Foreign lists, as read back, what the table holds that this package
	// does not write (a chain or set of another name, a rule of another
	// shape). Plan removes it: the table is ours.
	Foreign []string
}

// Chain is one chain of the table. Every chain of ours is a base chain.
type Chain struct {
	Name  string
	Hook  Hook
	Rules []Rule
}

// Hook is where a base chain is attached.
type Hook struct {
	Type     string // "nat", "route" or "filter"
	Hook     string // "postrouting", "output" or "prerouting"
	Priority int32
}

// Set is a hash set of destinations of one family, masked to one prefix
// length.
type Set struct {
	Name   string
	Family snat.Family
	// Bits is the prefix length its elements are masked to: the rule that
	// uses it masks the destination address to it before the lookup.
	Bits  int
	Elems Elems
	// Count is, in a table read back, the kernel's count of the set's
	// elements (Linux 6.17 and later; -1 before), which ReadShape gets
	// without dumping them: the cheap check that a set holds as many
	// elements as wanted. Rendered tables leave it 0; comparisons of
	// tables ignore it.
	Count int
}

// Rule is one rule, typed: the matches it makes, in the order the
// expressions test them, and one action. The zero value of a match field
// matches everything.
type Rule struct {
	// Family restricts the rule to one family (meta nfproto).
	Family snat.Family
	// CtNew matches the packets of new connections (ct state new). In the
	// nat chain, which sees no others, it matches everything: the rule
	// is there for its conntrack expression (see keeper in render.go).
	CtNew bool
	// CtNewOrInvalid matches the packets of no connection conntrack knows
	// (ct state new,invalid): what a hold drops.
	CtNewOrInvalid bool
	// Unmarked matches packets that carry no mark of ours yet
	// (meta mark & MarkMask == 0): the first marking rule wins.
	Unmarked bool
	// Out is the output interface (oifname, exact).
	Out string
	// Forwarded matches packets whose source is not a local address
	// (fib saddr type != local): a --from rule never rewrites the host's
	// own traffic, even from an address inside its prefix.
	Forwarded bool
	// Src is the natural source as a host prefix, or a --from prefix.
	Src netip.Prefix
	// HasUID and UID: the socket's owner (meta skuid).
	HasUID bool
	UID    uint32
	// Cgroup: the socket's cgroup v2 subtree (xt match cgroup --path).
	Cgroup string
	// Dst is one destination (ip daddr DST); Set names a set of them,
	// whose elements are masked to SetBits (ip daddr & MASK @Set). With
	// neither, every destination matches.
	Dst     netip.Prefix
	Set     string
	SetBits int
	// Proto matches one transport protocol (meta l4proto tcp or udp):
	// the rules of an entry's port range, which the kernel applies only
	// to a protocol with ports (see snat.Ports).
	Proto string
	// DPort matches one destination port (th dport, with Proto): a
	// spill entry's (snat.Match.DPort).
	DPort uint16
	// Counter counts the packets the rule acts on: for the nat chain,
	// new connections (NAT sees no other packet).
	Counter bool
	Action  Action
	// Comment is for people reading the ruleset (rule userdata).
	Comment string
	// Packets and Bytes are the counter's values, read back only. They
	// never take part in comparisons.
	Packets, Bytes uint64
}

// Action is what a rule does with the packets it matches.
type Action struct {
	Kind ActionKind
	// To is SNAT's address, or the addresses new connections are spread
	// over in turn.
	To []netip.Addr
	// Mark is the value under MarkMask that ActMark sets, and that
	// ActRestoreMark and ActSaveMark match and copy.
	Mark uint32
	// Pool is the IPv6 prefix ActSNAT takes an address of, Sticky how
	// (see pool.go); To is then empty.
	Pool   netip.Prefix
	Sticky snat.Sticky
	// Ports is ActSNAT's source port range (snat.Ports); zero: the
	// kernel's own. Only in a rule with Proto.
	Ports snat.Ports
}

// ActionKind names an action.
type ActionKind string

const (
	// ActSNAT: snat to Action.To (numgen inc round-robin over several).
	ActSNAT ActionKind = "snat"
	// ActAccept ends our chain without NAT: the natural source is kept
	// (unless a later nat chain of someone else's binds it).
	ActAccept ActionKind = "accept"
	// ActCount only counts: the packet goes on to the next rule.
	ActCount ActionKind = "count"
	// ActReturn ends a mark chain without marking.
	ActReturn ActionKind = "return"
	// ActDrop drops the packet: a hold's rule.
	ActDrop ActionKind = "drop"
	// ActMark sets the mark of ours to Action.Mark, keeping other bits.
	ActMark ActionKind = "mark"
	// ActRestoreMark: for a connection whose ct mark of ours is
	// Action.Mark, set the packet's mark of ours to it (the packets the
	// kernel sends without the socket, like the last ACK after close).
	ActRestoreMark ActionKind = "restore-mark"
	// ActSaveMark: for a packet whose mark of ours is Action.Mark, set the
	// connection's mark of ours to it.
	ActSaveMark ActionKind = "save-mark"
)

func (a Action) equal(o Action) bool {
	return a.Kind == o.Kind && a.Mark == o.Mark && slices.Equal(a.To, o.To) && a.Pool == o.Pool && a.Sticky == o.Sticky && a.Ports == o.Ports
}

// Equal compares two rules, without their counters' values.
func (r Rule) Equal(o Rule) bool {
	return r.Family == o.Family && r.CtNew == o.CtNew && r.CtNewOrInvalid == o.CtNewOrInvalid && r.Unmarked == o.Unmarked && r.Out == o.Out && r.Forwarded == o.Forwarded &&
		r.Src == o.Src && r.HasUID == o.HasUID && r.UID == o.UID && r.Cgroup == o.Cgroup &&
		r.Dst == o.Dst && r.Set == o.Set && r.SetBits == o.SetBits && r.Proto == o.Proto && r.DPort == o.DPort && r.Counter == o.Counter &&
		r.Comment == o.Comment && r.Action.equal(o.Action)
}

// Equal compares two chains, without counters.
func (c Chain) Equal(o Chain) bool {
	return c.Name == o.Name && c.Hook == o.Hook && slices.EqualFunc(c.Rules, o.Rules, Rule.Equal)
}

// Chain returns the chain named name, or nil.
func (t *Table) Chain(name string) *Chain {
	if t == nil {
		return nil
	}
	for i := range t.Chains {
		if t.Chains[i].Name == name {
			return &t.Chains[i]
		}
	}
	return nil
}

// Set returns the set named name, or nil.
func (t *Table) Set(name string) *Set {
	if t == nil {
		return nil
	}
	i, ok := slices.BinarySearchFunc(t.Sets, name, func(s Set, n string) int { return strings.Compare(s.Name, n) })
	if !ok {
		return nil
	}
	return &t.Sets[i]
}

// CountsMatch reports whether every set of want is in t (a table read
// back by ReadShape) with as many elements as want's: the cheap check of
// the elements, which a dump of big sets is not. It is false when the
// kernel does not count (Linux before 6.17).
func (t *Table) CountsMatch(want *Table) bool {
	for _, w := range want.Sets {
		s := t.Set(w.Name)
		if s == nil || s.Count != w.Elems.Len() {
			return false
		}
	}
	return true
}

// Elements counts the elements of every set.
func (t *Table) Elements() int {
	n := 0
	if t != nil {
		for _, s := range t.Sets {
			n += s.Elems.Len()
		}
	}
	return n
}

// Elems are the elements of a set: addresses of one family, packed in
// network order (4 or 16 bytes each), sorted and unique once Render or
// Read made them. Packed, a million IPv4 destinations take 4 MB instead of
// the 24 MB of []netip.Addr, which matters to a daemon that keeps what it
// installed to plan the next change against it.
type Elems struct {
	width int
	b     []byte
}

// NewElems returns an empty element list of family f.
func NewElems(f snat.Family) Elems {
	if f == snat.IPv6 {
		return Elems{width: 16}
	}
	return Elems{width: 4}
}

// ElemsOf returns the element list of addrs (all of family f), sorted and
// unique.
func ElemsOf(f snat.Family, addrs ...netip.Addr) Elems {
	e := NewElems(f)
	for _, a := range addrs {
		e.Add(a)
	}
	e.normalize()
	return e
}

// Add appends a (of the list's family). The list is sorted and unique again
// only after normalize.
func (e *Elems) Add(a netip.Addr) {
	if e.width == 16 {
		b := a.As16()
		e.b = append(e.b, b[:]...)
		return
	}
	b := a.As4()
	e.b = append(e.b, b[:]...)
}

// Len is the number of elements.
func (e Elems) Len() int {
	if e.width == 0 {
		return 0
	}
	return len(e.b) / e.width
}

// At returns element i.
func (e Elems) At(i int) netip.Addr {
	a, _ := netip.AddrFromSlice(e.b[i*e.width : (i+1)*e.width])
	return a
}

// key returns element i's bytes, as the kernel takes them.
func (e Elems) key(i int) []byte { return e.b[i*e.width : (i+1)*e.width] }

// All yields the elements in order.
func (e Elems) All() iter.Seq[netip.Addr] {
	return func(yield func(netip.Addr) bool) {
		for i := range e.Len() {
			if !yield(e.At(i)) {
				return
			}
		}
	}
}

// Addrs returns the elements as addresses.
func (e Elems) Addrs() []netip.Addr { return slices.Collect(e.All()) }

// Equal reports whether both lists hold the same elements in the same order.
func (e Elems) Equal(o Elems) bool { return e.Len() == o.Len() && bytes.Equal(e.b, o.b) }

// slice returns elements [i, j) without copying.
func (e Elems) slice(i, j int) Elems { return Elems{width: e.width, b: e.b[i*e.width : j*e.width]} }

// normalize sorts the elements and drops duplicates. Elements appended in
// order (Render's input is sorted) are only checked.
func (e *Elems) normalize() {
	n := e.Len()
	sorted := true
	for i := 1; i < n; i++ {
		if bytes.Compare(e.key(i-1), e.key(i)) >= 0 {
			sorted = false
			break
		}
	}
	if sorted {
		return
	}
	keys := make([][]byte, n)
	for i := range n {
		keys[i] = e.key(i)
	}
	slices.SortFunc(keys, bytes.Compare)
	out := make([]byte, 0, len(e.b))
	for i, k := range keys {
		if i > 0 && bytes.Equal(keys[i-1], k) {
			continue
		}
		out = append(out, k...)
	}
	e.b = out
}

// diff returns the elements of want that e lacks and those of e that want
// lacks. Both must be sorted.
func (e Elems) diff(want Elems) (add, del Elems) {
	add, del = Elems{width: want.width}, Elems{width: e.width}
	if want.width == 0 {
		add.width = e.width
	}
	i, j := 0, 0
	const block = 1024
	w := e.width
	for i < e.Len() || j < want.Len() {
		// Most of two versions of a big set is the same: skip equal runs
		// a block at a time, at the speed of memcmp.
		for i+block <= e.Len() && j+block <= want.Len() && bytes.Equal(e.b[i*w:(i+block)*w], want.b[j*w:(j+block)*w]) {
			i, j = i+block, j+block
		}
		switch {
		case j == want.Len():
			del.b = append(del.b, e.key(i)...)
			i++
		case i == e.Len():
			add.b = append(add.b, want.key(j)...)
			j++
		default:
			switch c := bytes.Compare(e.key(i), want.key(j)); {
			case c == 0:
				i++
				j++
			case c < 0:
				del.b = append(del.b, e.key(i)...)
				i++
			default:
				add.b = append(add.b, want.key(j)...)
				j++
			}
		}
	}
	return add, del
}

// nft(8) syntax, for people and for dry runs.

func famWord(f snat.Family) string {
	if f == snat.IPv6 {
		return "ip6"
	}
	return "ip"
}

func nfprotoWord(f snat.Family) string {
	if f == snat.IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

func keyType(f snat.Family) string {
	if f == snat.IPv6 {
		return "ipv6_addr"
	}
	return "ipv4_addr"
}

// maskAddr is the address whose first bits bits are ones: nft's mask.
func maskAddr(f snat.Family, bits int) netip.Addr {
	n := 4
	if f == snat.IPv6 {
		n = 16
	}
	b := make([]byte, n)
	for i := range b {
		switch {
		case bits >= 8:
			b[i] = 0xff
			bits -= 8
		case bits > 0:
			b[i] = byte(0xff << (8 - bits))
			bits = 0
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// String renders the rule as nft(8) writes it in a chain. The cgroup match
// has no nft syntax (nft lists it as `xt match "cgroup"`); it is shown as
// iptables names it.
func (r Rule) String() string {
	var w []string
	add := func(s ...string) { w = append(w, s...) }
	if r.Family != 0 {
		add("meta nfproto", nfprotoWord(r.Family))
	}
	if r.CtNew {
		add("ct state new")
	}
	if r.CtNewOrInvalid {
		add("ct state invalid,new")
	}
	if r.Unmarked {
		add(fmt.Sprintf("meta mark & %#08x == 0", MarkMask))
	}
	if r.Out != "" {
		add("oifname", strconv.Quote(r.Out))
	}
	if r.Forwarded {
		add("fib saddr type != local")
	}
	if r.Src.IsValid() {
		s := r.Src.String()
		if r.Src.IsSingleIP() {
			s = r.Src.Addr().String()
		}
		add(famWord(snat.FamilyOf(r.Src.Addr())), "saddr", s)
	}
	if r.HasUID {
		add("meta skuid", strconv.FormatUint(uint64(r.UID), 10))
	}
	if r.Cgroup != "" {
		add("xt match cgroup --path", strconv.Quote(r.Cgroup))
	}
	switch {
	case r.Dst.IsValid():
		s := r.Dst.String()
		if r.Dst.IsSingleIP() {
			s = r.Dst.Addr().String()
		}
		add(famWord(snat.FamilyOf(r.Dst.Addr())), "daddr", s)
	case r.Set != "":
		f := r.Family
		add(famWord(f), "daddr")
		if r.SetBits < maskAddr(f, 0).BitLen() {
			add("&", maskAddr(f, r.SetBits).String(), "==")
		}
		add("@" + r.Set)
	}
	if r.Proto != "" {
		add("meta l4proto", r.Proto)
	}
	if r.DPort != 0 {
		add("th dport", strconv.Itoa(int(r.DPort)))
	}
	if r.Counter {
		add("counter")
	}
	if a := r.Action.string(r.Family); a != "" {
		add(a)
	}
	if r.Comment != "" {
		add("comment", strconv.Quote(r.Comment))
	}
	return strings.Join(w, " ")
}

func (a Action) string(f snat.Family) string {
	m := fmt.Sprintf("%#08x", MarkMask)
	keep := fmt.Sprintf("%#08x", ^uint32(MarkMask))
	v := fmt.Sprintf("%#08x", a.Mark)
	switch a.Kind {
	case ActSNAT:
		if a.Pool.IsValid() && len(a.To) == 1 {
			return fmt.Sprintf("snat %s to %s (pool %s per %s)", famWord(f), a.To[0], a.Pool, a.Sticky)
		}
		if a.Pool.IsValid() {
			return fmt.Sprintf("snat %s to %s (per %s: computed, see egress-snat list)", famWord(f), a.Pool, a.Sticky)
		}
		ports := ""
		if !a.Ports.IsZero() {
			ports = ":" + a.Ports.String()
		}
		if len(a.To) == 1 {
			if ports != "" && f == snat.IPv6 {
				return "snat " + famWord(f) + " to [" + a.To[0].String() + "]" + ports
			}
			return "snat " + famWord(f) + " to " + a.To[0].String() + ports
		}
		var m []string
		for i, to := range a.To {
			m = append(m, fmt.Sprintf("%d : %s", i, to))
		}
		return fmt.Sprintf("snat %s to numgen inc mod %d map { %s }%s", famWord(f), len(a.To), strings.Join(m, ", "), ports)
	case ActMark:
		return "meta mark set meta mark & " + keep + " | " + v
	case ActRestoreMark:
		return "ct mark & " + m + " == " + v + " meta mark set meta mark & " + keep + " | " + v
	case ActSaveMark:
		return "meta mark & " + m + " == " + v + " ct mark set ct mark & " + keep + " | " + v
	case ActCount:
		return ""
	}
	return string(a.Kind)
}

// hookString is the chain's declaration as nft(8) writes it.
func (h Hook) String() string {
	prio := strconv.Itoa(int(h.Priority))
	switch h.Priority {
	case NATPriority:
		prio = "srcnat - 10"
	case MarkPriority:
		prio = "mangle"
	case HoldPriority:
		prio = "filter"
	}
	return fmt.Sprintf("type %s hook %s priority %s; policy accept;", h.Type, h.Hook, prio)
}

// String renders the table as `nft -f` input that would create it.
func (t *Table) String() string {
	var b strings.Builder
	b.WriteString("table inet " + TableName + " {\n")
	for _, s := range t.Sets {
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n", s.Name, keyType(s.Family))
		if s.Elems.Len() > 0 {
			b.WriteString("\t\telements = { ")
			writeElems(&b, s.Elems)
			b.WriteString(" }\n")
		}
		b.WriteString("\t}\n")
	}
	for _, c := range t.Chains {
		fmt.Fprintf(&b, "\tchain %s {\n\t\t%s\n", c.Name, c.Hook)
		for _, r := range c.Rules {
			b.WriteString("\t\t" + r.String() + "\n")
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func writeElems(b *strings.Builder, e Elems) {
	var buf [64]byte
	for i := range e.Len() {
		if i > 0 {
			b.WriteString(", ")
		}
		b.Write(e.At(i).AppendTo(buf[:0]))
	}
}
