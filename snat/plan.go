package snat

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/routes"
)

// Change is one rule's difference between installed and desired.
type Change struct {
	Op   string `json:"op"` // "add", "change", "remove"
	Old  *Entry `json:"old,omitempty"`
	New  *Entry `json:"new,omitempty"`
	Note string `json:"note,omitempty"`
}

func (c Change) String() string {
	switch c.Op {
	case "add":
		return "add    " + c.New.String()
	case "remove":
		return "remove " + c.Old.String()
	}
	if c.Old.ToString() == c.New.ToString() {
		// Same source: the way there changed (route, gateway, replies).
		return fmt.Sprintf("change %s: %s -> %s", c.New.Match, c.Old, c.New)
	}
	return fmt.Sprintf("change %s: %s -> %s", c.New.Match, c.Old.ToString(), c.New.ToString())
}

// Tool is a program a step runs.
type Tool string

const (
	ToolIPSet        Tool = "ipset restore"
	ToolIPTables     Tool = "iptables-restore --noflush"
	ToolIP6Tables    Tool = "ip6tables-restore --noflush"
	ToolDropNATTable Tool = "nft delete table"
	ToolIP4Batch     Tool = "ip -4 -batch"
	ToolIP6Batch     Tool = "ip -6 -batch"
)

// routeTool is the family's ip -batch.
func routeTool(f Family) Tool {
	if f == IPv6 {
		return ToolIP6Batch
	}
	return ToolIP4Batch
}

// restoreTool is the family's iptables-restore.
func restoreTool(f Family) Tool {
	if f == IPv6 {
		return ToolIP6Tables
	}
	return ToolIPTables
}

// Command is one run of a tool with its input.
type Command struct {
	Tool   Tool   `json:"tool"`
	Family Family `json:"family,omitempty"`
	Input  string `json:"input,omitempty"`
}

func (c Command) String() string {
	if c.Tool == ToolDropNATTable {
		return fmt.Sprintf("%s %s %s (only if it is still empty)", c.Tool, nftFamily(c.Family), c.table())
	}
	return fmt.Sprintf("%s <<EOF\n%sEOF", c.Tool, c.Input)
}

// table is the table a drop command names: Input, nat when empty.
func (c Command) table() string {
	if c.Input == "" {
		return table
	}
	return c.Input
}

// Step is one step of a plan: what runs, why, and what puts it back.
type Step struct {
	Why string  `json:"why"`
	Do  Command `json:"do"`
	// Undo reverses Do; nil when there is nothing to reverse.
	Undo *Command `json:"undo,omitempty"`
	// Cleanup steps run after the change is committed: a failure leaves
	// the new rules in place, is reported, and the next run retries it.
	Cleanup bool `json:"cleanup,omitempty"`
}

// Plan is the exact program Apply runs: its steps, in order. It is computed
// without side effects, so --dry-run prints exactly what a real run does.
type Plan struct {
	Changes []Change `json:"changes"`
	// Desired are the normalized entries the kernel holds after the plan.
	Desired []Entry `json:"desired"`
	// Chains are the desired chains, for summaries.
	Chains map[Family]Chain `json:"-"`
	// Paths are the desired routing paths and Routing the rules and routes
	// they render to, per family, lingering ones included (linger.go).
	Paths   map[Family][]routes.Path `json:"-"`
	Routing map[Family]routes.State  `json:"-"`
	Keep    []netip.Addr             `json:"-"`
	Steps   []Step                   `json:"steps"`
}

// Empty reports whether the plan writes nothing.
func (p Plan) Empty() bool { return len(p.Steps) == 0 }

// MakePlan compares the installed state with the desired entries (of both
// families; they are normalized here) and returns the program that makes
// the kernel hold them, make before break:
//
//  1. sets left half-built by an interrupted run are destroyed;
//  2. new sets are created and filled, while nothing refers to them yet; a
//     desired set someone edited by hand is rebuilt under a temporary name
//     and swapped in, which is atomic;
//  3. each family's chain and jump are written in one iptables-restore
//     transaction: readers and new connections see the old chain or the
//     new one, never a mixture;
//  4. cleanup: sets nothing refers to any more are destroyed, and with
//     iptables-nft a nat table left holding nothing is deleted, so clear
//     leaves iptables-save as it was before the first run.
func MakePlan(st *State, desired []Entry) Plan {
	desired = Normalize(desired)
	p := Plan{Desired: desired, Chains: map[Family]Chain{}, Paths: map[Family][]routes.Path{}, Routing: map[Family]routes.State{}}
	p.Changes = diff(st.Entries(), desired)
	for _, f := range Families {
		p.Paths[f] = pathsFor(st, f, desired)
		p.Routing[f] = routes.Desired(p.Paths[f])
	}

	var stale strings.Builder
	for _, name := range slices.Sorted(maps.Keys(st.Sets)) {
		if strings.HasSuffix(name, tmpSuffix) {
			stale.WriteString("destroy " + name + "\n")
		}
	}
	if stale.Len() > 0 {
		p.Steps = append(p.Steps, Step{Why: "destroy sets left half-built by an interrupted run (no rule refers to them)",
			Do: Command{Tool: ToolIPSet, Input: stale.String()}})
	}

	// Where each desired set goes: the installed set its rule uses (kept,
	// changed in place or rebuilt), or a new one. Names are claimed across
	// both families, so that no two desired sets share one.
	claimed := map[string]bool{}
	var place placement
	for _, f := range Families {
		pl := placeSets(st, st.Installed[f], Render(f, desired), claimed)
		// In place (or by a swap) only when one set is all that changes
		// in the family: several sets changed one after the other, or a
		// set and then the chain, would let a killed run leave the
		// family neither old nor new, and a destination moving between
		// two sets missing from both for a moment.
		if len(pl.Updates)+len(pl.Rebuilt) > 1 || !st.Installed[f].InSync(pl.Chain) {
			pl = pl.freshen(st, claimed)
		}
		p.Chains[f] = pl.Chain
		place.Fresh = append(place.Fresh, pl.Fresh...)
		place.Rebuilt = append(place.Rebuilt, pl.Rebuilt...)
		place.Updates = append(place.Updates, pl.Updates...)
	}
	referenced := claimed
	for _, f := range Families {
		c := p.Chains[f]
		c.Keep = keepFor(st, f, c)
		p.Chains[f] = c
	}
	var routeAdds, mangleFirst, writes, mangleLast, routeDels, drops []Step
	for _, f := range Families {
		if b := routes.Diff(st.Routing[f], p.Routing[f]); b.Add != "" || b.Del != "" {
			tool := routeTool(f)
			if b.Add != "" {
				routeAdds = append(routeAdds, Step{Why: fmt.Sprintf("add or replace the %s routes and rules of ours (before the chain changes: make before break)", f),
					Do: Command{Tool: tool, Family: f, Input: b.Add}, Undo: &Command{Tool: tool, Family: f, Input: b.UndoAdd}})
			}
			if b.Del != "" {
				routeDels = append(routeDels, Step{Why: fmt.Sprintf("remove the %s routes and rules of ours no longer wanted", f),
					Do: Command{Tool: tool, Family: f, Input: b.Del}, Undo: &Command{Tool: tool, Family: f, Input: b.UndoDel}})
			}
		}
		if s, first, ok := mangleStep(st, f, desired, routes.ReplyTables(p.Paths[f])); ok {
			if first {
				mangleFirst = append(mangleFirst, s)
			} else {
				mangleLast = append(mangleLast, s)
			}
			if mg := st.Mangle[f]; len(s.Do.Input) > 0 && !anyMarked(f, desired) && st.CanDropNATTable && mg.TableExists && mg.OnlyOurs {
				drops = append(drops, Step{Why: fmt.Sprintf("delete the %s mangle table egress-snat alone used, now empty", f),
					Do: Command{Tool: ToolDropNATTable, Family: f, Input: mangleTable}, Cleanup: true})
			}
		}
		c := p.Chains[f]
		in := st.Installed[f]
		if in.InSync(c) {
			continue
		}
		writes = append(writes, chainStep(in, c))
		if len(c.Rules) == 0 && len(c.Keep) == 0 && st.CanDropNATTable && in.TableExists && in.OnlyOurs {
			drops = append(drops, Step{Why: fmt.Sprintf("delete the %s nat table egress-snat alone used, now empty", f),
				Do: Command{Tool: ToolDropNATTable, Family: f}, Cleanup: true})
		}
	}
	p.Steps = append(p.Steps, place.steps()...)
	p.Steps = append(p.Steps, routeAdds...)
	p.Steps = append(p.Steps, mangleFirst...)
	p.Steps = append(p.Steps, writes...)
	p.Steps = append(p.Steps, mangleLast...)
	p.Steps = append(p.Steps, routeDels...)
	var unused strings.Builder
	for _, name := range slices.Sorted(maps.Keys(st.Sets)) {
		if !referenced[name] && !strings.HasSuffix(name, tmpSuffix) {
			unused.WriteString("destroy " + name + "\n")
		}
	}
	if unused.Len() > 0 {
		p.Steps = append(p.Steps, Step{Why: "destroy sets no rule refers to any more",
			Do: Command{Tool: ToolIPSet, Input: unused.String()}, Cleanup: true})
	}
	p.Steps = append(p.Steps, drops...)
	return p
}

// chainStep writes one family's chain and re-seats the jump, and makes
// the keep chain hold for c.Keep, in one transaction; its undo puts back
// the chain as it was read (every rule, ours or not) with one jump first,
// or removes chain and jump when there was no chain, and the keep chain
// as it was.
func chainStep(in Installed, c Chain) Step {
	f := c.Family
	s := Step{Do: Command{Tool: restoreTool(f), Family: f}}
	ourJump := [][]string{JumpSpec()}
	switch {
	case len(c.Rules) == 0 && (in.ChainExists || len(in.Jumps) > 0):
		s.Why = fmt.Sprintf("remove the %s chain and its jump", f)
		s.Do.Input = ClearPayload(in.Jumps)
	case len(c.Rules) == 0:
		s.Do.Input = "*" + table + "\nCOMMIT\n"
	default:
		s.Why = fmt.Sprintf("write the %s chain (%s) and put its jump first, in one transaction", f, plural(len(c.Rules), "rule"))
		s.Do.Input = RestorePayload(c.Args(), in.Jumps)
	}
	keepChanges := !slices.Equal(in.Keep, c.Keep) || in.KeepExists != (len(c.Keep) > 0)
	if keepChanges {
		s.Do.Input = withLines(s.Do.Input, keepLines(c.Keep, in.KeepExists))
		switch {
		case len(c.Keep) == 0:
			s.Why = strings.TrimPrefix(s.Why+"; ", "; ") + fmt.Sprintf("remove the %s keep chain: the connections it held conntrack for have ended", f)
		default:
			s.Why = strings.TrimPrefix(s.Why+"; ", "; ") + fmt.Sprintf("keep conntrack for the live connections translated to %s in the %s keep chain, until they end", addrList(c.Keep), f)
		}
	}
	undo := Command{Tool: restoreTool(f), Family: f}
	switch {
	case in.ChainExists && len(c.Rules) > 0:
		undo.Input = RestorePayload(in.Raw, ourJump)
	case in.ChainExists:
		undo.Input = RestorePayload(in.Raw, nil)
	case len(c.Rules) > 0:
		undo.Input = ClearPayload(ourJump)
	case keepChanges:
		undo.Input = "*" + table + "\nCOMMIT\n"
	default:
		return s
	}
	if keepChanges {
		undo.Input = withLines(undo.Input, keepLines(in.Keep, len(c.Keep) > 0))
	}
	s.Undo = &undo
	return s
}

// diff lists the changes from installed to desired, keyed by whole match.
func diff(installed, desired []Entry) []Change {
	if sortedEntries(installed) && sortedEntries(desired) {
		return diffSorted(installed, desired)
	}
	return diffByMap(installed, desired)
}

// diffByMap is diff for lists in any order.
func diffByMap(installed, desired []Entry) []Change {
	var out []Change
	old := make(map[Match]Entry, len(installed))
	for _, e := range installed {
		old[e.Match] = e
	}
	for _, e := range desired {
		o, had := old[e.Match]
		delete(old, e.Match)
		switch {
		case !had:
			out = append(out, Change{Op: "add", New: ptr(e)})
		case !o.Equal(e):
			out = append(out, Change{Op: "change", Old: ptr(o), New: ptr(e)})
		}
	}
	for _, e := range slices.SortedFunc(maps.Values(old), compareEntries) {
		out = append(out, Change{Op: "remove", Old: ptr(e)})
	}
	return out
}

// diffSorted is diff for two lists in chain order, as Normalize and
// State.Entries give them: one walk instead of a map of every entry. The
// order is the same as diff's: adds and changes in desired's order, then
// removes.
func diffSorted(installed, desired []Entry) []Change {
	// The changes point into the two lists, which the plan and the state
	// keep anyway: a copy of every entry of a fresh million-destination
	// apply was a fifth of its memory.
	var out, removed []Change
	i := 0
	for d := range desired {
		e := &desired[d]
		for i < len(installed) && compareMatch(&installed[i], e) < 0 {
			removed = append(removed, Change{Op: "remove", Old: &installed[i]})
			i++
		}
		if i < len(installed) && installed[i].Match == e.Match {
			if !installed[i].Equal(*e) {
				out = append(out, Change{Op: "change", Old: &installed[i], New: e})
			}
			i++
			continue
		}
		out = append(out, Change{Op: "add", New: e})
	}
	for ; i < len(installed); i++ {
		removed = append(removed, Change{Op: "remove", Old: &installed[i]})
	}
	return append(out, removed...)
}

// compareMatch is compareEntries on the match alone: entries of one match
// differ at most in their natural source, which compareEntries orders last.
func compareMatch(a, b *Entry) int {
	if c := compareEntryRefs(a, b); c == 0 || a.Match != b.Match {
		return c
	}
	return 0 // the same match: they differ in the natural source only
}

func ptr(e Entry) *Entry { return &e }

func sameMembers(a, b Set) bool {
	return slices.Equal(a.Members, b.Members) && slices.Equal(a.NoMatch, b.NoMatch)
}

// tmpSuffix marks a set being rebuilt before it is swapped in.
const tmpSuffix = "~"

// Apply runs a plan made by MakePlan, step by step. If a step before the
// commit fails, the steps already run are undone in reverse order, so a
// failed Apply leaves the host as it found it. A failed cleanup step leaves
// the new rules in place and is reported.
func (m *Manager) Apply(p Plan) error {
	var done []Step
	for _, s := range p.Steps {
		err := m.run(s.Do)
		if err == nil {
			done = append(done, s)
			continue
		}
		if s.Cleanup {
			return fmt.Errorf("the new rules are in place, but cleaning up failed: %s: %w", s.Why, err)
		}
		var undoErrs []error
		for i := len(done) - 1; i >= 0; i-- {
			if u := done[i].Undo; u != nil {
				if uerr := m.run(*u); uerr != nil {
					undoErrs = append(undoErrs, fmt.Errorf("undoing %q: %w", done[i].Why, uerr))
				}
			}
		}
		if len(undoErrs) > 0 {
			return fmt.Errorf("%s: %w (and putting back what was already written failed: %v)", s.Why, err, errors.Join(undoErrs...))
		}
		return fmt.Errorf("%s: %w (nothing was changed)", s.Why, err)
	}
	return nil
}

func (m *Manager) run(c Command) error {
	switch c.Tool {
	case ToolIPSet:
		return m.Sets.Restore(c.Input)
	case ToolIPTables, ToolIP6Tables:
		return m.Tables.Restore(c.Family, c.Input)
	case ToolDropNATTable:
		return m.Tables.DropTable(c.Family, c.table())
	case ToolIP4Batch, ToolIP6Batch:
		if m.Routing == nil {
			return fmt.Errorf("no routing backend to run %s", c.Tool)
		}
		return m.Routing.Batch(c.Family == IPv4, c.Input)
	}
	return fmt.Errorf("unknown tool %q", c.Tool)
}

// Has reports whether the plan has a rule for m after it is applied.
func (p Plan) Has(m Match) bool {
	for _, e := range p.Desired {
		if e.Match == m || (m.Out == "" && e.Sender == m.Sender && e.Dst == m.Dst) {
			return true
		}
	}
	return false
}

// Payloads returns each tool's input in the plan, for scripts that read
// --dry-run --json: "ipset", "iptables-restore", "ip6tables-restore".
func (p Plan) Payloads() map[string]string {
	out := map[string]string{}
	for _, s := range p.Steps {
		name := strings.Fields(string(s.Do.Tool))[0]
		if s.Do.Tool == ToolIP4Batch || s.Do.Tool == ToolIP6Batch {
			name = string(s.Do.Tool)
		}
		if s.Do.Tool == ToolDropNATTable {
			continue
		}
		out[name] += s.Do.Input
	}
	return out
}

func nftFamily(f Family) string {
	if f == IPv6 {
		return "ip6"
	}
	return "ip"
}

// mangleStep writes f's mangle chains when they differ from what desired
// needs. first says it must run before the nat chain is written: it takes
// marks away, and a mark must never send traffic out of an interface whose
// SNAT rule is already gone. Otherwise it runs after, when the SNAT rules
// for the new marks are in place.
func mangleStep(st *State, f Family, desired []Entry, tables map[netip.Addr]int) (Step, bool, bool) {
	want := renderMangle(f, desired, tables)
	have := st.Mangle[f]
	if have.inSync(want) {
		return Step{}, false, false
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
	return Step{Why: fmt.Sprintf("write the %s mangle chains that mark senders' traffic for another interface", f),
		Do:   Command{Tool: restoreTool(f), Family: f, Input: manglePayload(want, have)},
		Undo: &Command{Tool: restoreTool(f), Family: f, Input: mangleUndo(want, have)}}, first, true
}

func anyMarked(f Family, entries []Entry) bool {
	return slices.ContainsFunc(entries, func(e Entry) bool { return e.Marked && e.Family() == f })
}
