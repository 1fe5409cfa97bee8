package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// check's exit statuses, for monitoring (Nagios-style checks, scripts).
const (
	checkInSync = 0
	checkDrift  = 1
	checkError  = 2
)

var checkCommand = &cli.Command{
	Name:      "check",
	Usage:     "report drift between the host and what egress-snat manages (exit 0 in sync, 1 drift, 2 error)",
	UsageText: "egress-snat check [-f FILE] [--json]",
	Description: `Compares the host with a desired-state file given by -f or, without -f, the
permanent file (--config) when it exists, and reports each kind of drift.
With neither, it can only check the rules it finds installed: a chain that a
firewall reload flushed away leaves nothing to compare, so it says so.
Kinds of drift:

   jump-missing, jump-not-first, jump-duplicated
                       POSTROUTING lost its jump (firewall reload, Docker
                       restart) or another tool inserted rules ahead of it
   chain-missing, chain-altered
                       the EGRESS-SNAT chain is gone or holds rules
                       egress-snat did not write
   set-out-of-date     a destination set is missing or its members differ
   rule-out-of-date    with a file: rules it wants added, changed, removed
   to-not-on-host      a rule's source address is no longer on the host:
                       its traffic leaves from an address the host lacks
   natural-source-changed
                       routes changed, so the rule no longer matches the
                       traffic's natural source
   redundant           the natural source now equals the rule's source
   no-route            a destination has no route any more
   chain-in-other-backend
                       the chain also exists in the other iptables backend
                       (nft vs legacy), invisible to this host's iptables

It changes nothing. "egress-snat apply -f FILE" (or "watch") repairs what
can be repaired.

EXIT STATUS: 0 in sync, 1 drift, 2 error (bad input or a failed read).`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "file", Aliases: []string{"f"}, Usage: "compare with this desired-state `FILE` (default: the permanent file, --config, when it exists; else only the installed rules)"},
		jsonFlag,
	},
	Action: func(c *cli.Context) error {
		findings, err := runCheck(c)
		if err != nil {
			return cli.Exit(err.Error(), checkError)
		}
		if c.Bool("json") {
			if err := writeJSON(c.App.Writer, struct {
				InSync   bool           `json:"in_sync"`
				Findings []snat.Finding `json:"findings"`
			}{len(findings) == 0, findings}); err != nil {
				return cli.Exit(err.Error(), checkError)
			}
		} else {
			if len(findings) == 0 {
				fmt.Fprintln(c.App.Writer, "in sync")
			}
			for _, f := range findings {
				fmt.Fprintf(c.App.Writer, "DRIFT %-24s %s %s\n", f.Kind, f.Family, f.Detail)
			}
		}
		if len(findings) > 0 {
			return quietExit(checkDrift)
		}
		return nil
	},
}

func runCheck(c *cli.Context) ([]snat.Finding, error) {
	file, err := checkFile(c)
	if err != nil {
		return nil, err
	}
	var intents []snat.Intent
	if path := file; path != "" {
		var err error
		if intents, err = loadIntents(path); err != nil {
			return nil, err
		}
	}
	e, err := hostEnv(c)
	if err != nil {
		return nil, err
	}
	st, err := e.mgr.Read()
	if err != nil {
		return nil, err
	}
	if file == "" {
		for _, en := range st.Entries() {
			if !en.Keep() {
				intents = append(intents, snat.Intent{Dst: en.Dst, To: en.To, Out: en.Out, Spread: len(en.To) > 1})
			}
		}
	}
	desired, findings, err := desiredNow(e, st, intents)
	if err != nil {
		return nil, err
	}
	findings = append(findings, snat.Diagnose(st, desired)...)
	for _, w := range otherBackendWarnings(e) {
		findings = append(findings, snat.Finding{Kind: snat.DriftOtherBackend, Detail: w})
	}
	return findings, nil
}

// desiredNow resolves intents against the host as it is now. A source that
// left the host or a destination without a route is drift, not an error:
// the installed entry for it is kept as desired so that it is reported once.
func desiredNow(e *env, st *snat.State, intents []snat.Intent) ([]snat.Entry, []snat.Finding, error) {
	installed := map[string]snat.Entry{}
	for _, en := range st.Entries() {
		installed[en.Dst.String()] = en
	}
	intents, err := snat.Dedup(intents)
	if err != nil {
		return nil, nil, err
	}
	var desired []snat.Entry
	var findings []snat.Finding
	for _, in := range intents {
		old, had := installed[in.Dst.String()]
		fam := snat.FamilyOf(in.Dst.Addr()).String()
		got, err := snat.Resolve(e.sel, []snat.Intent{in})
		switch {
		case errors.Is(err, selector.ErrNotLocal):
			findings = append(findings, snat.Finding{Kind: snat.DriftToMissing, Family: fam, Detail: fmt.Sprintf("%s: %v", in.Dst, err)})
		case errors.Is(err, selector.ErrNoRoute):
			findings = append(findings, snat.Finding{Kind: snat.DriftNoRoute, Family: fam, Detail: err.Error()})
		case err != nil:
			return nil, nil, err
		default:
			en := got[0]
			if had && old.Natural != en.Natural {
				findings = append(findings, snat.Finding{Kind: snat.DriftNaturalChanged, Family: fam,
					Detail: fmt.Sprintf("%s: the rule matches natural source %s, but the kernel now picks %s", en.Dst, old.Natural, en.Natural)})
			} else if had && len(en.To) == 1 && en.To[0] == en.Natural && !old.Keep() {
				findings = append(findings, snat.Finding{Kind: snat.DriftRedundant, Family: fam,
					Detail: fmt.Sprintf("%s: the natural source is now %s, the rule's source", en.Dst, en.Natural)})
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
	// gave one for the destination.
	wanted := map[string]bool{}
	for _, en := range desired {
		wanted[en.Dst.String()] = true
	}
	for _, en := range st.Entries() {
		if en.Keep() && !wanted[en.Dst.String()] {
			desired = append(desired, en)
		}
	}
	return desired, findings, nil
}
