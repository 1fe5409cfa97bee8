package main

import (
	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/permanent"
	"github.com/egress-snat/egress-snat/snat"
)

var clearCommand = &cli.Command{
	Name:      "clear",
	Usage:     "remove everything egress-snat installed: rules, chain, jump and sets",
	UsageText: "egress-snat clear [--now] [--permanent] [--dry-run]",
	Description: `Removes the EGRESS-SNAT chain and its jump from the nat table of both
iptables and ip6tables, and every egress-snat ipset, in one transaction per
family. Nothing else is touched: iptables-save and ip6tables-save afterwards
print what they printed before egress-snat first ran. Clearing a host with
nothing of egress-snat on it changes nothing and succeeds.

Existing connections keep working, with the source they started with,
until they end: conntrack holds their NAT binding, and clear keeps what
the kernel needs to use it. Conntrack stays registered in a namespace
only while something uses it, and every SNAT rule does: removing the last
one would unregister it, and the connections' next packets would leave
untranslated (the far side resets TCP). So while connections our rules
translated live, the nat table keeps a chain EGRESS-SNAT-KEEP that no rule
jumps to: one conntrack-matching rule per address, whose comment names it.
A connection from an address of another interface (--method route,
another NIC) keeps that address's reply rule and table (7422 and up,
proto 83). The next egress-snat run after those connections end removes
what was kept for them (watch looks every 10 seconds), and from then on
iptables-save and ip rule print what they printed before egress-snat first
ran. clear says what it keeps, as list does. --now removes it at once:
those connections then break.

With iptables-nft, a nat table that only egress-snat used is deleted too
(with the nft command, when installed). With iptables-legacy, a nat table
that egress-snat caused to be loaded stays listed, empty: legacy tables
cannot be unloaded from a namespace.`,
	Flags: []cli.Flag{
		&cli.BoolFlag{Name: "now", Usage: "also remove what is kept for live connections (the keep chain, reply routes); they break"},
		permanentFlag, dryRunFlag, jsonFlag,
	},
	Action: func(c *cli.Context) error {
		e, err := envFor(c)
		if err != nil {
			return err
		}
		_, plan, err := update(c, e, func(st *snat.State) ([]snat.Entry, error) {
			if c.Bool("now") {
				st.Live = &snat.Liveness{} // as if no connection lived
			}
			return nil, nil
		}, permanent.Clear)
		if err != nil {
			return err
		}
		return reportPlan(c, e.out, plan, nil)
	},
}
