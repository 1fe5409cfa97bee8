package snat

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"time"

	"github.com/egress-snat/egress-snat/routes"
)

// Manager installs, reads and removes the managed rules. It holds no state of
// its own: every operation reads the kernel first.
type Manager struct {
	// Backend holds the NAT rules and marks: backend/iptables (both
	// flavours, with ipset) or backend/nft.
	Backend Backend
	// Locker serializes writers; nil means FileLock, the per-namespace
	// lock under /run that every egress-snat process takes.
	Locker Locker
	// Routing reads and writes our routes and ip rules.
	Routing Routing
	// Flows reads what live connections hold, for plans that would take
	// something away from them (linger.go); nil: nothing is kept for them.
	Flows Flows
	// Memory, when set, is what a long-lived process knows of the kernel
	// between its runs (a daemon serving commands): a read that is not
	// told what is known (Request.Known, Read) takes what Memory knows,
	// and Memory is told of every plan written. Nil: every read reads
	// everything, as a one-shot run must.
	Memory Memory
	// Rand picks the address of a new period (settlePeriods); nil: a
	// source seeded at random.
	Rand *rand.Rand
}

// rng is m.Rand, or a source seeded at random.
func (m *Manager) rng() *rand.Rand {
	if m.Rand != nil {
		return m.Rand
	}
	return rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
}

// Memory remembers the last plan a process wrote, for the next read to
// trust (see Backend.Read).
type Memory interface {
	// Known returns the backend's part of the last plan written, nil
	// when none is known.
	Known() NATPlan
	// Wrote tells that the kernel holds p's result (err nil: p was
	// applied, or was empty against a read that trusted nothing the
	// kernel did not show), or that what it holds is not known (err set:
	// an apply failed part way).
	Wrote(p Plan, err error)
}

// Backend is where the rules that give new connections their source live:
// the NAT rules, and the marks that send a sender out of another
// interface. It reads what the kernel holds of ours, plans a change as the
// steps its kernel objects need, in their order, and names drift. The
// Manager owns the rest: resolving, the routes and ip rules of ours
// (package routes), the lock, the order of the whole program, running it.
type Backend interface {
	// Read reads what the kernel holds of ours. known, when not nil, is
	// the backend's part of the last plan the caller wrote (a daemon
	// repairing drift): the backend may take objects the kernel shows
	// unchanged as still holding what that plan put there, instead of
	// reading all of their content.
	Read(known NATPlan) (Installation, error)
	// Plan returns the backend's part of the program that makes the
	// kernel hold want, given have. It has no side effects.
	Plan(have Installation, want Want) NATPlan
	// Diagnose names every difference between have and what plan (made
	// by Plan from have and want) would write, by kind.
	Diagnose(have Installation, want Want, plan NATPlan) []Finding
	// Generations returns, per family, a number that changes whenever the
	// backend's objects may have changed, at no process's cost: a daemon
	// reads nothing else while it is unchanged.
	Generations() (map[Family]uint64, error)
	// QuickDrift compares the kernel with what plan p leaves, cheaply
	// (without reading every set member): a description of the first
	// difference, or "".
	QuickDrift(p NATPlan) (string, error)
}

// Installation is what a backend read of ours.
type Installation interface {
	// Entries returns f's installed entries, sorted; those the backend
	// marks out of another interface are Marked, with the Via of their
	// reply table in routing.
	Entries(f Family, routing routes.State) []Entry
}

// Want is the desired state as a backend plans it.
type Want struct {
	// Entries are the normalized desired entries of both families.
	Entries []Entry
	// Tables number the reply tables per family and source address: the
	// marks that send a sender out of another interface name them.
	Tables map[Family]map[netip.Addr]int
	// Live is what live connections hold (nil: not read; keep what is
	// kept for them).
	Live *Liveness
}

// Routing is what the Manager needs of policy routing: routes.System, or
// routes.Fake in unit tests.
type Routing interface {
	Read(is4 bool) (routes.State, error)
	// Rules reads our ip rules alone: cheap, whatever the size of the
	// host's routing tables.
	Rules(is4 bool) ([]routes.IPRule, error)
	Batch(is4 bool, input string) error
}

// State is what the kernel holds of ours: the backend's NAT objects and
// the routes and ip rules of ours.
type State struct {
	NAT Installation
	// Routing holds our rules and routes per family.
	Routing map[Family]routes.State
	// Live is what live connections hold: nil until a plan needs it
	// (Manager.Plan). See linger.go.
	Live *Liveness
	// entries is Entries, once asked: a State is one read of the kernel,
	// and a command asks for its entries several times (building them
	// from a backend's objects cost 130 ms at 100,000).
	entries     []Entry
	entriesMade bool
}

// Entries returns the installed entries of both families, sorted.
func (s *State) Entries() []Entry {
	if !s.entriesMade {
		s.entries, s.entriesMade = s.makeEntries(), true
	}
	return s.entries
}

func (s *State) makeEntries() []Entry {
	var parts [][]Entry
	for _, f := range Families {
		for _, p := range [][]Entry{s.NAT.Entries(f, s.Routing[f]), routedEntries(s.Routing[f])} {
			if len(p) > 0 {
				parts = append(parts, p)
			}
		}
	}
	if len(parts) == 1 && sortedEntries(parts[0]) {
		// One list, sorted as the backend reads it: returned as it is,
		// not copied (at 100,000 entries the copy was a tenth of a
		// no-op). Callers do not change it in place.
		return parts[0]
	}
	out := slices.Concat(parts...)
	SortEntries(out)
	return out
}

// Read reads the kernel's current state (trusting what Memory knows, when
// set).
func (m *Manager) Read() (*State, error) { return m.read(nil) }

// read reads the state, the backend taking known, else what Memory knows,
// as described at Backend.Read.
func (m *Manager) read(known NATPlan) (*State, error) {
	if known == nil && m.Memory != nil {
		known = m.Memory.Known()
	}
	nat, err := m.Backend.Read(known)
	if err != nil {
		return nil, err
	}
	st := &State{NAT: nat, Routing: map[Family]routes.State{}}
	if m.Routing != nil {
		for _, f := range Families {
			if st.Routing[f], err = m.Routing.Read(f == IPv4); err != nil {
				return nil, err
			}
		}
	}
	return st, nil
}

// Request is one write through Update.
type Request struct {
	// Desired returns the complete desired entries given what is
	// installed. It runs under the lock.
	Desired func(*State) ([]Entry, error)
	// DryRun plans and writes nothing.
	DryRun bool
	// Then, when set, runs under the same lock once the kernel holds the
	// plan (not on a dry run): a change that must land in the kernel and
	// somewhere else (the permanent file) in one step. If Then fails,
	// the kernel is put back as it was read, so both or neither change.
	Then func(Plan) error
	// Known is the backend's part of the plan the caller wrote last (a
	// daemon repairing drift, which knows the content of the sets it
	// wrote): see Backend.Read. Nil reads everything.
	Known NATPlan
	// LockTimeout bounds the wait for the lock.
	LockTimeout time.Duration
}

// Update is the one write path: under the lock it reads the kernel, asks
// r.Desired for the complete desired entries given what is installed,
// plans, and applies the plan unless r.DryRun, then runs r.Then. An empty
// plan writes nothing.
func (m *Manager) Update(r Request) (*State, Plan, error) {
	locker := m.Locker
	if locker == nil {
		locker = FileLock{}
	}
	unlock, err := locker.Lock(r.LockTimeout)
	if err != nil {
		return nil, Plan{}, err
	}
	defer unlock()
	st, err := m.read(r.Known)
	if err != nil {
		return nil, Plan{}, err
	}
	want, err := r.Desired(st)
	if err != nil {
		return st, Plan{}, err
	}
	p, err := m.Plan(st, want)
	if err != nil {
		return st, p, err
	}
	if r.DryRun {
		return st, p, nil
	}
	if !p.Empty() {
		if err := m.Apply(p); err != nil {
			return st, p, err
		}
	} else if m.Memory != nil {
		m.Memory.Wrote(p, nil) // the kernel holds what p leaves: what it held
	}
	if r.Then == nil {
		return st, p, nil
	}
	if err := r.Then(p); err != nil {
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
// would take away something they may use (see strands), it reads what
// they hold (Flows) into st.Live and plans again, so that they keep it
// until they end. A st.Live already set (clear --now sets an empty one) is
// taken as it is.
func (m *Manager) Plan(st *State, desired []Entry) (Plan, error) {
	p := m.MakePlan(st, desired)
	if st.Live != nil || m.Flows == nil || !p.strands(st) {
		return p, nil
	}
	live, err := m.Flows.Live()
	if err != nil {
		return p, fmt.Errorf("reading the connections a change must keep: %w", err)
	}
	st.Live = &live
	return m.MakePlan(st, desired), nil
}

// restore makes the kernel hold st's entries again.
func (m *Manager) restore(st *State) error {
	now, err := m.Read()
	if err != nil {
		return err
	}
	now.Live = st.Live
	return m.Apply(m.MakePlan(now, st.Entries()))
}

// Summary counts the plan's changes and what the kernel holds after it in
// one line: "1 added, 0 changed, 2 removed (chains now: 3 rules, 1 set of
// 10000 destinations)".
func (p Plan) Summary() string {
	n := map[string]int{}
	for _, c := range p.Changes {
		n[c.Op]++
	}
	now := "0 rules"
	if p.NAT != nil {
		now = p.NAT.Holds()
	}
	return fmt.Sprintf("%d added, %d changed, %d removed (chains now: %s)", n["add"], n["change"], n["remove"], now)
}

// Plural is "1 rule", "2 rules": n and the word, for summaries.
func Plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}

// Generations is the backend's: see Backend.Generations.
func (m *Manager) Generations() (map[Family]uint64, error) { return m.Backend.Generations() }

// QuickDrift compares the kernel with what plan p leaves, cheaply: the
// backend's objects (Backend.QuickDrift) and our ip rules. It returns a
// description of the first difference, or "" when they agree.
func (m *Manager) QuickDrift(p Plan) (string, error) {
	if d, err := m.Backend.QuickDrift(p.NAT); err != nil || d != "" {
		return d, err
	}
	if m.Routing != nil {
		for _, f := range Families {
			have, err := m.Routing.Rules(f == IPv4)
			if err != nil {
				return "", err
			}
			if !slices.Equal(have, p.Routing[f].Rules) {
				return fmt.Sprintf("the %s ip rules of egress-snat differ", f), nil
			}
		}
	}
	return "", nil
}

// SetNamer is an Installation that holds destinations in named sets (an
// ipset, a set of the nftables table): SetNames tells which holds an
// entry, "" when a rule names it alone.
type SetNamer interface {
	SetNames() func(Entry) string
}
