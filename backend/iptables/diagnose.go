package iptables

import (
	"fmt"
	"slices"

	"github.com/egress-snat/egress-snat/snat"
)

// Diagnose names every difference between the installed chains, jumps,
// sets and mangle chains and what plan np (made from have and want) writes,
// by kind. The plan's chains, not a bare Render: they carry the names of
// the installed sets the desired ones are placed in (see placeSets).
func (b *Backend) Diagnose(have snat.Installation, want snat.Want, np snat.NATPlan) []snat.Finding {
	st := have.(*Snapshot)
	plan := np.(*Plan)
	var out []snat.Finding
	for _, f := range snat.Families {
		in := st.Installed[f]
		c := plan.Chains[f]
		add := func(kind, format string, args ...any) {
			out = append(out, snat.Finding{Kind: kind, Family: f.String(), Detail: fmt.Sprintf(format, args...)})
		}
		if len(c.Rules) > 0 || in.ChainExists {
			switch {
			case len(in.Jumps) == 0:
				add(snat.DriftJumpMissing, "POSTROUTING has no jump to %s (flushed by a firewall reload?)", ChainName)
			case !in.JumpFirst:
				add(snat.DriftJumpNotFirst, "the jump to %s is not the first POSTROUTING rule: rules inserted ahead of it win", ChainName)
			}
			if len(in.Jumps) > 1 {
				add(snat.DriftJumpDuplicated, "POSTROUTING jumps to %s %d times", ChainName, len(in.Jumps))
			}
		}
		if len(c.Rules) > 0 && !in.ChainExists {
			add(snat.DriftChainMissing, "the %s chain is missing", ChainName)
		}
		// egress-snat removes its chain and jump together when a family
		// has no rules, so an empty chain is always someone else's doing
		// (iptables -t nat -F). Without a file the rules it lost are
		// unknown and nothing else would name it: the desired state, read
		// back from that very chain, is empty too.
		if len(c.Rules) == 0 && in.ChainExists && len(in.Raw) == 0 {
			add(snat.DriftChainEmpty, "the %s chain is empty but still there: egress-snat never leaves it so, its rules were flushed (check -f FILE names them; apply -f FILE puts them back)", ChainName)
		}
		for _, r := range in.Foreign {
			add(snat.DriftChainAltered, "rule not written by egress-snat in %s: %s", ChainName, r)
		}
		for _, s := range c.Sets {
			have, ok := st.Sets[s.Name]
			switch {
			case !ok:
				add(snat.DriftSetOutOfDate, "set %s is missing", s.Name)
			case !sameMembers(have, s):
				add(snat.DriftSetOutOfDate, "set %s holds %s and %s, want %d and %d", s.Name, snat.Plural(len(have.Members), "destination"), snat.Plural(len(have.NoMatch), "exception"), len(s.Members), len(s.NoMatch))
			}
		}
		if in.ChainExists && len(in.Foreign) == 0 && !slices.Equal(in.Rules, c.Rules) && sameEntries(in.Entries, want.Entries, f) {
			add(snat.DriftChainAltered, "the rules of %s are not in the order or shape egress-snat writes", ChainName)
		}
	}
	for _, f := range snat.Families {
		if h := st.Hold[f]; !h.inSync(plan.Chains[f].Hold) {
			out = append(out, snat.Finding{Kind: snat.DriftHold, Family: f.String(), Detail: fmt.Sprintf("the hold chain %s, which drops the new connections of rules standing by, differs or its jump is not the first FORWARD rule (%s, want %s)", HoldChain, snat.Plural(len(h.Rules), "rule"), snat.Plural(len(plan.Chains[f].Hold), "rule"))})
		}
		if !st.Mangle[f].inSync(renderMangle(f, want.Entries, want.Tables[f])) {
			out = append(out, snat.Finding{Kind: snat.DriftMarks, Family: f.String(), Detail: fmt.Sprintf("the mangle chains %s and %s, which send senders out of another interface, differ (flushed, or changed by hand?)", MarkChainFwd, MarkChainOut)})
		}
	}
	return out
}

func sameEntries(installed, desired []snat.Entry, f snat.Family) bool {
	var a, b []snat.Entry
	for _, e := range installed {
		if e.Family() == f {
			a = append(a, e)
		}
	}
	for _, e := range desired {
		if e.Family() == f {
			b = append(b, e)
		}
	}
	return slices.EqualFunc(a, b, snat.Entry.Equal)
}
