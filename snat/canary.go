package snat

import (
	"fmt"
	"slices"

	"github.com/egress-snat/egress-snat/routes"
)

// Generations returns, per family, the number Tables.Generation gives: a
// daemon compares it with the last one it saw, and reads nothing while it
// is unchanged.
func (m *Manager) Generations() (map[Family]uint64, error) {
	out := map[Family]uint64{}
	for _, f := range Families {
		g, err := m.Tables.Generation(f)
		if err != nil {
			return nil, err
		}
		out[f] = g
	}
	return out, nil
}

// QuickDrift compares the kernel with what plan p leaves, without reading
// a single set member: each family's nat table (chain, jump, rules), the
// sets' member counts (ipset list -t) and our ip rules. It returns a
// description of the first difference, or "" when they agree. A member
// swapped by hand for another keeps the count; the daemon's slow full read
// finds that.
func (m *Manager) QuickDrift(p Plan) (string, error) {
	for _, f := range Families {
		c := p.Chains[f]
		if anyMarked(f, p.Desired) {
			text, err := m.Tables.Save(f)
			if err != nil {
				return "", err
			}
			mg, err := parseMangle(f, text)
			if err != nil {
				return "", err
			}
			if !mg.inSync(renderMangle(f, p.Desired, routes.ReplyTables(p.Paths[f]))) {
				return fmt.Sprintf("the %s mangle chains differ", f), nil
			}
		}
		text, err := m.Tables.SaveNAT(f)
		if err != nil {
			return "", err
		}
		sets := make(map[string]Set, len(c.Sets))
		for _, s := range c.Sets {
			sets[s.Name] = Set{Name: s.Name, Family: f}
		}
		in, err := ParseSave(f, text, sets)
		if err != nil {
			return "", err
		}
		if !in.InSync(c) {
			return fmt.Sprintf("the %s chain or its jump differs", f), nil
		}
	}
	if len(p.Chains[IPv4].Sets)+len(p.Chains[IPv6].Sets) > 0 {
		have, err := m.Sets.Headers()
		if err != nil {
			return "", err
		}
		for _, f := range Families {
			for _, s := range p.Chains[f].Sets {
				if n, ok := have[s.Name]; !ok || n != len(s.Members)+len(s.NoMatch) {
					return fmt.Sprintf("set %s holds %d entries, want %d", s.Name, n, len(s.Members)+len(s.NoMatch)), nil
				}
			}
		}
	}
	if m.Routing != nil {
		for _, f := range Families {
			want := p.Routing[f].Rules
			have, err := m.Routing.Rules(f == IPv4)
			if err != nil {
				return "", err
			}
			if !slices.Equal(have, want) {
				return fmt.Sprintf("the %s ip rules of egress-snat differ", f), nil
			}
		}
	}
	return "", nil
}
