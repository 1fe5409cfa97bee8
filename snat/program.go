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

// Tool names the program a step runs.
type Tool string

const (
	ToolIP4Batch Tool = "ip -4 -batch"
	ToolIP6Batch Tool = "ip -6 -batch"
)

// routeTool is the family's ip -batch.
func routeTool(f Family) Tool {
	if f == IPv6 {
		return ToolIP6Batch
	}
	return ToolIP4Batch
}

// Command is what a step runs, as --dry-run prints it and --json shows
// it: the program and its input.
type Command struct {
	Tool   Tool   `json:"tool"`
	Family Family `json:"family,omitempty"`
	Input  string `json:"input,omitempty"`
	// Note, when set, is how String shows a command whose Input is an
	// argument, not a payload ("nft delete table ip nat (only if it is
	// still empty)"); Payloads leaves such a command out.
	Note string `json:"-"`
}

func (c Command) String() string {
	if c.Note != "" {
		return c.Note
	}
	return fmt.Sprintf("%s <<EOF\n%sEOF", c.Tool, c.Input)
}

// Action is one run of a program a plan holds: an iptables-restore with
// its payload, an ipset restore, an ip -batch, a netlink transaction. The
// backend that plans it binds it to what runs it.
type Action interface {
	// Show is the action as --dry-run prints it: the exact program.
	Show() Command
	// Run does it.
	Run() error
}

// Step is one step of a plan: what runs, why, and what puts it back. Do
// and Undo are what the actions show; NewStep makes a step of actions.
type Step struct {
	Why string  `json:"why"`
	Do  Command `json:"do"`
	// Undo reverses Do; nil when there is nothing to reverse.
	Undo *Command `json:"undo,omitempty"`
	// Cleanup steps run after the change is committed: a failure leaves
	// the new rules in place, is reported, and the next run retries it.
	Cleanup bool `json:"cleanup,omitempty"`

	do, undo Action
}

// NewStep is a step that runs do and, to reverse it, undo (nil: nothing
// to reverse).
func NewStep(why string, do, undo Action) Step {
	s := Step{Why: why, Do: do.Show(), do: do, undo: undo}
	if undo != nil {
		u := undo.Show()
		s.Undo = &u
	}
	return s
}

// NewCleanup is a cleanup step (see Step.Cleanup).
func NewCleanup(why string, do Action) Step {
	s := NewStep(why, do, nil)
	s.Cleanup = true
	return s
}

// NATPlan is a backend's part of a plan: its steps in three phases, run
// around the routes of ours (make before break): prepare before the routes
// are added (sets nothing refers to yet), main after them (the chains and
// marks, in their order), and cleanup after the routes no longer wanted
// are removed.
type NATPlan interface {
	Phases() (prepare, main, cleanup []Step)
	// Holds says what the kernel holds after the plan, for summaries:
	// "3 rules, 1 set of 10000 destinations".
	Holds() string
	// Lingering names what the plan keeps only for live connections.
	Lingering() []string
	// Strands reports whether, made without Liveness, it takes away
	// something live connections may use (see Manager.Plan).
	Strands() bool
}

// A Rememberer is a NATPlan that can give up what running it needed: a
// long-lived process keeps the last plan it wrote for the next Read
// (Backend.Read's known), and at 100,000 destinations the steps and the
// desired entries a plan also holds were 35 MB a plan.
type Rememberer interface {
	// Remembered returns what Read needs of the plan once it ran.
	Remembered() NATPlan
}

// Remembered is p's Remembered, or p itself when it has none.
func Remembered(p NATPlan) NATPlan {
	if r, ok := p.(Rememberer); ok && p != nil {
		return r.Remembered()
	}
	return p
}

// Plan is the exact program Apply runs: its steps, in order. It is computed
// without side effects, so --dry-run prints exactly what a real run does.
type Plan struct {
	Changes []Change `json:"changes"`
	// Desired are the normalized entries the kernel holds after the plan.
	Desired []Entry `json:"desired"`
	// NAT is the backend's part.
	NAT NATPlan `json:"-"`
	// Paths are the desired routing paths and Routing the rules and routes
	// they render to, per family, lingering ones included (linger.go).
	Paths   map[Family][]routes.Path `json:"-"`
	Routing map[Family]routes.State  `json:"-"`
	Steps   []Step                   `json:"steps"`
}

// Empty reports whether the plan writes nothing.
func (p Plan) Empty() bool { return len(p.Steps) == 0 }

// MakePlan compares the installed state with the desired entries (of both
// families; they are normalized here) and returns the program that makes
// the kernel hold them, make before break: the backend's prepare steps,
// the routes and ip rules of ours added or replaced, the backend's main
// steps (its chains, in one transaction per family), the routes and rules
// no longer wanted removed, and the backend's cleanup. It has no side
// effects; a period's entry without an address gets the one installed, or
// a new one (settlePeriods).
func (m *Manager) MakePlan(st *State, desired []Entry) Plan {
	desired = settlePeriods(st.Entries(), Normalize(desired), m.rng())
	p := Plan{Desired: desired, Paths: map[Family][]routes.Path{}, Routing: map[Family]routes.State{}}
	p.Changes = diff(st.Entries(), desired)
	want := Want{Entries: desired, Tables: map[Family]map[netip.Addr]int{}, Live: st.Live}
	for _, f := range Families {
		p.Paths[f] = pathsFor(st, f, desired)
		p.Routing[f] = routes.Desired(p.Paths[f])
		want.Tables[f] = routes.ReplyTables(p.Paths[f])
	}
	p.NAT = m.Backend.Plan(st.NAT, want)
	prepare, main, cleanup := p.NAT.Phases()
	var routeAdds, routeDels []Step
	for _, f := range Families {
		b := routes.Diff(st.Routing[f], p.Routing[f])
		if b.Add != "" {
			routeAdds = append(routeAdds, NewStep(fmt.Sprintf("add or replace the %s routes and rules of ours (before the chain changes: make before break)", f),
				m.batch(f, b.Add), m.batch(f, b.UndoAdd)))
		}
		if b.Del != "" {
			routeDels = append(routeDels, NewStep(fmt.Sprintf("remove the %s routes and rules of ours no longer wanted", f),
				m.batch(f, b.Del), m.batch(f, b.UndoDel)))
		}
	}
	p.Steps = slices.Concat(prepare, routeAdds, main, routeDels, cleanup)
	return p
}

// batch is an ip -batch of family f, run through the Manager's Routing.
func (m *Manager) batch(f Family, input string) Action {
	return routingBatch{r: m.Routing, f: f, input: input}
}

type routingBatch struct {
	r     Routing
	f     Family
	input string
}

func (b routingBatch) Show() Command {
	return Command{Tool: routeTool(b.f), Family: b.f, Input: b.input}
}

func (b routingBatch) Run() error {
	if b.r == nil {
		return fmt.Errorf("no routing backend to run %s", routeTool(b.f))
	}
	return b.r.Batch(b.f == IPv4, b.input)
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
	for _, e := range slices.SortedFunc(maps.Values(old), CompareEntries) {
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
	// Sized for the adds a list longer than the installed one has at
	// least: a fresh apply of a million grew it by append, copying (and
	// write-barriering) its pointers for a tenth of the run.
	out := make([]Change, 0, max(len(desired)-len(installed), 0))
	var removed []Change
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

// compareMatch is CompareEntries on the match alone: entries of one match
// differ at most in their natural source, which CompareEntries orders last.
func compareMatch(a, b *Entry) int {
	if c := compareEntryRefs(a, b); c == 0 || a.Match != b.Match {
		return c
	}
	return 0 // the same match: they differ in the natural source only
}

func ptr(e Entry) *Entry { return &e }

// Apply runs a plan made by MakePlan, step by step. If a step before the
// commit fails, the steps already run are undone in reverse order, so a
// failed Apply leaves the host as it found it. A failed cleanup step leaves
// the new rules in place and is reported. Memory, when set, is told.
func (m *Manager) Apply(p Plan) error {
	err := m.apply(p)
	if m.Memory != nil {
		m.Memory.Wrote(p, err)
	}
	return err
}

func (m *Manager) apply(p Plan) error {
	var done []Step
	for _, s := range p.Steps {
		err := s.run()
		if err == nil {
			done = append(done, s)
			continue
		}
		if s.Cleanup {
			return fmt.Errorf("the new rules are in place, but cleaning up failed: %s: %w", s.Why, err)
		}
		var undoErrs []error
		for i := len(done) - 1; i >= 0; i-- {
			if u := done[i].undo; u != nil {
				if uerr := u.Run(); uerr != nil {
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

// run runs the step's action.
func (s Step) run() error {
	if s.do == nil {
		return fmt.Errorf("step %q has no action to run", s.Why)
	}
	return s.do.Run()
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
// --dry-run --json: "ipset", "iptables-restore", "ip6tables-restore",
// "ip -4 -batch", "ip -6 -batch".
func (p Plan) Payloads() map[string]string {
	out := map[string]string{}
	for _, s := range p.Steps {
		if s.Do.Note != "" {
			continue
		}
		name := strings.Fields(string(s.Do.Tool))[0]
		if s.Do.Tool == ToolIP4Batch || s.Do.Tool == ToolIP6Batch {
			name = string(s.Do.Tool)
		}
		out[name] += s.Do.Input
	}
	return out
}
