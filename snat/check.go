package snat

import (
	"fmt"
	"slices"
)

// Finding is one way the host differs from what it should be.
type Finding struct {
	Kind   string `json:"kind"`
	Family string `json:"family,omitempty"`
	Detail string `json:"detail"`
}

// Kinds of drift, stable for scripts.
const (
	DriftJumpMissing    = "jump-missing"
	DriftJumpNotFirst   = "jump-not-first"
	DriftJumpDuplicated = "jump-duplicated"
	DriftChainMissing   = "chain-missing"
	DriftChainAltered   = "chain-altered"
	DriftSetOutOfDate   = "set-out-of-date"
	DriftRuleOutOfDate  = "rule-out-of-date"
	DriftToMissing      = "to-not-on-host"
	DriftRedundant      = "redundant"
	DriftNaturalChanged = "natural-source-changed"
	DriftNoRoute        = "no-route"
	DriftOtherBackend   = "chain-in-other-backend"
)

// Diagnose compares the installed state with the desired entries and names
// every difference by kind. It is pure; MakePlan(st, desired) is the repair.
func Diagnose(st *State, desired []Entry) []Finding {
	desired = Normalize(desired)
	var out []Finding
	for _, f := range Families {
		in := st.Installed[f]
		c := Render(f, desired)
		add := func(kind, format string, args ...any) {
			out = append(out, Finding{Kind: kind, Family: f.String(), Detail: fmt.Sprintf(format, args...)})
		}
		if len(c.Rules) > 0 || in.ChainExists {
			switch {
			case len(in.Jumps) == 0:
				add(DriftJumpMissing, "POSTROUTING has no jump to %s (flushed by a firewall reload?)", ChainName)
			case !in.JumpFirst:
				add(DriftJumpNotFirst, "the jump to %s is not the first POSTROUTING rule: rules inserted ahead of it win", ChainName)
			}
			if len(in.Jumps) > 1 {
				add(DriftJumpDuplicated, "POSTROUTING jumps to %s %d times", ChainName, len(in.Jumps))
			}
		}
		if len(c.Rules) > 0 && !in.ChainExists {
			add(DriftChainMissing, "the %s chain is missing", ChainName)
		}
		for _, r := range in.Foreign {
			add(DriftChainAltered, "rule not written by egress-snat in %s: %s", ChainName, r)
		}
		for _, s := range c.Sets {
			have, ok := st.Sets[s.Name]
			switch {
			case !ok:
				add(DriftSetOutOfDate, "set %s is missing", s.Name)
			case !sameMembers(have, s):
				add(DriftSetOutOfDate, "set %s holds %d destinations and %d exceptions, want %d and %d", s.Name, len(have.Members), len(have.NoMatch), len(s.Members), len(s.NoMatch))
			}
		}
		if in.ChainExists && len(in.Foreign) == 0 && !sameRules(in.Rules, c.Rules) && sameEntries(in.Entries, desired, f) {
			add(DriftChainAltered, "the rules of %s are not in the order or shape egress-snat writes", ChainName)
		}
	}
	for _, ch := range MakePlan(st, desired).Changes {
		e := ch.New
		if e == nil {
			e = ch.Old
		}
		out = append(out, Finding{Kind: DriftRuleOutOfDate, Family: e.Family().String(), Detail: "would " + ch.String()})
	}
	return out
}

func sameEntries(installed, desired []Entry, f Family) bool {
	var a, b []Entry
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
	return slices.EqualFunc(a, b, Entry.Equal)
}
