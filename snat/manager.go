package snat

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Manager installs, reads and removes the managed rules. It holds no state of
// its own: every operation reads the kernel first.
type Manager struct {
	Tables Tables
	Sets   IPSets
}

// State is what the kernel holds of ours, read in one pass: one save per
// family and one ipset save.
type State struct {
	Installed map[Family]Installed
	// Sets are all sets with our name prefix, referenced or not.
	Sets map[string]Set
}

// Entries returns the installed entries of both families, sorted.
func (s *State) Entries() []Entry {
	var out []Entry
	for _, f := range Families {
		out = append(out, s.Installed[f].Entries...)
	}
	SortEntries(out)
	return out
}

// Read reads the kernel's current state.
func (m *Manager) Read() (*State, error) {
	// The three dumps are independent; running them at once saves most of
	// a no-op apply's time.
	var setText string
	var setErr error
	texts := map[Family]string{}
	errs := map[Family]error{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	wg.Go(func() { setText, setErr = m.Sets.Save() })
	for _, f := range Families {
		wg.Go(func() {
			t, err := m.Tables.Save(f)
			mu.Lock()
			texts[f], errs[f] = t, err
			mu.Unlock()
		})
	}
	wg.Wait()
	if setErr != nil {
		return nil, setErr
	}
	sets, err := ParseSets(setText)
	if err != nil {
		return nil, err
	}
	st := &State{Installed: map[Family]Installed{}, Sets: sets}
	for _, f := range Families {
		if errs[f] != nil {
			return nil, errs[f]
		}
		in, err := ParseSave(f, texts[f], sets)
		if err != nil {
			return nil, err
		}
		st.Installed[f] = in
	}
	return st, nil
}

// Change is one destination's difference between installed and desired.
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
	return fmt.Sprintf("change %s: %s -> %s", c.New.Dst, c.Old.ToString(), c.New.ToString())
}

// Plan is what Apply will write. It is computed without side effects, so
// --dry-run shows exactly what a real run would do.
type Plan struct {
	Changes []Change `json:"changes"`
	// Desired are the normalized entries the kernel holds after the plan.
	Desired []Entry `json:"desired"`
	// Chains are the desired chains; Write says which families need a write.
	Chains map[Family]Chain `json:"-"`
	Write  map[Family]bool  `json:"-"`
	// Payloads are the exact iptables-restore inputs per family.
	Payloads map[Family]string `json:"-"`
	// CreateSets are sets to create before the chains refer to them;
	// DestroySets are ours that nothing will refer to afterwards.
	CreateSets  []Set    `json:"-"`
	DestroySets []string `json:"-"`
}

// Empty reports whether the plan writes nothing.
func (p Plan) Empty() bool {
	return !p.Write[IPv4] && !p.Write[IPv6] && len(p.CreateSets) == 0 && len(p.DestroySets) == 0
}

// SetPayload is the ipset restore input that creates the plan's new sets.
func (p Plan) SetPayload() string { return SetRestorePayload(p.CreateSets) }

// MakePlan compares the installed state with the desired entries (of both
// families; they are normalized here) and returns what must be written.
func MakePlan(st *State, desired []Entry) Plan {
	desired = Normalize(desired)
	p := Plan{Desired: desired, Chains: map[Family]Chain{}, Write: map[Family]bool{}, Payloads: map[Family]string{}}

	installed := st.Entries()
	old := make(map[netip.Prefix]Entry, len(installed))
	for _, e := range installed {
		old[e.Dst] = e
	}
	for _, e := range desired {
		o, had := old[e.Dst]
		delete(old, e.Dst)
		switch {
		case !had:
			p.Changes = append(p.Changes, Change{Op: "add", New: ptr(e)})
		case !o.Equal(e):
			p.Changes = append(p.Changes, Change{Op: "change", Old: ptr(o), New: ptr(e)})
		}
	}
	for _, e := range slices.SortedFunc(maps.Values(old), compareEntries) {
		p.Changes = append(p.Changes, Change{Op: "remove", Old: ptr(e)})
	}

	referenced := map[string]bool{}
	for _, f := range Families {
		c := Render(f, desired)
		p.Chains[f] = c
		in := st.Installed[f]
		for _, s := range c.Sets {
			referenced[s.Name] = true
			if have, ok := st.Sets[s.Name]; !ok || !sameMembers(have, s) {
				p.CreateSets = append(p.CreateSets, s)
			}
		}
		if in.InSync(c) && !setsRecreated(c, p.CreateSets) {
			continue
		}
		p.Write[f] = true
		if len(c.Rules) == 0 {
			p.Payloads[f] = ClearPayload(in.Jumps)
		} else {
			p.Payloads[f] = RestorePayload(c, in.Jumps)
		}
	}
	for name := range st.Sets {
		if !referenced[name] && !strings.HasSuffix(name, tmpSuffix) {
			p.DestroySets = append(p.DestroySets, name)
		}
	}
	slices.Sort(p.DestroySets)
	return p
}

func ptr(e Entry) *Entry { return &e }

func sameMembers(a, b Set) bool {
	return slices.Equal(a.Members, b.Members) && slices.Equal(a.NoMatch, b.NoMatch)
}

func setsRecreated(c Chain, created []Set) bool {
	for _, s := range c.Sets {
		for _, n := range created {
			if n.Name == s.Name {
				return true
			}
		}
	}
	return false
}

// Apply writes a plan made by MakePlan from st:
//
//  1. new sets are created and filled (nothing refers to them yet);
//  2. each family's chain and jump are written in one iptables-restore
//     transaction: readers and new connections see the old chain or the new
//     one, never a mixture;
//  3. sets nothing refers to any more are destroyed.
//
// If a family's write fails, families already written are put back as they
// were and the new sets are destroyed, so a failed Apply leaves the host as
// it found it. A set that exists under a desired name with other members
// (someone edited it) is rebuilt under a temporary name and swapped in
// atomically.
func (m *Manager) Apply(st *State, p Plan) error {
	if err := m.createSets(st, p.CreateSets); err != nil {
		return err
	}
	var written []Family
	for _, f := range Families {
		if !p.Write[f] {
			continue
		}
		if err := m.Tables.Restore(f, p.Payloads[f]); err != nil {
			rollbackErr := m.rollback(st, written)
			m.destroyNew(st, p.CreateSets)
			if rollbackErr != nil {
				return fmt.Errorf("writing %s chain: %w (and putting back the chains already written failed: %v)", f, err, rollbackErr)
			}
			return fmt.Errorf("writing %s chain: %w (nothing was changed)", f, err)
		}
		written = append(written, f)
	}
	for _, f := range written {
		if len(p.Chains[f].Rules) == 0 {
			if err := DropEmptyNFTTable(m.Tables, f); err != nil {
				return err
			}
		}
	}
	return m.destroySets(p.DestroySets)
}

// createSets creates the plan's new sets. A desired name that already exists
// with other content (edited by hand) is filled under a temporary name and
// swapped in, which is atomic. Temporary sets left by an interrupted run are
// destroyed first; no rule ever refers to them.
func (m *Manager) createSets(st *State, sets []Set) error {
	var b strings.Builder
	for name := range st.Sets {
		if strings.HasSuffix(name, tmpSuffix) {
			b.WriteString("destroy " + name + "\n")
		}
	}
	var fresh []Set
	for _, s := range sets {
		if _, exists := st.Sets[s.Name]; !exists {
			fresh = append(fresh, s)
			b.WriteString(SetRestorePayload([]Set{s}))
			continue
		}
		tmp := s
		tmp.Name = s.Name + tmpSuffix
		b.WriteString(SetRestorePayload([]Set{tmp}))
		fmt.Fprintf(&b, "swap %s %s\ndestroy %s\n", tmp.Name, s.Name, tmp.Name)
	}
	if b.Len() == 0 {
		return nil
	}
	if err := m.Sets.Restore(b.String()); err != nil {
		m.destroyNew(st, fresh)
		return fmt.Errorf("creating destination sets: %w (nothing was changed)", err)
	}
	return nil
}

// tmpSuffix marks a set being rebuilt before it is swapped in.
const tmpSuffix = "~"

func (m *Manager) destroyNew(st *State, sets []Set) {
	// One name at a time: a failed restore may have created only some of
	// them, and ipset restore stops at the first missing one.
	for _, s := range sets {
		if _, existed := st.Sets[s.Name]; !existed {
			_ = m.destroySets([]string{s.Name})
		}
	}
}

func (m *Manager) destroySets(names []string) error {
	if len(names) == 0 {
		return nil
	}
	var b strings.Builder
	for _, n := range names {
		b.WriteString("destroy " + n + "\n")
	}
	if err := m.Sets.Restore(b.String()); err != nil {
		return fmt.Errorf("removing unused destination sets: %w", err)
	}
	return nil
}

// rollback puts the chains of the given families back as st had them.
func (m *Manager) rollback(st *State, families []Family) error {
	var errs []error
	for _, f := range families {
		in := st.Installed[f]
		cur, err := m.Tables.Save(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		now, err := ParseSave(f, cur, st.Sets)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var payload string
		if in.ChainExists {
			payload = RestorePayload(Chain{Family: f, Rules: in.Rules}, now.Jumps)
		} else {
			payload = ClearPayload(now.Jumps)
		}
		if err := m.Tables.Restore(f, payload); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

// Update is the one write path: under the lock it reads the kernel, asks
// desired for the complete desired entries given what is installed, plans,
// and applies the plan unless dryRun. An empty plan writes nothing.
func (m *Manager) Update(lockTimeout time.Duration, dryRun bool, desired func(*State) ([]Entry, error)) (*State, Plan, error) {
	return m.UpdateThen(lockTimeout, dryRun, desired, nil)
}

// UpdateThen is Update with a last step, then, that runs under the same lock
// once the kernel holds the plan (not on a dry run): a change that must land
// in the kernel and somewhere else (the permanent file) in one step. If then
// fails, the kernel is put back as it was read, so both or neither change.
func (m *Manager) UpdateThen(lockTimeout time.Duration, dryRun bool, desired func(*State) ([]Entry, error), then func(Plan) error) (*State, Plan, error) {
	unlock, err := Lock(lockTimeout)
	if err != nil {
		return nil, Plan{}, err
	}
	defer unlock()
	st, err := m.Read()
	if err != nil {
		return nil, Plan{}, err
	}
	want, err := desired(st)
	if err != nil {
		return st, Plan{}, err
	}
	p := MakePlan(st, want)
	if dryRun {
		return st, p, nil
	}
	if !p.Empty() {
		if err := m.Apply(st, p); err != nil {
			return st, p, err
		}
	}
	if then == nil {
		return st, p, nil
	}
	if err := then(p); err != nil {
		if p.Empty() {
			return st, p, err
		}
		if back := m.restore(st); back != nil {
			return st, p, fmt.Errorf("%w (and putting the rules back failed: %v)", err, back)
		}
		return st, p, fmt.Errorf("%w (the rules were put back as they were)", err)
	}
	return st, p, nil
}

// restore makes the kernel hold st's entries again.
func (m *Manager) restore(st *State) error {
	now, err := m.Read()
	if err != nil {
		return err
	}
	return m.Apply(now, MakePlan(now, st.Entries()))
}

// Has reports whether the plan has a rule for dst after it is applied.
func (p Plan) Has(dst netip.Prefix) bool {
	for _, e := range p.Desired {
		if e.Dst == dst {
			return true
		}
	}
	return false
}

// Summary counts the plan's changes and the resulting chains in one line:
// "1 added, 0 changed, 2 removed (chains now: 3 rules, 1 set of 10000 destinations)".
func (p Plan) Summary() string {
	n := map[string]int{}
	for _, c := range p.Changes {
		n[c.Op]++
	}
	rules, sets, members := 0, 0, 0
	for _, c := range p.Chains {
		rules += len(c.Rules)
		sets += len(c.Sets)
		for _, s := range c.Sets {
			members += len(s.Members)
		}
	}
	now := plural(rules, "rule")
	if sets > 0 {
		now += fmt.Sprintf(", %s of %s", plural(sets, "set"), plural(members, "destination"))
	}
	return fmt.Sprintf("%d added, %d changed, %d removed (chains now: %s)", n["add"], n["change"], n["remove"], now)
}

func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}
