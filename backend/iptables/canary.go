package iptables

import (
	"fmt"

	"github.com/egress-snat/egress-snat/snat"
)

// QuickDrift compares the kernel with what plan p leaves, without reading
// a single set member: each family's nat table (chain, jump, rules, keep
// chain), the mangle chains where marks are wanted, and the sets' member
// counts (ipset list -t). It returns a description of the first
// difference, or "" when they agree. A member swapped by hand for another
// keeps the count; the daemon's slow full read finds that.
func (b *Backend) QuickDrift(np snat.NATPlan) (string, error) {
	p, ok := np.(*Plan)
	if !ok || p == nil {
		return "", fmt.Errorf("no iptables plan to compare with")
	}
	for _, f := range snat.Families {
		c := p.Chains[f]
		// The nat table alone is the smaller read; where marks or a hold
		// are wanted, one whole save serves all tables.
		marked, holding := anyMarked(f, p.Desired), len(c.Hold) > 0
		save := b.Tables.SaveNAT
		if marked || holding {
			save = b.Tables.Save
		}
		text, err := save(f)
		if err != nil {
			return "", err
		}
		s, err := ReadSave(text, table, mangleTable, filterTable)
		if err != nil {
			return "", fmt.Errorf("reading %s %w", f, err)
		}
		if holding && !readHold(f, s.Table(filterTable)).inSync(c.Hold) {
			return fmt.Sprintf("the %s hold chain differs", f), nil
		}
		if marked && !readMangle(f, s.Table(mangleTable)).inSync(renderMangle(f, p.Desired, p.Tables[f])) {
			return fmt.Sprintf("the %s mangle chains differ", f), nil
		}
		sets := make(map[string]Set, len(c.Sets))
		for _, s := range c.Sets {
			sets[s.Name] = Set{Name: s.Name, Family: f}
		}
		in := readInstalled(f, s.Table(table), sets)
		if !in.InSync(c) {
			return fmt.Sprintf("the %s chain or its jump differs", f), nil
		}
	}
	if len(p.Chains[snat.IPv4].Sets)+len(p.Chains[snat.IPv6].Sets) > 0 {
		have, err := b.Sets.Headers()
		if err != nil {
			return "", err
		}
		for _, f := range snat.Families {
			for _, s := range p.Chains[f].Sets {
				if n, ok := have[s.Name]; !ok || n != len(s.Members)+len(s.NoMatch) {
					return fmt.Sprintf("set %s holds %d entries, want %d", s.Name, n, len(s.Members)+len(s.NoMatch)), nil
				}
			}
		}
	}
	return "", nil
}
