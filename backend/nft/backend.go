package nft

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// Backend is the native nftables backend of snat.Manager: our table,
// written by one netlink transaction per change, no process.
type Backend struct {
	Conn *Conn
}

var _ snat.Backend = (*Backend)(nil)

// ToolNetlink names the program a step of this backend runs: one netlink
// transaction, shown as the nft(8) commands it makes.
const ToolNetlink snat.Tool = "nft (one netlink transaction)"

// Snapshot is what Backend read: our table (nil: there is none), and the
// ruleset generation it was read at.
type Snapshot struct {
	Table *Table
	Gen   uint32
}

// Entries are f's installed entries, sorted: one per destination of each
// rule of the nat chain (a set's elements, masked to its prefix length, or
// the rule's one destination), marked where a rule of a mark chain marks
// their traffic, with the Via of that mark's reply table in routing.
func (s *Snapshot) Entries(f snat.Family, routing routes.State) []snat.Entry {
	if s.Table == nil {
		return nil
	}
	return s.Table.entries(f, routing)
}

// Lingers reports whether the table is only the keeper's, kept for live
// connections whose rules went (snat.Lingerer).
func (s *Snapshot) Lingers() bool {
	return s.Table != nil && len(s.Table.kept()) > 0
}

// Read reads our table, elements and all. known (the last plan the
// caller wrote) lets it read the shape alone when the kernel's counts
// match what that plan wrote: the elements are then that plan's.
func (b *Backend) Read(known snat.NATPlan) (snat.Installation, error) {
	if p, ok := known.(*Change); ok && p != nil && p.want != nil {
		shape, gen, err := b.Conn.ReadShape()
		if err != nil {
			return nil, err
		}
		// Every chain and rule as written, every set of its count: the
		// elements are that plan's (a hand edit that keeps a count is
		// the slow full read's to find).
		if shapeDrift(shape, p.want) == "" && (shape == nil || len(shape.Sets) == len(p.want.Sets)) {
			return &Snapshot{Table: p.want, Gen: gen}, nil
		}
		// A chain changed (flushed, edited) but every set holds what
		// the plan wrote, by its count: the chains as read, the sets'
		// elements as written. A repair then rewrites the chain alone
		// and dumps no elements, which at 100,000 is most of its time.
		if t := withKnownElements(shape, p.want); t != nil {
			return &Snapshot{Table: t, Gen: gen}, nil
		}
	}
	t, gen, err := b.Conn.Read()
	if err != nil {
		return nil, err
	}
	return &Snapshot{Table: t, Gen: gen}, nil
}

// withKnownElements is shape (a table read without elements) with each
// set's elements taken from written, when both have the same sets, of the
// same kind and the kernel's count of each is written's; nil otherwise.
func withKnownElements(shape, written *Table) *Table {
	if shape == nil || len(shape.Sets) != len(written.Sets) {
		return nil
	}
	t := *shape
	t.Sets = slices.Clone(shape.Sets)
	for i := range t.Sets {
		s := &t.Sets[i]
		w := written.Set(s.Name)
		if w == nil || w.Family != s.Family || w.Bits != s.Bits || s.Count < 0 || s.Count != w.Elems.Len() {
			return nil
		}
		s.Elems = w.Elems
	}
	return &t
}

// Change is the nftables backend's part of a plan (snat.NATPlan): one
// program, run as one netlink transaction, and the table it leaves.
type Change struct {
	prog, undo Program
	want       *Table
	have       *Table
	conn       *Conn
	strands    bool
	// err is why want cannot be written: running the plan fails with it.
	err error
}

var _ snat.NATPlan = (*Change)(nil)

// Remembered is the change as Read's known uses it: the table it writes,
// without the table it was made from and its programs.
func (p *Change) Remembered() snat.NATPlan {
	if p == nil {
		return nil
	}
	return &Change{want: p.want}
}

// Plan renders want and plans the change from have's table. When want
// holds no rule, the table stays with its keeper alone while live
// connections translated to the sources of the rules that went live
// (their addresses in the keeper's comment): its nat chain keeps the NAT
// hooks and its ct expression conntrack (see the package comment). Once
// they have ended, the table is deleted.
func (b *Backend) Plan(have snat.Installation, want snat.Want) snat.NATPlan {
	st := have.(*Snapshot)
	p := &Change{have: st.Table, conn: b.Conn}
	w, err := Render(want.Entries)
	if err != nil {
		// The entries passed Resolve; what Render refuses (an interface
		// name too long for the kernel) fails the write, not the plan.
		p.err = err
		p.prog = Program{Steps: []Step{DeleteTable{}}} // shown, never run
		return p
	}
	if !hasRules(w) {
		kept := keptFor(st.Table, want.Live)
		p.strands = st.Table != nil
		if len(kept) == 0 && (want.Live != nil || st.Table == nil) {
			w = nil
		} else {
			setKept(w, kept)
		}
	}
	p.want = w
	p.prog = Plan(st.Table, w)
	p.undo = Plan(w, st.Table)
	return p
}

// Phases puts the one transaction where the iptables backend writes its
// chains: after the routes of ours are added.
func (p *Change) Phases() (prepare, main, cleanup []snat.Step) {
	if p.prog.Empty() {
		return nil, nil, nil
	}
	why := "write the egress-snat nftables table, in one transaction"
	if p.want == nil {
		why = "delete the egress-snat nftables table"
	}
	var undo snat.Action
	if !p.undo.Empty() {
		undo = transaction{p.conn, p.undo, nil}
	}
	return nil, []snat.Step{snat.NewStep(why, transaction{p.conn, p.prog, p.err}, undo)}, nil
}

// Holds is "3 rules, 1 set of 10000 destinations".
func (p *Change) Holds() string {
	rules, sets, elems := 0, 0, 0
	if p.want != nil {
		for _, c := range p.want.Chains {
			for _, r := range c.Rules {
				if c.Name == ChainNAT && r.Action.Kind != ActCount {
					rules++
				}
			}
		}
		for _, s := range p.want.Sets {
			if strings.HasPrefix(s.Name, "d") {
				sets++
				elems += s.Elems.Len()
			}
		}
	}
	now := snat.Plural(rules, "rule")
	if sets > 0 {
		now += fmt.Sprintf(", %s of %s", snat.Plural(sets, "set"), snat.Plural(elems, "destination"))
	}
	return now
}

// Lingering names the table kept only for live connections.
func (p *Change) Lingering() []string {
	if p.want == nil || hasRules(p.want) {
		return nil
	}
	if kept := p.want.kept(); len(kept) > 0 {
		return []string{fmt.Sprintf("conntrack and the NAT hooks (the nftables table %s with its keeper alone), for live connections translated to %s", TableName, addrList(kept))}
	}
	return nil
}

// Strands reports whether the plan takes the last rule of ours away, or
// touches a table kept for live connections.
func (p *Change) Strands() bool { return p.strands }

// Generations is nftables' one generation, for both families.
func (b *Backend) Generations() (map[snat.Family]uint64, error) {
	g, err := b.Conn.Generation()
	if err != nil {
		return nil, err
	}
	return map[snat.Family]uint64{snat.IPv4: uint64(g), snat.IPv6: uint64(g)}, nil
}

// QuickDrift reads the table's shape (chains, rules, sets and their
// element counts, no element) and compares it with what p left.
func (b *Backend) QuickDrift(np snat.NATPlan) (string, error) {
	p, ok := np.(*Change)
	if !ok || p == nil {
		return "", fmt.Errorf("no nftables plan to compare with")
	}
	shape, _, err := b.Conn.ReadShape()
	if err != nil {
		return "", err
	}
	return shapeDrift(shape, p.want), nil
}

// shapeDrift describes the first difference between a table read without
// elements and want, or "".
func shapeDrift(have, want *Table) string {
	switch {
	case want == nil && have == nil:
		return ""
	case want == nil:
		return fmt.Sprintf("the nftables table %s is there, but nothing of ours is wanted", TableName)
	case have == nil:
		return fmt.Sprintf("the nftables table %s is missing", TableName)
	}
	for _, c := range want.Chains {
		h := have.Chain(c.Name)
		if h == nil || h.Hook != c.Hook || !c.Equal(*h) {
			return fmt.Sprintf("chain %s of the nftables table %s differs", c.Name, TableName)
		}
	}
	if len(have.Chains) != len(want.Chains) || len(have.Foreign) > 0 {
		return fmt.Sprintf("the nftables table %s holds chains egress-snat did not write", TableName)
	}
	for _, s := range want.Sets {
		h := have.Set(s.Name)
		if h == nil {
			return fmt.Sprintf("set %s is missing", s.Name)
		}
		if h.Count >= 0 && h.Count != s.Elems.Len() {
			return fmt.Sprintf("set %s holds %d elements, want %d", s.Name, h.Count, s.Elems.Len())
		}
	}
	return ""
}

// Diagnose names the differences between the installed table and the
// one plan np writes, by the kinds the iptables backend uses.
func (b *Backend) Diagnose(have snat.Installation, _ snat.Want, np snat.NATPlan) []snat.Finding {
	st := have.(*Snapshot)
	p := np.(*Change)
	var out []snat.Finding
	add := func(kind, format string, args ...any) {
		out = append(out, snat.Finding{Kind: kind, Detail: fmt.Sprintf(format, args...)})
	}
	w, h := p.want, st.Table
	switch {
	case w == nil && h == nil:
		return nil
	case h == nil:
		add(snat.DriftChainMissing, "the nftables table %s is missing", TableName)
		return out
	case w == nil:
		return nil // a table kept for nothing: the plan deletes it, as a rule out of date says
	}
	for _, f := range h.Foreign {
		add(snat.DriftChainAltered, "the nftables table %s holds what egress-snat did not write: %s", TableName, f)
	}
	for _, c := range w.Chains {
		hc := h.Chain(c.Name)
		switch {
		case hc == nil && c.Name != ChainNAT:
			add(snat.DriftMarks, "the mark chain %s of the nftables table %s is missing", c.Name, TableName)
		case hc == nil:
			add(snat.DriftChainMissing, "the nat chain %s of the nftables table %s is missing", c.Name, TableName)
		case hc.Hook != c.Hook || !c.Equal(*hc):
			kind := snat.DriftChainAltered
			if c.Name != ChainNAT {
				kind = snat.DriftMarks
			}
			add(kind, "chain %s of the nftables table %s is not what egress-snat writes", c.Name, TableName)
		}
	}
	for _, s := range w.Sets {
		hs := h.Set(s.Name)
		switch {
		case hs == nil:
			add(snat.DriftSetOutOfDate, "set %s is missing", s.Name)
		case !hs.Elems.Equal(s.Elems):
			add(snat.DriftSetOutOfDate, "set %s holds %s, want %d", s.Name, snat.Plural(hs.Elems.Len(), "element"), s.Elems.Len())
		}
	}
	return out
}

// transaction is one program run as one netlink transaction; err, when
// set, is why it cannot run.
type transaction struct {
	conn *Conn
	prog Program
	err  error
}

func (t transaction) Show() snat.Command {
	return snat.Command{Tool: ToolNetlink, Input: t.prog.Show()}
}

func (t transaction) Run() error {
	if t.err != nil {
		return t.err
	}
	_, err := t.conn.Run(t.prog)
	return err
}

// hasRules reports whether the table's nat chain holds a rule of ours
// besides the keeper, or a mark chain exists.
func hasRules(t *Table) bool {
	if t == nil {
		return false
	}
	for _, c := range t.Chains {
		for _, r := range c.Rules {
			if r.Action.Kind != ActCount {
				return true
			}
		}
	}
	return false
}

// keptComment starts the comment of a keeper in a table kept for live
// connections: one keeper rule per address, which follows.
const keptComment = "kept for connections translated to "

// kept are the addresses a table kept for live connections names in its
// keepers' comments.
func (t *Table) kept() []netip.Addr {
	c := t.Chain(ChainNAT)
	if c == nil {
		return nil
	}
	var out []netip.Addr
	for _, r := range c.Rules {
		rest, ok := strings.CutPrefix(r.Comment, keptComment)
		if r.Action.Kind != ActCount || !ok {
			continue
		}
		if a, err := netip.ParseAddr(rest); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// setKept makes the nat chain's keeper one rule per address of addrs,
// each naming its address: the kernel holds what the table is kept for.
func setKept(t *Table, addrs []netip.Addr) {
	for i := range t.Chains {
		c := &t.Chains[i]
		if c.Name != ChainNAT {
			continue
		}
		var rules []Rule
		for _, r := range c.Rules {
			if r.Action.Kind != ActCount {
				rules = append(rules, r)
				continue
			}
			for _, a := range addrs {
				k := r
				k.Comment = keptComment + a.String()
				rules = append(rules, k)
			}
		}
		c.Rules = rules
	}
}

// keptFor returns the addresses a table with no rule left must be kept
// for: those of have's rules and of what it was kept for already, that
// live flows are translated to. Without live it keeps what is kept, and
// the sources of have's rules.
func keptFor(have *Table, live *snat.Liveness) []netip.Addr {
	if have == nil {
		return nil
	}
	cands := have.kept()
	for _, f := range snat.Families {
		for _, e := range have.entries(f, routes.State{}) {
			cands = append(cands, e.To...)
		}
	}
	var out []netip.Addr
	for _, a := range cands {
		if (live == nil || live.Translated[a] > 0) && !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

func addrList(as []netip.Addr) string {
	return snat.Entry{To: as}.ToString()
}

// Counter is one SNAT rule's counter: the new connections (and their
// first packets' bytes) it translated to To (over all of To, for a spread
// rule), or to addresses of Pool (taken as Sticky says), for stats.
type Counter struct {
	To             []netip.Addr
	Pool           netip.Prefix
	Sticky         snat.Sticky
	Ports          snat.Ports
	Packets, Bytes uint64
}

// Counters reads the nat chain's rules with their counters (no element).
func (b *Backend) Counters() ([]Counter, error) {
	shape, _, err := b.Conn.ReadShape()
	if err != nil || shape == nil {
		return nil, err
	}
	c := shape.Chain(ChainNAT)
	if c == nil {
		return nil, nil
	}
	var out []Counter
	for _, r := range c.Rules {
		if r.Action.Kind == ActSNAT {
			out = append(out, Counter{To: r.Action.To, Pool: r.Action.Pool, Sticky: r.Action.Sticky, Ports: r.Action.Ports, Packets: r.Packets, Bytes: r.Bytes})
		}
	}
	return out, nil
}
