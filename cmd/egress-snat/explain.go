package main

import (
	"fmt"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

var explainCommand = &cli.Command{
	Name:      "explain",
	Usage:     "show the route and the source address the kernel picks for a destination, and why",
	UsageText: "egress-snat explain --dst ADDR|CIDR [--out IFACE] [--json]",
	Description: `Asks the kernel (the lookup behind "ip route get") which route a destination
takes and which source address it naturally chooses, and names the rule that
chose it: the route's src attribute, the primary address on the gateway's or
destination's subnet, the interface's primary address, or IPv6 source
address selection. It also shows the interface's addresses and, when an
egress-snat rule applies, the source new connections really leave with.

A prefix such as 0.0.0.0/0 means the destinations that use the route
covering it (here: the default route), not the prefix's first address.

Example:
   egress-snat explain --dst 198.51.100.4`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "dst", Usage: "(required) destination address or prefix"},
		&cli.StringFlag{Name: "out", Usage: "look up as if leaving by this interface"},
		jsonFlag,
	},
	Action: func(c *cli.Context) error {
		if err := required(c, "dst"); err != nil {
			return err
		}
		dst, err := parseDst(c.String("dst"))
		if err != nil {
			return err
		}
		e, err := hostEnv(c)
		if err != nil {
			return err
		}
		choice, err := e.sel.Lookup(dst, c.String("out"))
		if err != nil {
			return snat.Invalid("--dst %s: %w", dst, err)
		}
		st, err := e.mgr.Read()
		if err != nil {
			return err
		}
		managed := snat.Effective(st.Entries(), choice.Probe, choice.Interface, choice.Source)
		if c.Bool("json") {
			return writeJSON(e.out, struct {
				*selector.Choice
				Why       string      `json:"why"`
				Managed   *snat.Entry `json:"managed,omitempty"`
				Effective netip.Addr  `json:"effective_source"`
			}{choice, choice.Reason.Describe(), managed, effectiveSource(choice, managed)})
		}
		w := e.out
		fmt.Fprintf(w, "destination    %s\n", choice.Dst)
		if !choice.Dst.IsSingleIP() {
			fmt.Fprintf(w, "looked up as   %s (an address taking the route that covers the prefix)\n", choice.Probe)
		}
		route := choice.Route.String()
		if choice.Route.Bits() == 0 {
			route = "default"
		}
		if choice.Gateway.IsValid() {
			route += " via " + choice.Gateway.String()
		}
		fmt.Fprintf(w, "route          %s dev %s table %s\n", route, choice.Interface, tableName(choice.Table))
		fmt.Fprintf(w, "natural source %s\n", choice.Source)
		fmt.Fprintf(w, "why            %s\n", choice.Reason.Describe())
		fmt.Fprintf(w, "addresses on %s:\n", choice.Interface)
		for _, a := range choice.Addresses {
			role := "secondary"
			if a.Primary {
				role = "primary"
			}
			mark := ""
			if a.Prefix.Addr() == choice.Source {
				mark = "  <- natural source"
			}
			fmt.Fprintf(w, "  %-28s %s%s\n", a.Prefix, role, mark)
		}
		switch {
		case managed == nil:
			fmt.Fprintf(w, "egress-snat    no rule applies: new connections leave with %s\n", choice.Source)
		case managed.Keep():
			fmt.Fprintf(w, "egress-snat    rule for %s keeps the natural source %s\n", managed.Dst, choice.Source)
		default:
			fmt.Fprintf(w, "egress-snat    rule for %s: new connections leave with %s\n", managed.Dst, managed.ToString())
		}
		return nil
	},
}

func effectiveSource(c *selector.Choice, managed *snat.Entry) netip.Addr {
	if managed == nil || managed.Keep() {
		return c.Source
	}
	return managed.To[0]
}

func tableName(t int) string {
	switch t {
	case 254:
		return "main"
	case 255:
		return "local"
	}
	return fmt.Sprint(t)
}
