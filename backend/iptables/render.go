package iptables

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"unsafe"

	"github.com/egress-snat/egress-snat/snat"
)

// Set is one ipset hash:net of destinations.
type Set struct {
	Name    string         `json:"name"`
	Family  snat.Family    `json:"family"`
	Members []netip.Prefix `json:"members"`
	// NoMatch holds more specific destinations of other entries inside
	// Members: exceptions, so the longest prefix wins across sets and rules.
	NoMatch []netip.Prefix `json:"nomatch,omitempty"`
	// MaxElem is the kernel's limit for an installed set (0: unknown or
	// not installed): a change in place cannot grow the set past it.
	MaxElem int `json:"-"`
}

// Chain is the rendered content of one family's managed chain, the
// addresses its keep chain holds conntrack for (linger.go; set by
// MakePlan, not Render), and the hold chain's rules (hold.go; set by
// MakePlan from held, once the sets have their final names).
type Chain struct {
	Family snat.Family
	Rules  []Rule
	Sets   []Set
	Keep   []netip.Addr
	Hold   []Rule
	// held says, for each of Rules, whether its entries stand by.
	held []bool
}

// Render turns one family's normalized entries into chain rules and sets.
// It is pure: the same entries always give the same text and set names.
//
// The chain is a sequence of blocks, one per sender, in precedence order
// (see compareEntries). Within a block the set rules come first, then the
// single rules longest prefix first; each set holds, as nomatch exceptions,
// the more specific destinations of the block's other entries, so the
// longest prefix wins within a block whatever holds it. Blocks need no
// exceptions between them: an earlier block is the more specific sender.
func Render(f snat.Family, entries []snat.Entry) Chain {
	c := Chain{Family: f}
	mine := snat.OfFamily(entries, f)
	if slices.ContainsFunc(mine, func(e snat.Entry) bool { return e.Routed }) {
		// Routes carry these: the chain has no rule for them.
		mine = slices.DeleteFunc(slices.Clone(mine), func(e snat.Entry) bool { return e.Routed })
	}
	for lo := 0; lo < len(mine); {
		hi := lo + 1
		for hi < len(mine) && mine[hi].Sender == mine[lo].Sender {
			hi++
		}
		renderBlock(&c, mine[lo:hi])
		lo = hi
	}
	return c
}

// renderBlock appends the rules and sets of one sender's sorted entries.
// Spill entries (one destination port, see snat/spill.go) come first, as
// single rules, ahead of the sets too: each is narrower than the rule it
// spills from, which may be a set's, and is no set member nor exception.
func renderBlock(c *Chain, block []snat.Entry) {
	if slices.ContainsFunc(block, func(e snat.Entry) bool { return e.IsSpill() }) {
		var rest []snat.Entry
		for _, e := range block {
			if e.IsSpill() {
				c.add(rulesFor(e, ""), e.Hold)
			} else {
				rest = append(rest, e)
			}
		}
		block = rest
	}
	// Group by position: entries are large, and a 100,000-entry group
	// copied on every append costs more than the rest of planning.
	groups := map[groupKey][]int{}
	var order []groupKey
	var singles []int
	var keys grouper
	for i := range block {
		if block[i].Dst.Bits() == 0 {
			singles = append(singles, i) // hash:net cannot hold /0
			continue
		}
		k := keys.key(&block[i])
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], i)
	}
	inSet := map[groupKey]bool{}
	for _, k := range order {
		if len(groups[k]) >= snat.SetThreshold {
			inSet[k] = true
		}
	}
	var nomatch map[groupKey][]netip.Prefix
	if len(order) > 1 {
		// With one group every entry is in it: no exceptions to find.
		nomatch = exceptions(block, inSet)
	}
	for _, k := range order {
		g := groups[k]
		if !inSet[k] {
			singles = append(singles, g...)
			continue
		}
		s := Set{Family: c.Family, NoMatch: nomatch[k], Members: make([]netip.Prefix, 0, len(g))}
		for _, i := range g {
			s.Members = append(s.Members, block[i].Dst)
		}
		slices.SortFunc(s.Members, comparePrefix)
		slices.SortFunc(s.NoMatch, comparePrefix)
		s.Name = setName(s)
		c.Sets = append(c.Sets, s)
		c.add(rulesFor(block[g[0]], s.Name), block[g[0]].Hold)
	}
	// block is sorted, so sorting the positions sorts the single rules.
	slices.Sort(singles)
	for _, i := range singles {
		c.add(rulesFor(block[i], ""), block[i].Hold)
	}
}

// add appends one entry's (or set group's) rules.
func (c *Chain) add(rules []Rule, held bool) {
	c.Rules = append(c.Rules, rules...)
	for range rules {
		c.held = append(c.held, held)
	}
}

// groupKey identifies the entries that can share one set rule: same
// sender, interface, natural source and target, and standing by or not.
type groupKey struct {
	Sender  snat.Sender
	Out     string
	Natural netip.Addr
	To      string
	Hold    bool
}

// grouper computes group keys for many entries. Entries resolved from one
// rule share their To slice, so it remembers the last slice it rendered:
// at 100,000 destinations, rendering To once per entry was a tenth of an
// apply.
type grouper struct {
	last    *netip.Addr
	lastLen int
	lastStr string
}

func (g *grouper) key(e *snat.Entry) groupKey {
	if len(e.To) == 0 || unsafe.SliceData(e.To) != g.last || len(e.To) != g.lastLen {
		g.last, g.lastLen, g.lastStr = unsafe.SliceData(e.To), len(e.To), toKey(e)
	}
	return groupKey{Sender: e.Sender, Out: e.Out, Natural: e.Natural, To: g.lastStr, Hold: e.Hold}
}

// toKey is To as a group key: every address in order, as the rules give
// them. Not ToString, which collapses a weighted spread into its weights:
// two orders of the same weights are different rules.
func toKey(e *snat.Entry) string {
	if e.Keep() {
		return ""
	}
	if e.IsPool() {
		k := "pool " + e.Pool.String() + " " + string(e.Sticky)
		if len(e.To) == 1 {
			k += " " + e.To[0].String() // a period's address
		}
		return k
	}
	var b strings.Builder
	if !e.Ports.IsZero() {
		b.WriteString("ports " + e.Ports.String() + " ")
	}
	for i, a := range e.To {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(a.String())
	}
	return b.String()
}

// exceptions finds, for every set group, the destinations of other entries
// that lie strictly inside one of its members. Walking up each prefix's
// supernets keeps this O(entries × address bits).
func exceptions(entries []snat.Entry, inSet map[groupKey]bool) map[groupKey][]netip.Prefix {
	out := map[groupKey][]netip.Prefix{}
	if len(inSet) == 0 {
		return out
	}
	owner := make(map[netip.Prefix][]groupKey, len(entries))
	var lengths []int // prefix lengths in use, longest first
	var keys grouper
	for i := range entries {
		e := &entries[i]
		if k := keys.key(e); !slices.Contains(owner[e.Dst], k) {
			owner[e.Dst] = append(owner[e.Dst], k)
		}
		if !slices.Contains(lengths, e.Dst.Bits()) {
			lengths = append(lengths, e.Dst.Bits())
		}
	}
	slices.Sort(lengths)
	slices.Reverse(lengths)
	for i := range entries {
		e := &entries[i]
		mine := keys.key(e)
		var added []groupKey
		for _, bits := range lengths {
			if bits >= e.Dst.Bits() {
				continue
			}
			super, _ := e.Dst.Addr().Prefix(bits)
			for _, k := range owner[super] {
				if k == mine || !inSet[k] || slices.Contains(added, k) {
					continue
				}
				added = append(added, k)
				out[k] = append(out[k], e.Dst)
			}
		}
	}
	return out
}

func hostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// comparePrefix orders a set's members as the chain orders entries:
// longest prefix first, then by address. Members read back from a set then
// expand into entries already in chain order, which spares sorting them.
func comparePrefix(a, b netip.Prefix) int {
	if a.Bits() != b.Bits() {
		return b.Bits() - a.Bits()
	}
	return a.Addr().Compare(b.Addr())
}

// setName derives a new set's name from its content. The name is kept
// while the rule that uses the set stays, even when the content changes in
// place (see inplace.go): it tells a set apart, not what it holds now.
func setName(s Set) string {
	h := sha256.New()
	buf := make([]byte, 0, 64)
	for _, p := range s.Members {
		h.Write(append(p.AppendTo(buf[:0]), '\n'))
	}
	h.Write([]byte("nomatch\n"))
	for _, p := range s.NoMatch {
		h.Write(append(p.AppendTo(buf[:0]), '\n'))
	}
	return fmt.Sprintf("%s%d-%s", SetPrefix, s.Family, hex.EncodeToString(h.Sum(nil))[:12])
}

// RestorePayload renders the iptables-restore --noflush input that makes the
// managed chain exactly rules (iptables arguments, without "-A EGRESS-SNAT")
// and puts one jump first in POSTROUTING. existingJumps are the jump rules
// found in POSTROUTING (as iptables-save prints them, minus "-A
// POSTROUTING"); each is deleted in the same transaction, so if another
// writer changed POSTROUTING meanwhile the whole transaction fails instead of
// leaving two jumps.
//
// Declaring ":EGRESS-SNAT - [0:0]" creates the chain or flushes it inside the
// same commit, so no reader ever sees it half written.
func RestorePayload(rules [][]string, existingJumps [][]string) string {
	var b strings.Builder
	b.WriteString("*" + table + "\n")
	b.WriteString(":" + ChainName + " - [0:0]\n")
	for _, j := range existingJumps {
		writeRule(&b, "-D", hookChain, j)
	}
	writeRule(&b, "-I", hookChain+" 1", JumpSpec())
	for _, r := range rules {
		writeRule(&b, "-A", ChainName, r)
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// Args renders every rule of c.
func (c Chain) Args() [][]string {
	out := make([][]string, len(c.Rules))
	for i, r := range c.Rules {
		out[i] = r.Args()
	}
	return out
}

// ClearPayload removes every jump and the chain.
func ClearPayload(existingJumps [][]string) string {
	var b strings.Builder
	b.WriteString("*" + table + "\n")
	b.WriteString(":" + ChainName + " - [0:0]\n")
	for _, j := range existingJumps {
		writeRule(&b, "-D", hookChain, j)
	}
	b.WriteString("-X " + ChainName + "\n")
	b.WriteString("COMMIT\n")
	return b.String()
}

// JumpSpec is the rule in POSTROUTING that sends traffic to the chain.
func JumpSpec() []string {
	return []string{"-m", "comment", "--comment", Comment, "-j", ChainName}
}

func writeRule(b *strings.Builder, op, chain string, spec []string) {
	b.WriteString(op + " " + chain)
	for _, w := range spec {
		b.WriteString(" " + quote(w))
	}
	b.WriteString("\n")
}

// quote makes a word safe for iptables-restore, which splits on blanks and
// understands double quotes.
func quote(w string) string {
	if w != "" && !strings.ContainsAny(w, " \t\"'\\") {
		return w
	}
	// iptables-restore knows only \" and \\ inside double quotes, not Go's
	// \t or \x escapes: blanks stay literal.
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(w) + `"`
}

// SetRestorePayload renders `ipset restore` input creating sets.
func SetRestorePayload(sets []Set) string {
	var b strings.Builder
	for _, s := range sets {
		fam := "inet"
		if s.Family == snat.IPv6 {
			fam = "inet6"
		}
		n := len(s.Members) + len(s.NoMatch)
		maxelem := max(65536, 2*n)
		fmt.Fprintf(&b, "create %s hash:net family %s hashsize %d maxelem %d\n", s.Name, fam, hashSize(n), maxelem)
		b.Grow(n * (len(s.Name) + 24))
		for _, p := range s.Members {
			writeMember(&b, "add", s.Name, p, "")
		}
		for _, p := range s.NoMatch {
			writeMember(&b, "add", s.Name, p, " nomatch")
		}
	}
	return b.String()
}

// writeMember writes one "OP SET PREFIX[SUFFIX]" line of ipset restore
// input without fmt, which cost a tenth of a large apply.
func writeMember(b *strings.Builder, op, set string, p netip.Prefix, suffix string) {
	var buf [64]byte
	b.WriteString(op)
	b.WriteByte(' ')
	b.WriteString(set)
	b.WriteByte(' ')
	b.Write(p.AppendTo(buf[:0]))
	b.WriteString(suffix)
	b.WriteByte('\n')
}

func hashSize(n int) int {
	h := 1024
	for h < n/2 {
		h *= 2
	}
	return h
}

// keepLines are the restore lines, inside *nat, that make the keep chain
// hold exactly for want: declared (which flushes it) with one rule per
// address, or, when want is empty and the chain exists, removed.
func keepLines(want []netip.Addr, exists bool) string {
	var b strings.Builder
	if len(want) == 0 && !exists {
		return ""
	}
	b.WriteString(":" + KeepChain + " - [0:0]\n")
	for _, a := range want {
		writeRule(&b, "-A", KeepChain, KeepSpec(a))
	}
	if len(want) == 0 {
		b.WriteString("-X " + KeepChain + "\n")
	}
	return b.String()
}

// withLines inserts lines into a one-table restore payload, before its
// COMMIT: one transaction.
func withLines(payload, lines string) string {
	if lines == "" {
		return payload
	}
	return strings.TrimSuffix(payload, "COMMIT\n") + lines + "COMMIT\n"
}
