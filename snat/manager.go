package snat

import (
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/egress-snat/egress-snat/routes"
)

// Manager installs, reads and removes the managed rules. It holds no state of
// its own: every operation reads the kernel first.
type Manager struct {
	Tables Tables
	Sets   IPSets
	// Locker serializes writers; nil means FileLock, the per-namespace
	// lock under /run that every egress-snat process takes.
	Locker Locker
	// Routing reads and writes our routes and ip rules.
	Routing Routing
	// Flows reads what live connections hold, for plans that would take
	// something away from them (linger.go); nil: nothing is kept for them.
	Flows Flows
}

// Routing is what the Manager needs of policy routing: routes.System, or
// routes.Fake in unit tests.
type Routing interface {
	Read(is4 bool) (routes.State, error)
	// Rules reads our ip rules alone: cheap, whatever the size of the
	// host's routing tables.
	Rules(is4 bool) ([]routes.Rule, error)
	Batch(is4 bool, input string) error
}

// State is what the kernel holds of ours, read in one pass: one save per
// family and one ipset save.
type State struct {
	// CanDropNATTable is the backend's: see Tables.
	CanDropNATTable bool
	Installed       map[Family]Installed
	// Sets are all sets with our name prefix, referenced or not.
	Sets map[string]Set
	// Routing holds our rules and routes per family.
	Routing map[Family]routes.State
	// Mangle holds our mangle chains per family.
	Mangle map[Family]MangleInstalled
	// Live is what live connections hold: nil until a plan needs it
	// (Manager.Plan). See linger.go.
	Live *Liveness
}

// Entries returns the installed entries of both families, sorted.
func (s *State) Entries() []Entry {
	var parts [][]Entry
	for _, f := range Families {
		for _, p := range [][]Entry{markedEntries(s.Installed[f].Entries, s.Mangle[f], s.Routing[f]), routedEntries(s.Routing[f])} {
			if len(p) > 0 {
				parts = append(parts, p)
			}
		}
	}
	if len(parts) == 1 && sortedEntries(parts[0]) {
		// One list, sorted as ParseSave leaves it: returned as it is, not
		// copied (at 100,000 entries the copy was a tenth of a no-op).
		// Callers do not change it in place.
		return parts[0]
	}
	out := slices.Concat(parts...)
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
	return m.build(sets, texts, errs)
}

// readWith is Read with the sets given instead of read.
func (m *Manager) readWith(sets map[string]Set) (*State, error) {
	texts := map[Family]string{}
	errs := map[Family]error{}
	for _, f := range Families {
		texts[f], errs[f] = m.Tables.Save(f)
	}
	return m.build(sets, texts, errs)
}

// build parses the dumps into a State.
func (m *Manager) build(sets map[string]Set, texts map[Family]string, errs map[Family]error) (*State, error) {
	var err error
	st := &State{Installed: map[Family]Installed{}, Sets: sets, CanDropNATTable: m.Tables.CanDropNATTable(), Routing: map[Family]routes.State{}, Mangle: map[Family]MangleInstalled{}}
	if m.Routing != nil {
		for _, f := range Families {
			if st.Routing[f], err = m.Routing.Read(f == IPv4); err != nil {
				return nil, err
			}
		}
	}
	for _, f := range Families {
		if errs[f] != nil {
			return nil, errs[f]
		}
		in, err := ParseSave(f, texts[f], sets)
		if err != nil {
			return nil, err
		}
		st.Installed[f] = in
		if st.Mangle[f], err = parseMangle(f, texts[f]); err != nil {
			return nil, err
		}
	}
	return st, nil
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
	return m.update(m.Read, lockTimeout, dryRun, desired, then)
}

// UpdateKnowing is Update for a caller that knows the members of the sets
// it wrote last (a daemon repairing drift): a set whose name and entry
// count the kernel still shows is taken to hold them, which names that are
// digests of the members make safe but for a hand edit that keeps the
// count; the daemon's slow full read finds those. Any other set makes it
// read everything, as Update does.
func (m *Manager) UpdateKnowing(known []Set, lockTimeout time.Duration, desired func(*State) ([]Entry, error)) (*State, Plan, error) {
	read := func() (*State, error) {
		heads, err := m.Sets.Headers()
		if err != nil {
			return nil, err
		}
		byName := make(map[string]Set, len(known))
		for _, s := range known {
			byName[s.Name] = s
		}
		sets := make(map[string]Set, len(heads))
		for name, n := range heads {
			s, ok := byName[name]
			if !ok || len(s.Members)+len(s.NoMatch) != n {
				return m.Read()
			}
			sets[name] = s
		}
		return m.readWith(sets)
	}
	return m.update(read, lockTimeout, false, desired, nil)
}

func (m *Manager) update(read func() (*State, error), lockTimeout time.Duration, dryRun bool, desired func(*State) ([]Entry, error), then func(Plan) error) (*State, Plan, error) {
	locker := m.Locker
	if locker == nil {
		locker = FileLock{}
	}
	unlock, err := locker.Lock(lockTimeout)
	if err != nil {
		return nil, Plan{}, err
	}
	defer unlock()
	st, err := read()
	if err != nil {
		return nil, Plan{}, err
	}
	want, err := desired(st)
	if err != nil {
		return st, Plan{}, err
	}
	p, err := m.Plan(st, want)
	if err != nil {
		return st, p, err
	}
	if dryRun {
		return st, p, nil
	}
	if !p.Empty() {
		if err := m.Apply(p); err != nil {
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

// Plan is MakePlan that keeps what live connections need: when the plan
// would take away something they may use (see Plan.strands), it reads what
// they hold (Flows) into st.Live and plans again, so that they keep it
// until they end. A st.Live already set (clear --now sets an empty one) is
// taken as it is.
func (m *Manager) Plan(st *State, desired []Entry) (Plan, error) {
	p := MakePlan(st, desired)
	if st.Live != nil || m.Flows == nil || !p.strands(st) {
		return p, nil
	}
	live, err := m.Flows.Live()
	if err != nil {
		return p, fmt.Errorf("reading the connections a change must keep: %w", err)
	}
	st.Live = &live
	return MakePlan(st, desired), nil
}

// restore makes the kernel hold st's entries again.
func (m *Manager) restore(st *State) error {
	now, err := m.Read()
	if err != nil {
		return err
	}
	return m.Apply(MakePlan(now, st.Entries()))
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
