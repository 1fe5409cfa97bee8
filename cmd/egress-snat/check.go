package main

import (
	"fmt"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
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
   chain-empty         the EGRESS-SNAT chain is there but empty (flushed
                       by hand or by a tool): egress-snat removes it and
                       its jump when it has no rules, so its rules were
                       lost; found even without a file
   set-out-of-date     a destination set is missing or its members differ
   rule-out-of-date    with a file: rules it wants added, changed, removed
   to-not-on-host      a rule's source address is no longer on the host,
                       or not usable (IPv6 tentative, optimistic or
                       dadfailed): its rule, if still installed, sends
                       traffic from an address the host cannot use (watch
                       takes it out and puts it back when the address is
                       usable again)
   natural-source-changed
                       routes changed, so the rule no longer matches the
                       traffic's natural source
   redundant           the natural source now equals the rule's source
   no-route            a destination has no route any more
   chain-in-other-backend
                       the chain also exists in the other iptables backend
                       (nft vs legacy), invisible to this host's iptables
   nat-chain-ahead     an nftables nat chain on the postrouting hook at a
                       priority before ours (iptables' nat is at 100) or
                       equal to it has a SNAT or MASQUERADE rule that may
                       take traffic a rule promises a source for: the first
                       NAT to bind a connection wins
   nat-rule-ahead      the same for a SNAT or MASQUERADE rule in POSTROUTING
                       ahead of the jump to EGRESS-SNAT
   ip-rule-ahead       another tool's ip rule, at a priority before
                       egress-snat's (7419-7423), sends a destination that
                       a route or mark of ours promises a path for
                       somewhere else (an ip rule added without pref lands
                       there; wg-quick adds its rules so); named as ip rule
                       prints it

What egress-snat keeps only for live connections after their rules went
(the EGRESS-SNAT-KEEP chain, a reply route; see clear --help) is no drift.
Nor is a spill entry (see set --spill) of a rule that spills, which watch
keeps while an address is busy: it is reported as spilling (exit 0). Nor
is a rule marked standby: whose address the peer gateway holds: it is
reported as standing by (exit 0). On a node of a gateway pair (egress-snat
ha config), it also shows the node's role and conntrackd's sync, as ha
status does, and reports its problems as drift:

   ha-split-brain      this node is master and another host answers ARP
                       for its virtual addresses: both nodes are master
   ha-unhealthy        anything else ha status names (keepalived not
                       running, the addresses held without being master,
                       the sync link down or the peer silent)

It changes nothing. "egress-snat apply -f FILE" (or "watch") repairs what
can be repaired.

EXIT STATUS: 0 in sync, 1 drift, 2 error (bad input or a failed read).`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "file", Aliases: []string{"f"}, TakesFile: true, Usage: "compare with this desired-state `FILE` (default: the permanent file, --config, when it exists; else only the installed rules)"},
		jsonFlag,
	},
	Action: func(c *cli.Context) error {
		r, err := runCheck(c)
		if err != nil {
			return cli.Exit(err.Error(), checkError)
		}
		findings := r.findings
		spills := r.spills
		if spills == nil {
			spills = []snat.Entry{}
		}
		if c.Bool("json") {
			if findings == nil {
				findings = []snat.Finding{} // [], as every list of --json, not null
			}
			if err := writeJSON(c.App.Writer, struct {
				InSync   bool            `json:"in_sync"`
				Findings []snat.Finding  `json:"findings"`
				Standby  []snat.Standing `json:"standby"`
				Spills   []snat.Entry    `json:"spills"`
				Pair     *haStatusReport `json:"pair,omitempty"`
			}{len(findings) == 0, findings, r.standby, spills, r.pair}); err != nil {
				return cli.Exit(err.Error(), checkError)
			}
		} else {
			if len(findings) == 0 {
				fmt.Fprintln(c.App.Writer, "in sync")
			}
			if r.pair != nil {
				fmt.Fprintln(c.App.Writer, pairLine(r.pair))
			}
			for _, s := range r.standby {
				fmt.Fprintln(c.App.Writer, standingLine(s))
			}
			for _, s := range spills {
				fmt.Fprintf(c.App.Writer, "spilling: %s (kept by watch while the rule's address is busy toward that port)\n", s)
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

// checkResult is what check found: the drift, and what stands by.
type checkResult struct {
	findings []snat.Finding
	standby  []snat.Standing
	// pair is the node's part of a gateway pair, nil without one.
	pair *haStatusReport
	// spills are the spill entries watch keeps (no drift).
	spills []snat.Entry
}

// standingLine says what one standing-by address means, for people.
func standingLine(s snat.Standing) string {
	if s.Here {
		return fmt.Sprintf("standing by: %s (%s) is here but not activated yet: its clients' new connections are dropped until the HA hook (or watch --activate-after) activates it", s.Address, snat.Plural(s.Rules, "rule"))
	}
	return fmt.Sprintf("standing by: %s (%s) is on the peer: its rules are installed, its clients' new connections are dropped here", s.Address, snat.Plural(s.Rules, "rule"))
}

func runCheck(c *cli.Context) (checkResult, error) {
	var none checkResult
	file, err := checkFile(c)
	if err != nil {
		return none, err
	}
	var intents []snat.Intent
	if path := file; path != "" {
		var err error
		if _, intents, err = config.LoadIntents(path); err != nil {
			return none, err
		}
	}
	e, err := envFor(c)
	if err != nil {
		return none, err
	}
	st, err := e.mgr.Read()
	if err != nil {
		return none, err
	}
	if file == "" {
		intents = snat.IntentsOf(st.Entries())
	}
	desired, findings, err := snat.DesiredNow(e.sel, st, intents)
	if err != nil {
		return none, err
	}
	// A spill that watch installed for a rule that spills is no drift.
	desired, spills := snat.KeepSpills(desired, st.Entries(), file != "")
	// What is kept for live connections is no drift: read what they hold
	// where the plan would take something from them.
	if _, err := e.mgr.Plan(st, desired); err != nil {
		return none, err
	}
	findings = append(findings, e.mgr.Diagnose(st, desired)...)
	if e.policy != nil {
		ahead, err := snat.PolicyAhead(e.policy, desired)
		if err != nil {
			return none, err
		}
		findings = append(findings, ahead...)
	}
	foreign, err := foreignNAT(e, promisesOf(desired))
	if err != nil {
		return none, err
	}
	findings = append(findings, foreignFindings(foreign)...)
	for _, w := range otherBackendWarnings(e) {
		findings = append(findings, snat.Finding{Kind: snat.DriftOtherBackend, Detail: w})
	}
	has := func(a netip.Addr) bool { _, err := e.sel.Owner(a); return err == nil }
	r := checkResult{findings: findings, standby: snat.StandingBy(desired, has), pair: pairStatus(c), spills: spills}
	if r.pair != nil {
		r.findings = append(r.findings, pairFindings(r.pair)...)
	}
	return r, nil
}
