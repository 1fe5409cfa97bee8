package snat

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
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
	DriftChainEmpty     = "chain-empty"
	DriftSetOutOfDate   = "set-out-of-date"
	DriftRuleOutOfDate  = "rule-out-of-date"
	DriftToMissing      = "to-not-on-host"
	DriftRedundant      = "redundant"
	DriftNaturalChanged = "natural-source-changed"
	DriftNoRoute        = "no-route"
	DriftOtherBackend   = "chain-in-other-backend"
	DriftRoutes         = "routes-out-of-date"
	DriftMarks          = "marks-out-of-date"
	DriftHold           = "hold-out-of-date"
)

// Diagnose compares the installed state with the desired entries and names
// every difference by kind: the backend's (its chains, sets and marks),
// the routes and ip rules of ours, and each rule out of date. It changes
// nothing; MakePlan(st, desired) is the repair. What lingers for live
// connections is no difference once st.Live was read (Plan reads it where
// it matters: call it first).
func (m *Manager) Diagnose(st *State, desired []Entry) []Finding {
	desired = settlePeriods(st.Entries(), Normalize(desired), m.rng())
	plan := m.MakePlan(st, desired)
	want := Want{Entries: desired, Tables: map[Family]map[netip.Addr]int{}, Live: st.Live}
	for _, f := range Families {
		want.Tables[f] = routes.ReplyTables(plan.Paths[f])
	}
	out := m.Backend.Diagnose(st.NAT, want, plan.NAT)
	for _, f := range Families {
		b := routes.Diff(st.Routing[f], plan.Routing[f])
		if b.Add == "" && b.Del == "" {
			continue
		}
		what := strings.TrimSpace(strings.ReplaceAll(b.Add+b.Del, "\n", "; "))
		out = append(out, Finding{Kind: DriftRoutes, Family: f.String(), Detail: "egress-snat's routes or ip rules differ (deleted, flushed or changed by hand?); the repair would run: " + what})
	}
	for _, ch := range plan.Changes {
		e := ch.New
		if e == nil {
			e = ch.Old
		}
		out = append(out, Finding{Kind: DriftRuleOutOfDate, Family: e.Family().String(), Detail: "would " + ch.String()})
	}
	return out
}

// DesiredNow resolves intents against the host as it is now, for check. A
// source that left the host or a destination without a route is drift, not
// an error: the installed entry for it is kept as desired so that it is
// reported once. Rules whose natural source changed, or became redundant,
// are named too.
func DesiredNow(r Router, st *State, intents []Intent) ([]Entry, []Finding, error) {
	type who struct {
		Sender Sender
		Dst    netip.Prefix
	}
	// Indexes, not entries: a map of 100,000 entries of 260 bytes cost
	// most of a check's time in growing and hashing them.
	have := st.Entries()
	installed := make(map[who]int, len(have))
	for i, en := range have {
		installed[who{en.Sender, en.Dst}] = i
	}
	intents, err := Dedup(intents)
	if err != nil {
		return nil, nil, err
	}
	desired := make([]Entry, 0, len(intents))
	var findings []Finding
	for _, in := range intents {
		var old Entry
		i, had := installed[who{in.Sender, in.Dst.Masked()}]
		if had {
			old = have[i]
		}
		fam := FamilyOf(in.Dst.Addr()).String()
		got, err := Resolve(r, []Intent{in})
		switch {
		case errors.Is(err, selector.ErrNotLocal):
			findings = append(findings, Finding{Kind: DriftToMissing, Family: fam, Detail: fmt.Sprintf("%s: %v", describe(Match{Sender: in.Sender, Dst: in.Dst}), err)})
		case errors.Is(err, selector.ErrNoRoute):
			findings = append(findings, Finding{Kind: DriftNoRoute, Family: fam, Detail: err.Error()})
		case err != nil:
			return nil, nil, err
		default:
			en := got[0]
			if had && old.Natural != en.Natural {
				findings = append(findings, Finding{Kind: DriftNaturalChanged, Family: fam,
					Detail: fmt.Sprintf("%s: the rule matches natural source %s, but the kernel now picks %s", describe(en.Match), old.Natural, en.Natural)})
			}
			// Not "else": a route that makes the rule's own source the
			// natural one changes the natural source too, and that is
			// exactly when the rule has become redundant.
			if had && en.selfTarget() && !old.Keep() {
				findings = append(findings, Finding{Kind: DriftRedundant, Family: fam,
					Detail: fmt.Sprintf("%s: the natural source is now %s, the rule's source", describe(en.Match), en.Natural)})
			}
			desired = append(desired, en)
			continue
		}
		if had {
			desired = append(desired, old)
		}
	}
	// Keep-natural entries follow the SNAT entries they carve out of,
	// unless an intent (a file rule naming the natural source) already
	// gave one for the same match.
	if !slices.ContainsFunc(have, Entry.Keep) {
		return desired, findings, nil
	}
	wanted := map[Match]bool{}
	for _, en := range desired {
		wanted[en.Match] = true
	}
	for _, en := range have {
		if en.Keep() && !wanted[en.Match] {
			desired = append(desired, en)
		}
	}
	return desired, findings, nil
}

// IntentsOf turns installed entries back into the intents that make them,
// for checking the host against its own rules.
func IntentsOf(entries []Entry) []Intent {
	var out []Intent
	for _, en := range entries {
		if !en.Keep() && !en.IsSpill() { // a spill is watch's, kept by KeepSpills
			in := Intent{Sender: en.Sender, Dst: en.Dst, To: en.To, Out: en.Out, Spread: len(en.To) > 1, Standby: en.Hold, Pool: en.Pool, Sticky: en.Sticky, Ports: en.Ports}
			switch {
			case en.Replies || en.Marked:
				// Another interface: resolving finds it again from To.
				in.Out, in.Via = "", en.Via
			case en.Routed:
				in.Method = MethodRoute
			}
			out = append(out, in)
		}
	}
	return out
}
