package nft

import (
	"bytes"
	"slices"

	"github.com/egress-snat/egress-snat/snat"
)

// Patch is Plan for a change of a few entries without the others: it
// turns have, the table Render made of some entries, into the table of
// those entries less removed and plus added, when every entry removed or
// added is a destination of a set of have that stays a set (a group of
// snat.SetThreshold destinations or more), and no mark or hold chain is
// involved.
// It then returns the program, elements deleted and added (the cost is
// the change's and the touched sets' copies, whatever the number of
// entries), and the new table, which shares what did not change with
// have and leaves have as it was. Otherwise ok is false: render and plan
// the whole. removed and added are what changed in Normalize's output.
//
// A daemon that keeps the table it wrote uses it for a change of a few
// destinations among a million: Render of a million entries takes about
// 150 ms, Patch about as long as copying the sets it touches.
func Patch(have *Table, removed, added []snat.Entry) (p Program, want *Table, ok bool) {
	if have == nil || have.Chain(ChainMarkOut) != nil || have.Chain(ChainMarkFwd) != nil || have.Chain(ChainHold) != nil || len(have.Foreign) > 0 {
		return p, nil, false
	}
	type change struct{ add, del Elems }
	changes := map[string]*change{}
	var order []string
	for k, es := range [][]snat.Entry{removed, added} {
		for i := range es {
			e := &es[i]
			if check(e) != nil || e.Marked || e.Hold {
				return p, nil, false
			}
			if e.Routed {
				continue // a route carries it; without marks, no rule of ours
			}
			a := natAction(e)
			gr := group{chain: ChainNAT, fam: e.Family(), sender: e.Sender, bits: e.Dst.Bits(), out: e.Out, natural: e.Natural, action: a, actKey: a.key()}
			name := gr.setName()
			if gr.bits == 0 || have.Set(name) == nil {
				return p, nil, false
			}
			c := changes[name]
			if c == nil {
				c = &change{add: NewElems(gr.fam), del: NewElems(gr.fam)}
				changes[name] = c
				order = append(order, name)
			}
			if k == 0 {
				c.del.Add(e.Dst.Masked().Addr())
			} else {
				c.add.Add(e.Dst.Masked().Addr())
			}
		}
	}
	want = &Table{Chains: have.Chains, Sets: slices.Clone(have.Sets)}
	slices.Sort(order)
	for _, name := range order {
		c := changes[name]
		c.add.normalize()
		c.del.normalize()
		// An element both removed and added stays.
		plus, minus := c.del.diff(c.add)
		s := want.Set(name)
		// What is deleted must be there; what is added may be.
		added := Elems{width: plus.width}
		for i := range minus.Len() {
			if !s.Elems.contains(minus.key(i)) {
				return Program{}, nil, false
			}
		}
		for i := range plus.Len() {
			if !s.Elems.contains(plus.key(i)) {
				added.b = append(added.b, plus.key(i)...)
			}
		}
		if s.Elems.Len()-minus.Len()+added.Len() < snat.SetThreshold {
			return Program{}, nil, false
		}
		s.Elems = merge(s.Elems, minus, added)
		if minus.Len() > 0 {
			p.Steps = append(p.Steps, DeleteElements{Set: name, Elems: minus})
		}
		if added.Len() > 0 {
			p.Steps = append(p.Steps, AddElements{Set: name, Elems: added})
		}
	}
	return p, want, true
}

// merge returns the sorted elements of e without del and with add (both
// sorted; del a part of e, add apart from it), in a new list. The runs
// between changes are copied whole: at 900,000 elements, a copy key by key
// took 40 ms, the whole run 1.
func merge(e, del, add Elems) Elems {
	w := e.width
	out := Elems{width: w, b: make([]byte, 0, len(e.b)+len(add.b))}
	prev, i, j := 0, 0, 0
	for i < del.Len() || j < add.Len() {
		isDel := j == add.Len() || i < del.Len() && bytes.Compare(del.key(i), add.key(j)) < 0
		var key []byte
		if isDel {
			key = del.key(i)
		} else {
			key = add.key(j)
		}
		pos := prev + e.slice(prev, e.Len()).search(key)
		out.b = append(out.b, e.b[prev*w:pos*w]...)
		prev = pos
		if isDel {
			prev++
			i++
		} else {
			out.b = append(out.b, key...)
			j++
		}
	}
	out.b = append(out.b, e.b[prev*w:]...)
	return out
}

// search returns the index of the first element not less than key.
func (e Elems) search(key []byte) int {
	lo, hi := 0, e.Len()
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if bytes.Compare(e.key(m), key) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// contains reports whether the sorted list holds key.
func (e Elems) contains(key []byte) bool {
	i := e.search(key)
	return i < e.Len() && bytes.Equal(e.key(i), key)
}
