package iptables

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// Plan is the iptables backend's part of a plan (snat.NATPlan): the ipset
// steps, each family's chain write and mangle chains, and the cleanup.
type Plan struct {
	// Chains are the desired chains, with the names of the kernel sets
	// they use and what their keep chains hold for.
	Chains map[snat.Family]Chain
	// Desired and Tables are what the plan was made for, for the canary.
	Desired []snat.Entry
	Tables  map[snat.Family]map[netip.Addr]int

	prepare, main, cleanup []snat.Step
	strands                bool
}

var _ snat.NATPlan = (*Plan)(nil)

// Remembered is the plan as Read's known uses it: its chains and the
// members of their sets (knownSets).
func (p *Plan) Remembered() snat.NATPlan {
	if p == nil {
		return nil
	}
	return &Plan{Chains: p.Chains}
}

// Phases returns the plan's steps around the routes of ours (see
// snat.MakePlan).
func (p *Plan) Phases() (prepare, main, cleanup []snat.Step) {
	return p.prepare, p.main, p.cleanup
}

// Holds is "3 rules, 1 set of 10000 destinations".
func (p *Plan) Holds() string {
	rules, sets, members := 0, 0, 0
	for _, c := range p.Chains {
		rules += len(c.Rules)
		sets += len(c.Sets)
		for _, s := range c.Sets {
			members += len(s.Members)
		}
	}
	now := snat.Plural(rules, "rule")
	if sets > 0 {
		now += fmt.Sprintf(", %s of %s", snat.Plural(sets, "set"), snat.Plural(members, "destination"))
	}
	return now
}

// Lingering names the keep chains the plan leaves (keep.go).
func (p *Plan) Lingering() []string {
	var out []string
	for _, f := range snat.Families {
		if keep := p.Chains[f].Keep; len(keep) > 0 {
			out = append(out, fmt.Sprintf("conntrack (the %s keep chain %s), for live connections translated to %s", f, KeepChain, addrList(keep)))
		}
	}
	return out
}

// Strands reports whether the plan, made without Liveness, removes a
// family's last SNAT rule or touches a keep chain (see snat.Manager.Plan).
func (p *Plan) Strands() bool { return p.strands }

// Plan returns the program that makes the kernel hold want, make before
// break:
//
//  1. sets left half-built by an interrupted run are destroyed;
//  2. new sets are created and filled, while nothing refers to them yet; a
//     desired set someone edited by hand is rebuilt under a temporary name
//     and swapped in, which is atomic (all this before the routes of ours:
//     the prepare phase);
//  3. the hold chain when it holds more (hold.go), the mangle chains that
//     take marks away, each family's chain, jump and keep chain in one
//     iptables-restore transaction (readers and new connections see the
//     old chain or the new one, never a mixture), then the mangle chains
//     that add marks, and the hold chain when it holds less (the main
//     phase);
//  4. cleanup: sets nothing refers to any more are destroyed, and with
//     iptables-nft a nat or mangle table left holding nothing is deleted,
//     so clear leaves iptables-save as it was before the first run.
func (b *Backend) Plan(have snat.Installation, want snat.Want) snat.NATPlan {
	st := have.(*Snapshot)
	desired := want.Entries
	p := &Plan{Chains: map[snat.Family]Chain{}, Desired: desired, Tables: want.Tables}

	var stale strings.Builder
	for _, name := range slices.Sorted(maps.Keys(st.Sets)) {
		if strings.HasSuffix(name, tmpSuffix) {
			stale.WriteString("destroy " + name + "\n")
		}
	}
	if stale.Len() > 0 {
		p.prepare = append(p.prepare, snat.NewStep("destroy sets left half-built by an interrupted run (no rule refers to them)",
			ipsetRestore{b.Sets, stale.String()}, nil))
	}

	// Where each desired set goes: the installed set its rule uses (kept,
	// changed in place or rebuilt), or a new one. Names are claimed across
	// both families, so that no two desired sets share one.
	claimed := map[string]bool{}
	var place placement
	for _, f := range snat.Families {
		pl := placeSets(st, st.Installed[f], Render(f, desired), claimed)
		// In place (or by a swap) only when one set is all that changes
		// in the family: several sets changed one after the other, or a
		// set and then the chain, would let a killed run leave the
		// family neither old nor new, and a destination moving between
		// two sets missing from both for a moment.
		if len(pl.Updates)+len(pl.Rebuilt) > 1 || !st.Installed[f].InSync(pl.Chain) {
			pl = pl.freshen(st, claimed)
		}
		pl.Chain.Keep = keepFor(st, f, pl.Chain, want.Live)
		pl.Chain.Hold = holdRules(pl.Chain)
		p.Chains[f] = pl.Chain
		place.Fresh = append(place.Fresh, pl.Fresh...)
		place.Rebuilt = append(place.Rebuilt, pl.Rebuilt...)
		place.Updates = append(place.Updates, pl.Updates...)
	}
	referenced := claimed
	var holdFirst, mangleFirst, writes, mangleLast, holdLast, drops []snat.Step
	for _, f := range snat.Families {
		in := st.Installed[f]
		c := p.Chains[f]
		if len(in.Keep) > 0 || len(c.Rules) == 0 && len(in.Rules) > 0 {
			p.strands = true
		}
		if s, first, ok := b.mangleStep(st, f, desired, want.Tables[f]); ok {
			if first {
				mangleFirst = append(mangleFirst, s)
			} else {
				mangleLast = append(mangleLast, s)
			}
			if mg := st.Mangle[f]; len(s.Do.Input) > 0 && !anyMarked(f, desired) && st.CanDropTable && mg.TableExists && mg.OnlyOurs {
				drops = append(drops, snat.NewCleanup(fmt.Sprintf("delete the %s mangle table egress-snat alone used, now empty", f),
					dropTable{b.Tables, f, mangleTable}))
			}
		}
		if s, first, ok := b.holdStep(f, st.Hold[f], c.Hold); ok {
			if first {
				holdFirst = append(holdFirst, s)
			} else {
				holdLast = append(holdLast, s)
			}
			if h := st.Hold[f]; len(c.Hold) == 0 && st.CanDropTable && h.TableExists && h.OnlyOurs {
				drops = append(drops, snat.NewCleanup(fmt.Sprintf("delete the %s filter table egress-snat alone used, now empty", f),
					dropTable{b.Tables, f, filterTable}))
			}
		}
		if in.InSync(c) {
			continue
		}
		writes = append(writes, b.chainStep(in, c))
		if len(c.Rules) == 0 && len(c.Keep) == 0 && st.CanDropTable && in.TableExists && in.OnlyOurs {
			drops = append(drops, snat.NewCleanup(fmt.Sprintf("delete the %s nat table egress-snat alone used, now empty", f),
				dropTable{b.Tables, f, table}))
		}
	}
	p.prepare = append(p.prepare, place.steps(b.Sets)...)
	p.main = slices.Concat(holdFirst, mangleFirst, writes, mangleLast, holdLast)
	var unused strings.Builder
	for _, name := range slices.Sorted(maps.Keys(st.Sets)) {
		if !referenced[name] && !strings.HasSuffix(name, tmpSuffix) {
			unused.WriteString("destroy " + name + "\n")
		}
	}
	if unused.Len() > 0 {
		p.cleanup = append(p.cleanup, snat.NewCleanup("destroy sets no rule refers to any more", ipsetRestore{b.Sets, unused.String()}))
	}
	p.cleanup = append(p.cleanup, drops...)
	return p
}

// chainStep writes one family's chain and re-seats the jump, and makes
// the keep chain hold for c.Keep, in one transaction; its undo puts back
// the chain as it was read (every rule, ours or not) with one jump first,
// or removes chain and jump when there was no chain, and the keep chain
// as it was.
func (b *Backend) chainStep(in Installed, c Chain) snat.Step {
	f := c.Family
	why, do := "", ""
	ourJump := [][]string{JumpSpec()}
	switch {
	case len(c.Rules) == 0 && (in.ChainExists || len(in.Jumps) > 0):
		why = fmt.Sprintf("remove the %s chain and its jump", f)
		do = ClearPayload(in.Jumps)
	case len(c.Rules) == 0:
		do = "*" + table + "\nCOMMIT\n"
	default:
		why = fmt.Sprintf("write the %s chain (%s) and put its jump first, in one transaction", f, snat.Plural(len(c.Rules), "rule"))
		do = RestorePayload(c.Args(), in.Jumps)
	}
	keepChanges := !slices.Equal(in.Keep, c.Keep) || in.KeepExists != (len(c.Keep) > 0)
	if keepChanges {
		do = withLines(do, keepLines(c.Keep, in.KeepExists))
		switch {
		case len(c.Keep) == 0:
			why = strings.TrimPrefix(why+"; ", "; ") + fmt.Sprintf("remove the %s keep chain: the connections it held conntrack for have ended", f)
		default:
			why = strings.TrimPrefix(why+"; ", "; ") + fmt.Sprintf("keep conntrack for the live connections translated to %s in the %s keep chain, until they end", addrList(c.Keep), f)
		}
	}
	undo := ""
	switch {
	case in.ChainExists && len(c.Rules) > 0:
		undo = RestorePayload(in.Raw, ourJump)
	case in.ChainExists:
		undo = RestorePayload(in.Raw, nil)
	case len(c.Rules) > 0:
		undo = ClearPayload(ourJump)
	case keepChanges:
		undo = "*" + table + "\nCOMMIT\n"
	default:
		return snat.NewStep(why, restore{b.Tables, f, do}, nil)
	}
	if keepChanges {
		undo = withLines(undo, keepLines(in.Keep, len(c.Keep) > 0))
	}
	return snat.NewStep(why, restore{b.Tables, f, do}, restore{b.Tables, f, undo})
}

// mangleStep writes f's mangle chains when they differ from what desired
// needs. first says it must run before the nat chain is written: it takes
// marks away, and a mark must never send traffic out of an interface whose
// SNAT rule is already gone. Otherwise it runs after, when the SNAT rules
// for the new marks are in place.
func (b *Backend) mangleStep(st *Snapshot, f snat.Family, desired []snat.Entry, tables map[netip.Addr]int) (snat.Step, bool, bool) {
	want := renderMangle(f, desired, tables)
	have := st.Mangle[f]
	if have.inSync(want) {
		return snat.Step{}, false, false
	}
	first := false
	wantMarks := map[Rule]uint32{}
	for _, c := range []string{MarkChainFwd, MarkChainOut} {
		for _, r := range want[c] {
			if r.Target == "MARK" {
				k := r
				k.Target, k.SetMark, k.Unmarked = "", 0, false
				wantMarks[k] = r.SetMark
			}
		}
	}
	for k, v := range have.marks() {
		if wantMarks[k] != v {
			first = true
		}
	}
	return snat.NewStep(fmt.Sprintf("write the %s mangle chains that mark senders' traffic for another interface", f),
		restore{b.Tables, f, manglePayload(want, have)}, restore{b.Tables, f, mangleUndo(want, have)}), first, true
}

func anyMarked(f snat.Family, entries []snat.Entry) bool {
	return slices.ContainsFunc(entries, func(e snat.Entry) bool { return e.Marked && e.Family() == f })
}

func sameMembers(a, b Set) bool {
	return slices.Equal(a.Members, b.Members) && slices.Equal(a.NoMatch, b.NoMatch)
}

// tmpSuffix marks a set being rebuilt before it is swapped in.
const tmpSuffix = "~"

// addrList renders addresses for people: "192.0.2.22,192.0.2.23".
func addrList(as []netip.Addr) string {
	return snat.Entry{To: as}.ToString()
}
