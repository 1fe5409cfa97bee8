package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// A set whose content changes a little is changed in place instead of
// rebuilt: the members that leave are deleted from the installed set and
// those that come are added to it, and the desired chain keeps the
// installed set's name (the kernel refuses to rename a set a rule uses).
// The chain is then unchanged and needs no write. The kernel does work for
// the changed members only: one destination changed among 100,000 costs
// one add and one delete instead of a new set of 100,000.
//
// A set's name is therefore the digest of its content when it was created,
// not always of its content now: what pairs an installed set with a desired
// one is the rule that uses it (alike but for the set's name), and the
// members, read from the kernel, decide what changes.
//
// The guarantee is per destination, not per set: while the step runs, a
// destination in both the old and the new content stays in the set, one
// that leaves is still there or already gone, one that comes is not yet
// there or already added. Every destination is old or new, never missing.
// A run killed half-way leaves a set between the two: the next run reads
// its members and finishes the change; check reports it meanwhile.
//
// A larger change (inPlaceMax) is built under a temporary name and
// swapped in, atomic for the whole set, and costs about the same. Both
// apply only when that set is the one thing of its family that changes:
// when the chain or another set changes too, the changed sets are created
// afresh and switched to in the chain's one transaction (freshen), so a
// family's rules and sets never mix old and new.

// inPlaceMax is the largest share of a set's new size that may change in
// place: past it, loading the set afresh is as cheap.
const inPlaceMax = 0.5

// setUpdate is one installed set changed in place into a desired one.
type setUpdate struct {
	From string // the installed set's name
	To   Set    // the desired set
	Do   string // ipset restore input: adds, deletes, rename
	Undo string
	// Added, Deleted and Flipped count the members touched.
	Added, Deleted, Flipped int
}

// placement says where one family's desired sets go in the kernel.
type placement struct {
	// Chain is the desired chain with the names its sets get.
	Chain Chain
	// Fresh sets are created; Rebuilt ones are built under a temporary
	// name and swapped in, atomic for the whole set; Updates are changed
	// in place.
	Fresh   []Set
	Rebuilt []rebuild
	Updates []setUpdate
}

// rebuild is an installed set given new content by a swap.
type rebuild struct{ Old, New Set }

// placeSets decides, for each desired set of c, which kernel set holds it:
//
//  1. the installed set an installed rule alike but for the set's name
//     uses: the same rule keeps its set, whose name then no longer says its
//     content (see the top of this file);
//  2. else the installed set of the same name, which is the digest of its
//     content when it was created, unless a desired set claimed it by rule;
//  3. else a new set, under the digest name, or that name with a suffix
//     when another desired set claimed it.
//
// A set whose content differs from the kernel's is changed in place when
// few members change, else rebuilt. claimed collects the kernel names the
// desired sets take, across calls.
func placeSets(st *Snapshot, in Installed, c Chain, claimed map[string]bool) placement {
	installedBy := map[Rule]string{} // a rule without its set name -> the set
	for _, r := range in.Rules {
		if _, ok := st.Sets[r.Set]; !ok || r.Set == "" {
			continue
		}
		k := r
		k.Set = ""
		installedBy[k] = r.Set
	}
	desired := map[string]bool{}
	for _, s := range c.Sets {
		desired[s.Name] = true
	}
	names := map[string]string{} // desired (digest) name -> kernel name
	for _, r := range c.Rules {
		if _, done := names[r.Set]; done || !desired[r.Set] {
			continue
		}
		k := r
		k.Set = ""
		if x, ok := installedBy[k]; ok && !claimed[x] && st.Sets[x].Family == c.Family {
			names[r.Set], claimed[x] = x, true
		}
	}
	for _, s := range c.Sets {
		if _, done := names[s.Name]; done {
			continue
		}
		n := s.Name
		for i := 1; claimed[n]; i++ {
			n = fmt.Sprintf("%s-%d", s.Name, i)
		}
		names[s.Name], claimed[n] = n, true
	}

	pl := placement{Chain: c}
	pl.Chain.Sets = slices.Clone(c.Sets)
	for i, s := range pl.Chain.Sets {
		s.Name = names[s.Name]
		pl.Chain.Sets[i] = s
		old, ok := st.Sets[s.Name]
		switch {
		case !ok:
			pl.Fresh = append(pl.Fresh, s)
		case sameMembers(old, s):
		default:
			u := memberChanges(old, s)
			size := len(s.Members) + len(s.NoMatch)
			if float64(u.Added+u.Deleted+u.Flipped) <= inPlaceMax*float64(size) && (old.MaxElem == 0 || size <= old.MaxElem) {
				u.From, u.To = s.Name, s
				pl.Updates = append(pl.Updates, u)
			} else {
				pl.Rebuilt = append(pl.Rebuilt, rebuild{Old: old, New: s})
			}
		}
	}
	pl.Chain.Rules = slices.Clone(c.Rules)
	for i, r := range pl.Chain.Rules {
		if n, ok := names[r.Set]; ok {
			pl.Chain.Rules[i].Set = n
		}
	}
	return pl
}

// freshen is for a family whose chain must be written anyway: the sets
// whose content changes are created afresh under new names instead of
// changed where they are, so that the chain's one transaction switches the
// rules and their sets together, and a run killed half-way leaves the old
// state whole. The installed sets they leave are cleaned up.
func (pl placement) freshen(st *Snapshot, claimed map[string]bool) placement {
	if len(pl.Updates)+len(pl.Rebuilt) == 0 {
		return pl
	}
	inUse := map[string]bool{}
	for _, in := range st.Installed {
		for _, n := range in.SetNames {
			inUse[n] = true
		}
	}
	renamed := map[string]string{}
	var fresh []Set
	var leftovers []rebuild
	take := func(s Set) {
		delete(claimed, s.Name)
		digest := setName(s)
		n := digest
		old, installed := st.Sets[n]
		// A name is free when no desired set claimed it and the kernel
		// has no such set, or has one no rule uses: a set left by a run
		// killed before its chain was written, which may be given the
		// content now.
		for i := 1; claimed[n] || installed && inUse[n]; i++ {
			n = fmt.Sprintf("%s-%d", digest, i)
			old, installed = st.Sets[n]
		}
		claimed[n], renamed[s.Name] = true, n
		s.Name = n
		switch {
		case !installed:
			fresh = append(fresh, s)
		case !sameMembers(old, s):
			leftovers = append(leftovers, rebuild{Old: old, New: s})
		}
	}
	for _, u := range pl.Updates {
		take(u.To)
	}
	for _, r := range pl.Rebuilt {
		take(r.New)
	}
	pl.Fresh = append(pl.Fresh, fresh...)
	pl.Updates, pl.Rebuilt = nil, leftovers
	pl.Chain.Sets = slices.Clone(pl.Chain.Sets)
	for i, s := range pl.Chain.Sets {
		if n, ok := renamed[s.Name]; ok {
			pl.Chain.Sets[i].Name = n
		}
	}
	pl.Chain.Rules = slices.Clone(pl.Chain.Rules)
	for i, r := range pl.Chain.Rules {
		if n, ok := renamed[r.Set]; ok {
			pl.Chain.Rules[i].Set = n
		}
	}
	return pl
}

// steps are the ipset steps of the placement, in the order they run: new
// sets, changes in place, rebuilds. All come before the chain is written.
func (pl placement) steps(sets IPSets) []snat.Step {
	var out []snat.Step
	if len(pl.Fresh) > 0 {
		var undo strings.Builder
		for _, s := range pl.Fresh {
			undo.WriteString("destroy " + s.Name + "\n")
		}
		out = append(out, snat.NewStep(fmt.Sprintf("create %s of destinations before any rule refers to them", snat.Plural(len(pl.Fresh), "new set")),
			ipsetRestore{sets, SetRestorePayload(pl.Fresh)}, ipsetRestore{sets, undo.String()}))
	}
	for _, u := range pl.Updates {
		out = append(out, snat.NewStep(u.why(), ipsetRestore{sets, u.Do}, ipsetRestore{sets, u.Undo}))
	}
	if len(pl.Rebuilt) > 0 {
		var do, undo strings.Builder
		for _, r := range pl.Rebuilt {
			do.WriteString(swapIn(r.New))
			undo.WriteString(swapIn(r.Old))
		}
		out = append(out, snat.NewStep(fmt.Sprintf("rebuild %s with new content and swap it in, atomic for the whole set (a set edited by hand, or a change too large to make in place)", snat.Plural(len(pl.Rebuilt), "set")),
			ipsetRestore{sets, do.String()}, ipsetRestore{sets, undo.String()}))
	}
	return out
}

// swapIn gives the set named s.Name the content of s: built under a
// temporary name, swapped (the rules using the set see the old content or
// the new), and the temporary one destroyed.
func swapIn(s Set) string {
	tmp := s
	tmp.Name = s.Name + tmpSuffix
	return SetRestorePayload([]Set{tmp}) + fmt.Sprintf("swap %s %s\ndestroy %s\n", tmp.Name, s.Name, tmp.Name)
}

// memberChanges renders the ipset restore lines that turn old's members
// into new's within old (named old.Name), adds before deletes, and the
// lines that turn them back. A member
// that only changes its nomatch flag is deleted and added again: while it
// is out of the set, packets fall through as its nomatch state has them
// do, which is its old or its new meaning.
func memberChanges(old, new Set) setUpdate {
	type flag struct {
		p       netip.Prefix
		nomatch bool
	}
	flags := func(s Set) []flag {
		out := make([]flag, 0, len(s.Members)+len(s.NoMatch))
		for _, p := range s.Members {
			out = append(out, flag{p, false})
		}
		for _, p := range s.NoMatch {
			out = append(out, flag{p, true})
		}
		slices.SortFunc(out, func(a, b flag) int { return comparePrefix(a.p, b.p) })
		return out
	}
	o, n := flags(old), flags(new)
	var adds, dels, flips []flag // flips hold the new flag
	i, j := 0, 0
	for i < len(o) || j < len(n) {
		switch {
		case j == len(n) || i < len(o) && comparePrefix(o[i].p, n[j].p) < 0:
			dels = append(dels, o[i])
			i++
		case i == len(o) || comparePrefix(o[i].p, n[j].p) > 0:
			adds = append(adds, n[j])
			j++
		default:
			if o[i].nomatch != n[j].nomatch {
				flips = append(flips, n[j])
			}
			i++
			j++
		}
	}
	var d, u strings.Builder
	suffix := func(nomatch bool) string {
		if nomatch {
			return " nomatch"
		}
		return ""
	}
	name := old.Name
	for _, a := range adds {
		writeMember(&d, "add", name, a.p, suffix(a.nomatch))
	}
	for _, f := range flips {
		writeMember(&d, "del", name, f.p, "")
		writeMember(&d, "add", name, f.p, suffix(f.nomatch))
	}
	for _, x := range dels {
		writeMember(&d, "del", name, x.p, "")
	}
	// The undo runs after the rename back: in old's name, mirrored.
	for _, x := range dels {
		writeMember(&u, "add", name, x.p, suffix(x.nomatch))
	}
	for _, f := range flips {
		writeMember(&u, "del", name, f.p, "")
		writeMember(&u, "add", name, f.p, suffix(!f.nomatch))
	}
	for _, a := range adds {
		writeMember(&u, "del", name, a.p, "")
	}
	return setUpdate{Do: d.String(), Undo: u.String(), Added: len(adds), Deleted: len(dels), Flipped: len(flips)}
}

func (u setUpdate) why() string {
	return fmt.Sprintf("change set %s in place: %d added, %d deleted, %d changed between match and nomatch (every destination old or new, never missing)",
		u.From, u.Added, u.Deleted, u.Flipped)
}
