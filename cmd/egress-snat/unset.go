package main

import (
	"fmt"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

var unsetCommand = &cli.Command{
	Name:      "unset",
	Usage:     "remove the rule of one or more destinations",
	UsageText: "egress-snat unset --dst ADDR|CIDR [--dst ...] [--from CIDR... | --uid USER | --cgroup PATH] [--permanent] [--dry-run]",
	Description: `Removes the rule for exactly each --dst of exactly the sender given (as
given to set or apply; a broader or narrower rule, or the same destination's
rule for another sender, is not touched). New connections then leave with
whatever the next rule says, or the natural source. Existing connections
keep working with the source they started with until they end (what the
kernel needs for them is kept meanwhile: see clear --help). Unsetting a
rule that does not exist changes nothing and succeeds.

With --from, --uid or --cgroup, --dst may be left out: every destination
(0.0.0.0/0 or ::/0, as set does).

Examples:
   egress-snat unset --dst 198.51.100.4
   egress-snat unset --from 172.17.0.0/16 --dst 0.0.0.0/0`,
	Flags: append([]cli.Flag{
		&cli.StringSliceFlag{Name: "dst", Usage: "destination `ADDR|CIDR` whose rule to remove (repeatable; required without --from, --uid or --cgroup)"},
		permanentFlag,
		dryRunFlag,
		jsonFlag,
	}, senderFlags()...),
	Action: func(c *cli.Context) error {
		senders, err := parseSenders(c)
		if err != nil {
			return err
		}
		if !c.IsSet("dst") && senders[0].IsHost() {
			return usageError("--dst is required (see egress-snat unset --help)")
		}
		dsts, err := parseDsts(c.StringSlice("dst"))
		if err != nil {
			return err
		}
		type who struct {
			Sender snat.Sender
			Dst    netip.Prefix
		}
		var targets []who
		for _, s := range senders {
			if len(dsts) == 0 {
				f := snat.IPv4
				if s.Kind == snat.SenderFrom && !s.From.Addr().Is4() {
					f = snat.IPv6
				}
				targets = append(targets, who{s, everythingOf(f)})
				if s.Kind != snat.SenderFrom {
					targets = append(targets, who{s, everythingOf(snat.IPv6)})
				}
			}
			for _, d := range dsts {
				targets = append(targets, who{s, d})
			}
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		drop := map[who]bool{}
		for _, t := range targets {
			drop[t] = true
		}
		var missing []who
		_, plan, err := update(c, e, func(st *snat.State) ([]snat.Entry, error) {
			// Nearly every entry is kept: growing keep entry by entry
			// was most of an unset's time beside 100,000 destinations.
			all := st.Entries()
			keep := make([]snat.Entry, 0, len(all))
			found := map[who]bool{}
			for _, en := range all {
				if k := (who{en.Sender, en.Dst}); drop[k] {
					found[k] = true
					continue
				}
				keep = append(keep, en)
			}
			for _, t := range targets {
				// Without --dst, both families are tried: one having no
				// rule is no news.
				if !found[t] && len(dsts) > 0 {
					missing = append(missing, t)
				}
			}
			if len(found) == 0 && len(dsts) == 0 {
				missing = append(missing, targets[0])
			}
			// A spill entry goes with the rule it spills from.
			out := keep[:0:0]
			for _, en := range keep {
				if !en.IsSpill() || snat.SpillParent(keep, en) != nil {
					out = append(out, en)
				}
			}
			return out, nil
		}, func(d *config.Doc) {
			for _, t := range targets {
				d.RemoveSender(t.Sender, []netip.Prefix{t.Dst})
			}
		})
		if err != nil {
			return err
		}
		var notes []string
		for _, t := range missing {
			notes = append(notes, fmt.Sprintf("%s has no rule: nothing to remove", snat.Match{Sender: t.Sender, Dst: t.Dst}))
		}
		return reportPlan(c, e.out, plan, notes)
	},
}
