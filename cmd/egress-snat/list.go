package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/snat"
)

var listCommand = &cli.Command{
	Name:      "list",
	Usage:     "show every rule egress-snat manages",
	UsageText: "egress-snat list [--json]",
	Description: `Shows each managed destination: the source new connections get, the
outgoing interface, the natural source the rule matches, whether the source
is still an address of this host (or, for a rule marked standby:, that it
stands by while the peer gateway holds it), and the ipset holding the
destination if it is in one. On a node of a gateway pair (egress-snat ha
config) the first line is the node's role and conntrackd's sync, as ha
status says them. A rule of the permanent file whose source is
already the natural one installs nothing; it is shown as "natural: no rule
needed". A spill entry that egress-snat watch installed while an address
of a rule with spill runs out of ports toward one destination port shows
that port and "spill of" the rule. Warns when the chain also exists in the other iptables backend
(iptables-nft vs iptables-legacy), where the host's iptables does not show it.`,
	Flags: []cli.Flag{jsonFlag},
	Action: func(c *cli.Context) error {
		e, err := envFor(c)
		if err != nil {
			return err
		}
		st, err := e.mgr.Read()
		if err != nil {
			return err
		}
		rows := listRows(e, st, naturalRules(c, e, st))
		warnings := otherBackendWarnings(e)
		// What is kept only for live connections, once their rules went.
		lingering, err := e.mgr.Kept(st)
		if err != nil {
			return err
		}
		if lingering == nil {
			lingering = []string{}
		}
		pair := pairStatus(c)
		if c.Bool("json") {
			return writeJSON(e.out, struct {
				Backend   string          `json:"backend"`
				Rules     []listRow       `json:"rules"`
				Lingering []string        `json:"lingering"`
				Warnings  []string        `json:"warnings"`
				Pair      *haStatusReport `json:"pair,omitempty"`
			}{e.backendName(), rows, lingering, warnings, pair})
		}
		if pair != nil {
			fmt.Fprintln(e.out, pairLine(pair))
		}
		for _, w := range warnings {
			fmt.Fprintln(c.App.ErrWriter, "warning:", w)
		}
		for _, l := range lingering {
			fmt.Fprintln(e.out, "kept for live connections:", l)
		}
		if len(rows) == 0 {
			fmt.Fprintln(e.out, "no egress-snat rules")
			return nil
		}
		tw := tabwriter.NewWriter(e.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "WHO\tDESTINATION\tSOURCE\tOUT\tNATURAL\tSOURCE ON HOST\tSET")
		for _, r := range rows {
			present := "yes"
			switch {
			case r.NoRuleNeeded:
				present = "yes, natural: no rule needed (the permanent file asks for it)"
			case r.entry.Hold && r.ToPresent:
				present = "yes, standing by: new connections dropped until activated"
			case r.entry.Hold:
				present = "no, standing by: the peer holds it, new connections dropped here"
			case !r.ToPresent:
				present = "NO: traffic leaves from an address the host lacks"
			}
			set := r.Set
			if set == "" {
				set = "-"
			}
			natural := "-"
			if r.entry.Natural.IsValid() {
				natural = r.entry.Natural.String()
			}
			dst := r.entry.Dst.String()
			if r.SpillOf != "" {
				dst = fmt.Sprintf("%s %s/%d (spill of %s)", dst, r.entry.Proto, r.entry.DPort, r.SpillOf)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.entry.Sender, dst, r.entry.ToString(), r.entry.Out, natural, present, set)
		}
		return tw.Flush()
	},
}

// listRow is one rule of list: the entry's own JSON fields (sender, dst,
// out, natural, to, and from, uid or cgroup) plus these.
type listRow struct {
	entry     snat.Entry
	Family    string `json:"family"`
	Spread    bool   `json:"spread"`
	ToPresent bool   `json:"to_present"`
	Set       string `json:"set,omitempty"`
	// NoRuleNeeded marks a rule of the permanent file whose source is
	// the natural one: nothing is installed for it.
	NoRuleNeeded bool `json:"no_rule_needed,omitempty"`
	// SpillOf names the rule a spill entry spills from (its destination,
	// and sender); "" for every other rule.
	SpillOf string `json:"spill_of,omitempty"`
}

func (r listRow) MarshalJSON() ([]byte, error) {
	e, err := json.Marshal(r.entry)
	if err != nil {
		return nil, err
	}
	type plain listRow
	extra, err := json.Marshal(plain(r))
	if err != nil {
		return nil, err
	}
	// Both are JSON objects: join their members.
	return append(append(e[:len(e)-1], ','), extra[1:]...), nil
}

func listRows(e *env, st *snat.State, natural []snat.Entry) []listRow {
	setOf := func(snat.Entry) string { return "" }
	if n, ok := st.NAT.(snat.SetNamer); ok {
		setOf = n.SetNames()
	}
	entries := st.Entries()
	rows := make([]listRow, 0, len(entries)+len(natural))
	for _, en := range entries {
		present := true
		for _, a := range en.HostSources() {
			if _, err := e.sel.Owner(a); err != nil {
				present = false
			}
		}
		row := listRow{entry: en, Family: en.Family().String(), Spread: len(en.To) > 1, ToPresent: present, Set: setOf(en)}
		if en.IsSpill() {
			row.SpillOf = "(no rule)"
			if p := snat.SpillParent(entries, en); p != nil {
				row.SpillOf = p.Match.String()
			}
		}
		rows = append(rows, row)
	}
	for _, en := range natural {
		rows = append(rows, listRow{entry: en, Family: en.Family().String(), ToPresent: true, NoRuleNeeded: true})
	}
	return rows
}

// otherBackendWarnings says when egress-snat's rules also live in a
// backend other than the one in use: rules there still act on packets but
// are invisible to operators looking where this run looks.
func otherBackendWarnings(e *env) []string {
	warnings := []string{}
	var others []iptables.Flavour
	switch {
	case e.ipt != nil:
		others = []iptables.Flavour{e.flavour.Other()}
	case e.nft != nil:
		others = []iptables.Flavour{iptables.FlavourNFT, iptables.FlavourLegacy}
	}
	for _, fl := range others {
		for _, f := range snat.Families {
			if ok, err := iptables.ChainIn(fl, f, e.lockTimeout); err == nil && ok {
				warnings = append(warnings, fmt.Sprintf("the %s chain %s also exists in the iptables-%s backend, which this run (%s) does not manage; remove it with: egress-snat --backend iptables-%s clear", f, iptables.ChainName, fl, e.backendName(), fl))
			}
		}
	}
	if e.ipt != nil && e.nl != nil {
		if c, err := nft.Open(); err == nil {
			if shape, _, err := c.ReadShape(); err == nil && shape != nil {
				warnings = append(warnings, fmt.Sprintf("the nftables table inet %s of egress-snat's nftables backend also exists, which this run (%s) does not manage; remove it with: egress-snat --backend nftables clear", nft.TableName, e.backendName()))
			}
			c.Close()
		}
	}
	return warnings
}
