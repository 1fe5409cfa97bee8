package iptables

import (
	"fmt"
	"hash/fnv"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// Backend is the iptables backend of snat.Manager: the nat chain and the
// mangle chains through iptables-restore (iptables-nft or iptables-legacy,
// whichever Tables runs), and large destination lists in ipsets.
type Backend struct {
	Tables Tables
	Sets   IPSets
}

var _ snat.Backend = (*Backend)(nil)

// Snapshot is what the iptables backend read of ours: one save per family
// and one ipset save.
type Snapshot struct {
	// CanDropTable is the backend's: see Tables.
	CanDropTable bool
	Installed    map[snat.Family]Installed
	// Sets are all sets with our name prefix, referenced or not.
	Sets map[string]Set
	// Mangle holds our mangle chains per family.
	Mangle map[snat.Family]MangleInstalled
	// Hold holds our hold chain per family (hold.go).
	Hold map[snat.Family]HoldInstalled
}

// Entries are f's installed entries, sorted, marked where a mangle rule of
// ours sends them out of another interface (see markedEntries), and held
// where the hold chain drops for them.
func (s *Snapshot) Entries(f snat.Family, routing routes.State) []snat.Entry {
	return heldEntries(markedEntries(s.Installed[f].Entries, s.Mangle[f], routing), s.Hold[f].held(f, s.Sets))
}

// Lingers reports whether a keep chain holds conntrack for connections
// of rules that went (keep.go).
func (s *Snapshot) Lingers() bool {
	for _, in := range s.Installed {
		if in.KeepExists {
			return true
		}
	}
	return false
}

// Read reads the kernel's current state: the three dumps (each family's
// save and ipset save) at once, which saves most of a no-op apply's time.
// With known (the last plan the caller wrote), a set whose name and entry
// count the kernel still shows is taken to hold what that plan put there,
// which names that are digests of the members make safe but for a hand
// edit that keeps the count (a daemon's slow full read finds those); any
// other set makes it read everything.
func (b *Backend) Read(known snat.NATPlan) (snat.Installation, error) {
	if p, ok := known.(*Plan); ok && p != nil {
		if sets, ok, err := b.knownSets(p); err != nil || ok {
			if err != nil {
				return nil, err
			}
			texts, errs := map[snat.Family]string{}, map[snat.Family]error{}
			for _, f := range snat.Families {
				texts[f], errs[f] = b.Tables.Save(f)
			}
			return b.build(sets, texts, errs)
		}
	}
	var setText string
	var setErr error
	texts := map[snat.Family]string{}
	errs := map[snat.Family]error{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	wg.Go(func() { setText, setErr = b.Sets.Save() })
	for _, f := range snat.Families {
		wg.Go(func() {
			t, err := b.Tables.Save(f)
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
	return b.build(sets, texts, errs)
}

// knownSets returns the sets p wrote, when the kernel's headers show each
// set of ours with the count p gave it; false when any differs.
func (b *Backend) knownSets(p *Plan) (map[string]Set, bool, error) {
	heads, err := b.Sets.Headers()
	if err != nil {
		return nil, false, err
	}
	byName := map[string]Set{}
	for _, c := range p.Chains {
		for _, s := range c.Sets {
			byName[s.Name] = s
		}
	}
	sets := make(map[string]Set, len(heads))
	for name, n := range heads {
		s, ok := byName[name]
		if !ok || len(s.Members)+len(s.NoMatch) != n {
			return nil, false, nil
		}
		sets[name] = s
	}
	return sets, true, nil
}

// build parses the dumps into a Snapshot.
func (b *Backend) build(sets map[string]Set, texts map[snat.Family]string, errs map[snat.Family]error) (*Snapshot, error) {
	st := &Snapshot{Installed: map[snat.Family]Installed{}, Sets: sets, CanDropTable: b.Tables.CanDropTable(),
		Mangle: map[snat.Family]MangleInstalled{}, Hold: map[snat.Family]HoldInstalled{}}
	for _, f := range snat.Families {
		if errs[f] != nil {
			return nil, errs[f]
		}
		// One read of the save for the tables of ours.
		s, err := ReadSave(texts[f], table, mangleTable, filterTable)
		if err != nil {
			return nil, fmt.Errorf("reading %s %w", f, err)
		}
		st.Installed[f] = readInstalled(f, s.Table(table), sets)
		st.Mangle[f] = readMangle(f, s.Table(mangleTable))
		st.Hold[f] = readHold(f, s.Table(filterTable))
	}
	return st, nil
}

// Generations returns, per family, the number Tables.Generation gives.
// Each is folded with the element counts of our sets (their headers,
// over netlink): nftables' generation does not move when an ipset does,
// and a member deleted by hand would otherwise wait for the quick tier.
func (b *Backend) Generations() (map[snat.Family]uint64, error) {
	sets, err := b.Sets.Headers()
	if err != nil {
		return nil, err
	}
	h := fnv.New64a()
	for _, name := range slices.Sorted(maps.Keys(sets)) {
		fmt.Fprintf(h, "%s %d\n", name, sets[name])
	}
	out := map[snat.Family]uint64{}
	for _, f := range snat.Families {
		g, err := b.Tables.Generation(f)
		if err != nil {
			return nil, err
		}
		out[f] = g ^ h.Sum64()
	}
	return out, nil
}

// restore is an iptables-restore --noflush of one family's payload.
type restore struct {
	t       Tables
	f       snat.Family
	payload string
}

func (a restore) Show() snat.Command {
	return snat.Command{Tool: restoreTool(a.f), Family: a.f, Input: a.payload}
}
func (a restore) Run() error { return a.t.Restore(a.f, a.payload) }

// ipsetRestore is an ipset restore of a payload.
type ipsetRestore struct {
	s       IPSets
	payload string
}

func (a ipsetRestore) Show() snat.Command { return snat.Command{Tool: ToolIPSet, Input: a.payload} }
func (a ipsetRestore) Run() error         { return a.s.Restore(a.payload) }

// dropTable deletes one family's table if it still holds nothing.
type dropTable struct {
	t    Tables
	f    snat.Family
	name string
}

func (a dropTable) Show() snat.Command {
	input := ""
	if a.name != table {
		input = a.name // as before: the nat table's drop names none
	}
	return snat.Command{Tool: ToolDropTable, Family: a.f, Input: input,
		Note: string(ToolDropTable) + " " + nftFamily(a.f) + " " + a.name + " (only if it is still empty)"}
}
func (a dropTable) Run() error { return a.t.DropTable(a.f, a.name) }

// The tools the iptables backend's steps run.
const (
	ToolIPSet     snat.Tool = "ipset restore"
	ToolIPTables  snat.Tool = "iptables-restore --noflush"
	ToolIP6Tables snat.Tool = "ip6tables-restore --noflush"
	ToolDropTable snat.Tool = "nft delete table"
)

// restoreTool is the family's iptables-restore.
func restoreTool(f snat.Family) snat.Tool {
	if f == snat.IPv6 {
		return ToolIP6Tables
	}
	return ToolIPTables
}

func nftFamily(f snat.Family) string {
	if f == snat.IPv6 {
		return "ip6"
	}
	return "ip"
}

// SetNames returns which set of ours holds each installed entry ("" when
// its rule names it alone), read back from the chains' rules: what list
// shows (snat.SetNamer).
func (s *Snapshot) SetNames() func(snat.Entry) string {
	type key struct {
		who snat.Sender
		dst netip.Prefix
	}
	n := 0
	for _, f := range snat.Families {
		for _, r := range s.Installed[f].Rules {
			if r.Set != "" {
				n += len(s.Sets[r.Set].Members)
			}
		}
	}
	setOf := make(map[key]string, n) // sized: grown, it was most of list's time at 100,000
	for _, f := range snat.Families {
		for _, r := range s.Installed[f].Rules {
			if r.Set == "" {
				continue
			}
			for _, m := range s.Sets[r.Set].Members {
				setOf[key{r.Sender(), m}] = r.Set
			}
		}
	}
	return func(e snat.Entry) string { return setOf[key{e.Sender, e.Dst}] }
}
