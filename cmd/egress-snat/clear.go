package main

import (
	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/snat"
)

var clearCommand = &cli.Command{
	Name:      "clear",
	Usage:     "remove everything egress-snat installed: rules, chain, jump and sets",
	UsageText: "egress-snat clear [--permanent] [--dry-run]",
	Description: `Removes the EGRESS-SNAT chain and its jump from the nat table of both
iptables and ip6tables, and every egress-snat ipset, in one transaction per
family. Nothing else is touched: iptables-save and ip6tables-save afterwards
print what they printed before egress-snat first ran. Clearing a host with
nothing of egress-snat on it changes nothing and succeeds.

Existing connections keep the source they started with until they end
(conntrack holds their NAT binding).

With iptables-nft, a nat table that only egress-snat used is deleted too
(with the nft command, when installed). With iptables-legacy, a nat table
that egress-snat caused to be loaded stays listed, empty: legacy tables
cannot be unloaded from a namespace.`,
	Flags: []cli.Flag{permanentFlag, dryRunFlag, jsonFlag},
	Action: func(c *cli.Context) error {
		e, err := envFor(c)
		if err != nil {
			return err
		}
		_, plan, err := update(c, e, func(*snat.State) ([]snat.Entry, error) {
			return nil, nil
		}, clearDoc)
		if err != nil {
			return err
		}
		return reportPlan(c, e.out, plan, nil)
	},
}
