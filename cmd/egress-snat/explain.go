package main

import (
	"fmt"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/internal/who"
	"github.com/egress-snat/egress-snat/natscan"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/verify"
)

var explainCommand = &cli.Command{
	Name:      "explain",
	Usage:     "show the route and the source address the kernel picks for a destination, and why",
	UsageText: "egress-snat explain --dst ADDR|CIDR [--out IFACE] [--from ADDR | --uid USER|UID | --cgroup PATH] [--json]",
	Description: `Asks the kernel (the lookup behind "ip route get") which route a destination
takes and which source address it naturally chooses, and names the rule that
chose it: the route's src attribute, the primary address on the gateway's or
destination's subnet, the interface's primary address, or IPv6 source
address selection. It also shows the interface's addresses and, when an
egress-snat rule applies, the source new connections really leave with.

A prefix such as 0.0.0.0/0 means the destinations that use the route
covering it (here: the default route), not the prefix's first address.

--from ADDR explains a packet forwarded through this host from ADDR (a
container, VM or VPN client): which egress-snat rule decides its source, if
any. --uid and --cgroup explain the host's own traffic of that user or
service. Without them, the host's own traffic by destination.

Examples:
   egress-snat explain --dst 198.51.100.4
   egress-snat explain --from 172.17.0.2 --dst 198.51.100.4`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "dst", Usage: "(required) destination address or prefix"},
		&cli.StringFlag{Name: "out", Usage: "look up as if leaving by this interface"},
		&cli.StringFlag{Name: "from", Usage: "explain a packet forwarded from source `ADDR`"},
		&cli.StringFlag{Name: "uid", Usage: "explain the host's own traffic of `USER|UID`"},
		&cli.StringFlag{Name: "cgroup", Usage: "explain the host's own traffic of cgroup v2 `PATH`"},
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
		e, err := envFor(c)
		if err != nil {
			return err
		}
		choice, err := e.paths.Lookup(dst, c.String("out"))
		if err != nil {
			if selector.IsInput(err) {
				return snat.Invalid("--dst %s: %w", dst, err)
			}
			return fmt.Errorf("--dst %s: %w", dst, err)
		}
		st, err := e.mgr.Read()
		if err != nil {
			return err
		}
		pkt, err := explainPacket(c, choice)
		if err != nil {
			return err
		}
		entries := st.Entries()
		j, err := verify.Judge(e.policy, entries, choice, pkt)
		if err != nil {
			return err
		}
		managed := j.Promised
		// A pool's rule has no one effective source: the kernel picks
		// an address of the pool (effective_pool) for each connection;
		// a period's has, its address (in Sources).
		var effective netip.Addr
		var effectivePool string
		if len(j.Sources) > 0 {
			effective = j.Sources[0]
		} else if j.Pool.IsValid() {
			effectivePool = j.Pool.String()
		}
		if j.Broken != "" {
			// The promise is not kept: what the chain does instead.
			effective, effectivePool = j.Packet.Src, ""
			if now := snat.Effective(entries, j.Packet); now != nil && now.IsPool() && len(now.To) == 0 {
				effective, effectivePool = netip.Addr{}, now.Pool.String()
			} else if now != nil && !now.Keep() {
				effective = now.To[0]
			}
		}
		effectiveText := effective.String()
		if effectivePool != "" {
			effectiveText = "an address of pool " + effectivePool
		}
		foreign, err := foreignNAT(e, []natscan.Traffic{packetPromise(pkt, choice.Probe.String())})
		if err != nil {
			return err
		}
		// A rule of the permanent file that needs none: its source is
		// the natural one.
		var natural *snat.Entry
		if managed == nil {
			natural = snat.Effective(naturalRules(c, e, st), j.Packet)
		}
		spilling := spillsOf(entries, managed, j.Packet.Dst)
		if c.Bool("json") {
			return writeJSON(e.out, struct {
				*selector.Choice
				Why       string      `json:"why"`
				Sender    string      `json:"sender"`
				Managed   *snat.Entry `json:"managed,omitempty"`
				Effective netip.Addr  `json:"effective_source"`
				// EffectivePool: the kernel picks the source from
				// this pool (effective_source is then "").
				EffectivePool string `json:"effective_pool,omitempty"`
				// Broken says why the managed rule does not take this
				// traffic now (the path or natural source changed).
				Broken  string            `json:"broken,omitempty"`
				Decider string            `json:"decided_by_ip_rule,omitempty"`
				Foreign []natscan.Finding `json:"foreign_nat,omitempty"`
				// NoRuleNeeded is the permanent file's rule for this
				// traffic whose source is the natural one.
				NoRuleNeeded *snat.Entry `json:"no_rule_needed,omitempty"`
				// Spilling are watch's spill entries of the managed
				// rule for this destination: its new connections to
				// those ports leave with their addresses instead.
				Spilling []snat.Entry `json:"spilling,omitempty"`
			}{choice, choice.Reason.Describe(), verify.SenderName(pkt), managed, effective, effectivePool, j.Broken, j.Decider, foreign, natural, spilling})
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
		if j.Decider != "" {
			fmt.Fprintf(w, "decided by     ip rule %s (another tool's, ahead of egress-snat's rules)\n", j.Decider)
		}
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
		if pkt.Forwarded {
			fmt.Fprintf(w, "forwarded from %s\n", pkt.Src)
		} else if who := verify.SenderName(pkt); who != "host" {
			fmt.Fprintf(w, "sent by        %s\n", who)
		}
		if j.Packet.Out != pkt.Out {
			fmt.Fprintf(w, "marked out of  %s (egress-snat's mark sends this sender's traffic there)\n", j.Packet.Out)
		}
		switch {
		case natural != nil:
			fmt.Fprintf(w, "egress-snat    the permanent file's rule for %s asks for %s, the natural source: no rule needed, none installed\n", natural.Match, natural.ToString())
		case managed == nil && pkt.Forwarded:
			fmt.Fprintf(w, "egress-snat    no rule applies: new connections leave with %s, unless another NAT rule (Docker's, libvirt's MASQUERADE) rewrites it\n", pkt.Src)
		case managed == nil:
			fmt.Fprintf(w, "egress-snat    no rule applies: new connections leave with %s\n", choice.Source)
		case j.Broken != "":
			fmt.Fprintf(w, "egress-snat    rule for %s promises %s, but it does not take this traffic now: new connections leave with %s\n", managed.Match, managed.ToString(), effectiveText)
			fmt.Fprintf(w, "WARNING        %s\n", j.Cause())
		case managed.Keep():
			fmt.Fprintf(w, "egress-snat    rule for %s keeps the natural source %s\n", managed.Match, choice.Source)
		default:
			fmt.Fprintf(w, "egress-snat    rule for %s: new connections leave with %s\n", managed.Match, managed.ToString())
		}
		for _, s := range spilling {
			fmt.Fprintf(w, "spilling       new %s connections to port %d leave with %s instead (watch spills them: an address of the rule is short of source ports toward that port)\n", s.Proto, s.DPort, s.ToString())
		}
		for _, f := range foreign {
			fmt.Fprintf(w, "WARNING        %s\n", foreignWarning(f))
		}
		return nil
	},
}

// spillsOf are the spill entries (snat's spill.go) of rule for destination
// dst: watch's, for the ports an address of the rule is short of.
func spillsOf(entries []snat.Entry, rule *snat.Entry, dst netip.Addr) []snat.Entry {
	if rule == nil {
		return nil
	}
	var out []snat.Entry
	for _, s := range entries {
		if !s.IsSpill() || !s.Dst.Contains(dst) {
			continue
		}
		if p := snat.SpillParent(entries, s); p != nil && p.Match == rule.Match {
			out = append(out, s)
		}
	}
	return out
}

// explainPacket is the first packet of a new connection as explain's flags
// describe it.
func explainPacket(c *cli.Context, choice *selector.Choice) (snat.Packet, error) {
	p := snat.Packet{Dst: choice.Probe, Out: choice.Interface, Src: choice.Source}
	n := 0
	for _, f := range []string{"from", "uid", "cgroup"} {
		if c.IsSet(f) {
			n++
		}
	}
	if n > 1 {
		return p, usageError("--from, --uid and --cgroup describe different traffic: give one of them")
	}
	switch {
	case c.IsSet("from"):
		a, err := netip.ParseAddr(c.String("from"))
		if err != nil || a.Zone() != "" {
			return p, usageError("--from %q is not an IP address (explain takes the address of one client)", c.String("from"))
		}
		if a.Is4() != choice.Probe.Is4() {
			return p, usageError("--from %s and --dst %s are of different address families", a, choice.Dst)
		}
		p.Src, p.Forwarded = a, true
	case c.IsSet("uid"):
		uid, err := who.LookupUID(c.String("uid"))
		if err != nil {
			return p, senderError("--uid", err)
		}
		p.HasUID, p.UID = true, uid
	case c.IsSet("cgroup"):
		path, err := who.CheckCgroup(c.String("cgroup"))
		if err != nil {
			return p, senderError("--cgroup", err)
		}
		p.Cgroup = path
	}
	return p, nil
}

func tableName(t int) string {
	switch {
	case t == routes.Table:
		return fmt.Sprintf("%d (egress-snat's routes for chosen destinations)", t)
	case routes.OurTable(t):
		return fmt.Sprintf("%d (egress-snat's reply table)", t)
	}
	switch t {
	case 254:
		return "main"
	case 255:
		return "local"
	}
	return fmt.Sprint(t)
}
