package nft

import (
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// fakeKernel holds our table as the kernel would after each transaction,
// and refuses what the kernel refuses: a rule using a set that does not
// exist, a set deleted while a rule uses it, a chain deleted with rules in
// it, an element deleted that is not there. A transaction that fails
// leaves it as it was.
type fakeKernel struct {
	t *Table
}

func (k *fakeKernel) run(p Program) error {
	work := cloneTable(k.t)
	for _, s := range p.Steps {
		var err error
		work, err = fakeStep(work, s)
		if err != nil {
			return fmt.Errorf("%s: %w", s.Show(), err)
		}
	}
	k.t = work
	return nil
}

func cloneTable(t *Table) *Table {
	if t == nil {
		return nil
	}
	c := &Table{Sets: slices.Clone(t.Sets)}
	for _, ch := range t.Chains {
		ch.Rules = slices.Clone(ch.Rules)
		c.Chains = append(c.Chains, ch)
	}
	return c
}

func used(t *Table, set string) bool {
	for _, c := range t.Chains {
		for _, r := range c.Rules {
			if r.Set == set {
				return true
			}
		}
	}
	return false
}

func fakeStep(t *Table, s Step) (*Table, error) {
	if _, ok := s.(AddTable); !ok && t == nil {
		return nil, unix.ENOENT
	}
	switch s := s.(type) {
	case AddTable:
		if t == nil {
			t = &Table{}
		}
	case DeleteTable:
		return nil, nil
	case AddChain:
		if c := t.Chain(s.Chain.Name); c != nil {
			if c.Hook != s.Chain.Hook {
				return t, unix.EOPNOTSUPP
			}
			return t, nil
		}
		t.Chains = append(t.Chains, Chain{Name: s.Chain.Name, Hook: s.Chain.Hook})
	case FlushChain:
		c := t.Chain(s.Chain)
		if c == nil {
			return t, unix.ENOENT
		}
		c.Rules = nil
	case DeleteChain:
		c := t.Chain(s.Chain)
		switch {
		case c == nil:
			return t, unix.ENOENT
		case len(c.Rules) > 0:
			return t, unix.EBUSY
		}
		t.Chains = slices.DeleteFunc(t.Chains, func(c Chain) bool { return c.Name == s.Chain })
	case AddRule:
		c := t.Chain(s.Chain)
		if c == nil || s.Rule.Set != "" && t.Set(s.Rule.Set) == nil {
			return t, unix.ENOENT
		}
		c.Rules = append(c.Rules, s.Rule)
	case AddSet:
		if h := t.Set(s.Set.Name); h != nil {
			if h.Family != s.Set.Family {
				return t, unix.EEXIST
			}
			return t, nil
		}
		n := s.Set
		n.Elems = NewElems(n.Family)
		t.Sets = append(t.Sets, n)
		slices.SortFunc(t.Sets, func(a, b Set) int { return strings.Compare(a.Name, b.Name) })
	case DeleteSet:
		switch {
		case t.Set(s.Set) == nil:
			return t, unix.ENOENT
		case used(t, s.Set):
			return t, unix.EBUSY
		}
		t.Sets = slices.DeleteFunc(t.Sets, func(x Set) bool { return x.Name == s.Set })
	case AddElements:
		set := t.Set(s.Set)
		if set == nil {
			return t, unix.ENOENT
		}
		e := NewElems(set.Family)
		e.b = append(slices.Clone(set.Elems.b), s.Elems.b...)
		e.normalize()
		set.Elems = e
	case DeleteElements:
		set := t.Set(s.Set)
		if set == nil {
			return t, unix.ENOENT
		}
		remaining, missing := s.Elems.diff(set.Elems)
		if missing.Len() > 0 {
			return t, unix.ENOENT // deleting what is not there
		}
		set.Elems = remaining
	default:
		return t, fmt.Errorf("unknown step %T", s)
	}
	return t, nil
}
