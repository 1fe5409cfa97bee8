package main

import (
	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

var applyCommand = &cli.Command{
	Name:      "apply",
	Usage:     "make the host's rules exactly those of a desired-state file",
	UsageText: "egress-snat apply -f FILE [--dry-run] [--confirm DURATION]",
	Description: `Reads a YAML file stating every rule the host should have, checks all of it
against the host, then converges in one atomic write per address family:

   rules:
     - to: 192.0.2.22
       dst: [198.51.100.0/24, 203.0.113.7]
       out: eth0                 # optional: the interface traffic leaves by
     - to: 2001:db8::23
       dst: [2001:db8:ffff::/48]
     - to: 192.0.2.23
       dst-file: partners.txt    # one address or CIDR a line, '#' comments,
                                 # relative to FILE
     - to: [192.0.2.22, 192.0.2.23]
       spread: true              # new connections round-robin over them
       dst: [203.0.113.0/24]
     - to: [192.0.2.24, 192.0.2.25]  # without spread: failover, the first
       dst: [198.18.0.0/16]          # address present on the host is used

The file is the whole truth: rules made by "set" that the file does not name
are removed, and the plan says so. Semantics are those of set: the most
specific destination wins, only traffic leaving with the natural source is
rewritten, and no rule is installed where the natural source already is the
one asked for. Many destinations of one source go into one ipset (hash:net),
so the chain stays a handful of rules however long the list.

FILE and each dst-file must be regular files (not pipes or devices), of
at most 16 MiB and 256 MiB.

Unknown keys, bad addresses, addresses not on the host, mixed families and a
destination given twice with different sources are errors naming the rule
and value; a bad file changes nothing. Applying the same file again writes
nothing. --dry-run prints the plan and the exact iptables-restore and ipset
payloads without changing anything.

--confirm 60s reverts to the previous state after 60s unless "egress-snat
confirm" runs first, even if the shell that ran apply is gone (see
"egress-snat confirm --help"). While one is pending, another apply is
refused (exit 1).`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "file", Aliases: []string{"f"}, TakesFile: true, Usage: "(required) desired-state YAML `FILE`"},
		dryRunFlag,
		confirmFlag,
		jsonFlag,
	},
	Action: func(c *cli.Context) error {
		if err := required(c, "file"); err != nil {
			return err
		}
		_, intents, err := config.LoadIntents(c.String("file"))
		if err != nil {
			return err
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		if c.IsSet("confirm") && !c.Bool("dry-run") {
			return applyConfirmed(c, e, intents, c.Duration("confirm"))
		}
		if err := refusePending(c, e); err != nil {
			return err
		}
		_, plan, err := e.mgr.Update(snat.Request{LockTimeout: e.lockTimeout, DryRun: c.Bool("dry-run"), Desired: func(*snat.State) ([]snat.Entry, error) {
			es, err := snat.Resolve(e.sel, intents)
			intents = nil // called once; a million intents are 200 MB the plan need not share
			return es, err
		}})
		if err != nil {
			return err
		}
		return reportPlan(c, e.out, plan, sourceNotes(e, plan.Desired))
	},
}
