package main

import (
	"fmt"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/snat"
)

var unsetCommand = &cli.Command{
	Name:      "unset",
	Usage:     "remove the rule of one or more destinations",
	UsageText: "egress-snat unset --dst ADDR|CIDR [--dst ...] [--permanent] [--dry-run]",
	Description: `Removes the rule for exactly each --dst (as given to set or apply; a
broader or narrower rule is not touched). New connections to it then leave
with whatever the next broader rule says, or the natural source. Unsetting a
destination that has no rule changes nothing and succeeds.

Example:
   egress-snat unset --dst 198.51.100.4`,
	Flags: []cli.Flag{
		&cli.StringSliceFlag{Name: "dst", Usage: "(required) destination `ADDR|CIDR` whose rule to remove (repeatable)"},
		permanentFlag,
		dryRunFlag,
		jsonFlag,
	},
	Action: func(c *cli.Context) error {
		if err := required(c, "dst"); err != nil {
			return err
		}
		dsts, err := parseDsts(c.StringSlice("dst"))
		if err != nil {
			return err
		}
		e, err := hostEnv(c)
		if err != nil {
			return err
		}
		drop := map[netip.Prefix]bool{}
		for _, d := range dsts {
			drop[d] = true
		}
		var missing []netip.Prefix
		_, plan, err := update(c, e, func(st *snat.State) ([]snat.Entry, error) {
			var keep []snat.Entry
			found := map[netip.Prefix]bool{}
			for _, en := range st.Entries() {
				if drop[en.Dst] {
					found[en.Dst] = true
					continue
				}
				keep = append(keep, en)
			}
			for _, d := range dsts {
				if !found[d] {
					missing = append(missing, d)
				}
			}
			return keep, nil
		}, removeDsts(dsts))
		if err != nil {
			return err
		}
		var notes []string
		for _, d := range missing {
			notes = append(notes, fmt.Sprintf("%s has no rule: nothing to remove", d))
		}
		return reportPlan(c, e.out, plan, notes)
	},
}
