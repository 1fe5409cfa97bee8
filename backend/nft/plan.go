package nft

import (
	"fmt"
	"strings"
)

// Program is one change of our table: steps that Conn.Run sends as one
// netlink transaction, which the kernel applies all or nothing.
type Program struct {
	Steps []Step
}

// Empty reports whether the program changes nothing.
func (p Program) Empty() bool { return len(p.Steps) == 0 }

// Show renders the program as nft(8) input, one command a line: what a
// dry run prints. Applied with `nft -f`, it would make the same change
// (except the cgroup match, which nft(8) cannot write).
func (p Program) Show() string {
	var b strings.Builder
	for _, s := range p.Steps {
		b.WriteString(s.Show())
		b.WriteByte('\n')
	}
	return b.String()
}

// Step is one command of a program.
type Step interface {
	// Show renders the step as an nft(8) command.
	Show() string
	// size and encode write the step's netlink messages (encode.go).
	encode(b *batch)
}

// The steps. Each is one netlink message, but for AddElements and
// DeleteElements, which take as many as the 64 KiB limit on a message's
// element list needs.
type (
	// AddTable creates our table; it is no error if it exists.
	AddTable struct{}
	// DeleteTable deletes our table and everything in it.
	DeleteTable struct{}
	// AddChain creates a base chain.
	AddChain struct{ Chain Chain }
	// FlushChain deletes every rule of a chain.
	FlushChain struct{ Chain string }
	// DeleteChain deletes an empty chain.
	DeleteChain struct{ Chain string }
	// AddRule appends a rule to a chain.
	AddRule struct {
		Chain string
		Rule  Rule
	}
	// AddSet creates an empty set (its Elems are ignored).
	AddSet struct{ Set Set }
	// DeleteSet deletes a set no rule uses any more.
	DeleteSet struct{ Set string }
	// AddElements adds elements to a set; adding one it holds is no error.
	AddElements struct {
		Set   string
		Elems Elems
	}
	// DeleteElements deletes elements from a set; deleting one it does not
	// hold fails the whole transaction, which tells the planner its view
	// of the table was wrong.
	DeleteElements struct {
		Set   string
		Elems Elems
	}
)

const tablePrefix = "inet " + TableName

func (AddTable) Show() string    { return "add table " + tablePrefix }
func (DeleteTable) Show() string { return "delete table " + tablePrefix }
func (s AddChain) Show() string {
	return fmt.Sprintf("add chain %s %s { %s }", tablePrefix, s.Chain.Name, s.Chain.Hook)
}
func (s FlushChain) Show() string  { return fmt.Sprintf("flush chain %s %s", tablePrefix, s.Chain) }
func (s DeleteChain) Show() string { return fmt.Sprintf("delete chain %s %s", tablePrefix, s.Chain) }
func (s AddRule) Show() string     { return fmt.Sprintf("add rule %s %s %s", tablePrefix, s.Chain, s.Rule) }
func (s AddSet) Show() string {
	return fmt.Sprintf("add set %s %s { type %s; }", tablePrefix, s.Set.Name, keyType(s.Set.Family))
}
func (s DeleteSet) Show() string { return fmt.Sprintf("delete set %s %s", tablePrefix, s.Set) }
func (s AddElements) Show() string {
	return showElems("add", s.Set, s.Elems)
}
func (s DeleteElements) Show() string {
	return showElems("delete", s.Set, s.Elems)
}

func showElems(op, set string, e Elems) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s element %s %s { ", op, tablePrefix, set)
	writeElems(&b, e)
	b.WriteString(" }")
	return b.String()
}

// Plan returns the program that turns our table from have into want. nil
// stands for no table: Plan(nil, want) creates it whole, Plan(have, nil)
// deletes it. It is pure and needs have's elements only for the sets both
// tables hold, and then only as the caller knows them: a daemon passes what
// it wrote last, so a change of a few destinations is that many elements
// added and deleted whatever the size of the sets (no dump of the kernel's
// sets); the slow path passes what Read found.
//
// The order is the one the kernel needs within a transaction: chains and
// sets before the rules that use them, rules flushed before the sets they
// used are deleted. A chain whose rules change is flushed and written
// whole (chains are short: a rule per group, not per destination); within
// the transaction, packets see the old chain or the new one.
func Plan(have, want *Table) Program {
	var p Program
	add := func(s ...Step) { p.Steps = append(p.Steps, s...) }
	switch {
	case want == nil && have == nil:
		return p
	case want == nil:
		add(DeleteTable{})
		return p
	case have == nil:
		add(AddTable{})
		for _, c := range want.Chains {
			add(AddChain{Chain: Chain{Name: c.Name, Hook: c.Hook}})
		}
		for _, s := range want.Sets {
			add(AddSet{Set: Set{Name: s.Name, Family: s.Family, Bits: s.Bits}})
			if s.Elems.Len() > 0 {
				add(AddElements{Set: s.Name, Elems: s.Elems})
			}
		}
		for _, c := range want.Chains {
			for _, r := range c.Rules {
				add(AddRule{Chain: c.Name, Rule: r})
			}
		}
		return p
	}

	// A set of ours whose type differs from the one wanted under its name
	// (someone recreated it) is deleted and created again; every rule is
	// then written again, since any may use it.
	rewriteAll := false
	retyped := map[string]bool{}
	for _, s := range want.Sets {
		if h := have.Set(s.Name); h != nil && (h.Family != s.Family || h.Bits != s.Bits) {
			retyped[s.Name], rewriteAll = true, true
		}
	}
	// Chains that go, or come back with another hook: flushed first, so
	// that the sets their rules use can go. One that comes back is
	// deleted at once, to be created again under its name; one that goes
	// is deleted last, when no rule can jump to it any more.
	var gone []string
	for _, h := range have.Chains {
		switch w := want.Chain(h.Name); {
		case w == nil:
			add(FlushChain{Chain: h.Name})
			gone = append(gone, h.Name)
		case w.Hook != h.Hook:
			add(FlushChain{Chain: h.Name}, DeleteChain{Chain: h.Name})
		}
	}
	if rewriteAll {
		for _, h := range have.Chains {
			if w := want.Chain(h.Name); w != nil && w.Hook == h.Hook {
				add(FlushChain{Chain: h.Name})
			}
		}
		for name := range retyped {
			add(DeleteSet{Set: name})
		}
	}
	for _, c := range want.Chains {
		if h := have.Chain(c.Name); h == nil || h.Hook != c.Hook {
			add(AddChain{Chain: Chain{Name: c.Name, Hook: c.Hook}})
		}
	}
	for _, s := range want.Sets {
		h := have.Set(s.Name)
		if h == nil || retyped[s.Name] {
			add(AddSet{Set: Set{Name: s.Name, Family: s.Family, Bits: s.Bits}})
			if s.Elems.Len() > 0 {
				add(AddElements{Set: s.Name, Elems: s.Elems})
			}
			continue
		}
		plus, minus := h.Elems.diff(s.Elems)
		if minus.Len() > 0 {
			add(DeleteElements{Set: s.Name, Elems: minus})
		}
		if plus.Len() > 0 {
			add(AddElements{Set: s.Name, Elems: plus})
		}
	}
	for _, c := range want.Chains {
		h := have.Chain(c.Name)
		same := h != nil && h.Hook == c.Hook && !rewriteAll
		if same && c.Equal(*h) {
			continue
		}
		if same {
			add(FlushChain{Chain: c.Name})
		}
		for _, r := range c.Rules {
			add(AddRule{Chain: c.Name, Rule: r})
		}
	}
	for _, name := range gone {
		add(DeleteChain{Chain: name})
	}
	for _, h := range have.Sets {
		if want.Set(h.Name) == nil {
			add(DeleteSet{Set: h.Name})
		}
	}
	return p
}
