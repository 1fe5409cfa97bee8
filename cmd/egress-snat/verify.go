package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/natscan"
	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/verify"
)

var verifyCommand = &cli.Command{
	Name:      "verify",
	Usage:     "start a real flow and check the source it left with against the rules (exit 0 agree, 1 differ, 2 bad input)",
	UsageText: "egress-snat verify [--dst ADDR|CIDR] [--probe ADDR]... [--from ADDR | --uid USER|UID | --cgroup PATH] [--proto udp|tcp] [--port N] [--json]",
	Description: `Rules say what should happen; the first NAT to bind a connection and the
path the kernel takes decide what does. verify starts a real flow to a
destination, reads its conntrack entry and compares the source it was
translated to with the source egress-snat's rules promise for it: the
promise of the rule the operator set for that sender and destination,
not one worked out again from the path as it is now. A foreign ip rule
ahead of ours, or a route that changed the natural source, is therefore a
difference, named as its cause.

By default the flow is one UDP datagram to port 33434: it creates a
conntrack entry whether or not anything answers. With --proto tcp the SYN
does the same, but a closed port's reset deletes the entry at once, so give
a --port that listens. Where conntrack tracks nothing in this namespace
(only routes of ours, no NAT anywhere), nothing can translate the flow, and
the source its socket got is what left.

Where it sends: verify sends only to addresses that are yours or nobody's.
That is a destination a rule names as a single address (or --dst ADDR), an
address of a documentation or benchmarking range inside the rule's
destination (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 198.18.0.0/15,
2001:db8::/32), or an address given with --probe. Nothing else, ever: a
rule for 10.0.0.0/8 is not verified until --probe names an address in it
(it is listed as not verified, and does not fail verify).

--uid and --cgroup send the flow as that user or from that cgroup (in a
child process), as a rule for them sees it. --from sends it as forwarded
traffic from ADDR: from a throwaway network namespace joined to this one by
a veth pair, which disappear when verify ends, even if it is killed. The
host must forward (net.ipv4.ip_forward=1), as it must for that traffic
anyway.

Without --dst, one destination of every managed rule is checked (at most
64 flows, one per source group beyond that).

When they differ, verify names both addresses and the likely cause: a
foreign ip rule ahead of ours, a changed natural source, a foreign nat
chain ahead of ours, a rule ahead of our jump, a missing jump.

EXIT STATUS: 0 every flow left as promised, 1 a flow differs or could not
be checked, 2 bad input.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "dst", Usage: "destination `ADDR` or prefix; without it, one destination of every rule"},
		probeFlag,
		&cli.StringFlag{Name: "from", Usage: "send as traffic forwarded from source `ADDR`"},
		&cli.StringFlag{Name: "uid", Usage: "send as `USER|UID`"},
		&cli.StringFlag{Name: "cgroup", Usage: "send from cgroup v2 `PATH`"},
		enum(&cli.StringFlag{Name: "proto", Value: "udp", Usage: "`PROTO` of the flow: udp or tcp"}, "udp", "tcp"),
		&cli.IntFlag{Name: "port", Value: verify.DefaultPort, Usage: "destination `PORT`"},
		jsonFlag,
	},
	Action: func(c *cli.Context) error {
		proto, err := parseProto(c.String("proto"))
		if err != nil {
			return err
		}
		port := c.Int("port")
		if port < 1 || port > 65535 {
			return usageError("--port %d: want 1-65535", port)
		}
		if !c.IsSet("dst") && (c.IsSet("from") || c.IsSet("uid") || c.IsSet("cgroup")) {
			return usageError("--from, --uid and --cgroup need --dst (without it, each rule is checked as its own sender)")
		}
		extra, err := parseProbes(c)
		if err != nil {
			return err
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		st, err := e.mgr.Read()
		if err != nil {
			return err
		}
		host := verifyHost(e)
		var probes []verify.Probe
		var skipped []string
		if c.IsSet("dst") {
			dst, err := parseDst(c.String("dst"))
			if err != nil {
				return err
			}
			target, ok, err := verify.SafeTarget(host, dst, "", extra)
			switch {
			case err != nil:
				return err
			case !ok:
				return usageError("--dst %s: verify sends only to an address you name or one of a documentation range, and %s holds none that takes its route: give --dst ADDR, or --probe ADDR inside it", dst, dst)
			}
			pkt, err := explainPacket(c, target)
			if err != nil {
				return err
			}
			probes = append(probes, verify.Probe{Packet: pkt, Choice: target})
		} else if probes, skipped, err = verify.RuleProbes(host, st.Entries(), extra); err != nil {
			return err
		}
		v := verify.Verifier{Host: host, State: st, Proto: proto, Port: uint16(port)}
		results := []verify.Result{} // [] in --json when there is nothing to verify
		failed := false
		for _, p := range probes {
			r, err := v.Check(p)
			if err != nil {
				var inv *snat.InvalidError
				if errors.As(err, &inv) || len(probes) == 1 {
					return err
				}
				fmt.Fprintf(c.App.ErrWriter, "egress-snat: %s to %s: %v\n", verify.SenderName(p.Packet), p.Packet.Dst, err)
				failed = true
				continue
			}
			results = append(results, r)
			failed = failed || !r.Agree
		}
		if skipped == nil {
			skipped = []string{}
		}
		if c.Bool("json") {
			if err := writeJSON(e.out, struct {
				Agree   bool            `json:"agree"`
				Results []verify.Result `json:"results"`
				// NotVerified names the rules verify had no address
				// to send to (see --probe).
				NotVerified []string `json:"not_verified"`
			}{!failed, results, skipped}); err != nil {
				return err
			}
		} else {
			if len(probes) == 0 && len(skipped) == 0 {
				fmt.Fprintln(e.out, "no rules to verify (give --dst to check one destination)")
			}
			for _, r := range results {
				fmt.Fprintln(e.out, r)
			}
			for _, s := range skipped {
				fmt.Fprintln(e.out, "not verified", s)
			}
		}
		if failed {
			return quietExit(exitFailure)
		}
		return nil
	},
}

// probeFlag is verify's and watch's --probe.
var probeFlag = &cli.StringSliceFlag{Name: "probe", Usage: "also send to `ADDR` (repeatable) for a rule whose destination holds no documentation address; nothing but a rule's own address, a documentation address or a --probe address is ever sent to"}

// parseProbes reads --probe.
func parseProbes(c *cli.Context) ([]netip.Addr, error) {
	if !c.IsSet("probe") {
		return nil, nil
	}
	return parseAddrs("probe", c.StringSlice("probe"))
}

func parseProto(s string) (uint8, error) {
	switch strings.ToLower(s) {
	case "udp":
		return conntrack.UDP, nil
	case "tcp":
		return conntrack.TCP, nil
	}
	return 0, usageError("--proto %q: want udp or tcp", s)
}

// verifyHost is what verify and watch's verify canary check flows with:
// the env's host, and this command's reading of the foreign NAT as the
// first cause of a flow that differs.
func verifyHost(e *env) verify.Host {
	return verify.Host{
		Owners:    e.sel,
		Paths:     e.paths,
		Policy:    e.policy,
		Manager:   e.mgr,
		Conntrack: conntrack.Netlink{Handle: e.nl},
		ForeignNAT: func(p snat.Packet, got netip.Addr) (string, error) {
			foreign, err := foreignNAT(e, []natscan.Traffic{packetPromise(p, p.Dst.String())})
			if err != nil {
				return "", err
			}
			if f, exact := natscan.Explains(foreign, got); f != nil {
				if exact {
					return fmt.Sprintf("%s: %s", f.Kind, f.Detail()), nil
				}
				return fmt.Sprintf("perhaps %s: %s", f.Kind, f.Detail()), nil
			}
			return "", nil
		},
		OtherBackend: otherNAT(e),
	}
}

// otherNAT names where NAT rules egress-snat cannot read may be, for
// verify's cause of a flow nothing it reads explains.
func otherNAT(e *env) string {
	if e.ipt != nil {
		return fmt.Sprintf("the other iptables backend (iptables-%s)", e.flavour.Other())
	}
	return "an iptables nat table"
}

// verifyFlowCommand is verify's child for --cgroup: it starts the flow,
// reports its tuple and holds it until its stdin closes.
var verifyFlowCommand = &cli.Command{
	Name:   verify.FlowCommand,
	Hidden: true,
	Flags: []cli.Flag{
		&cli.IntFlag{Name: "proto"},
		&cli.StringFlag{Name: "dst"},
	},
	Action: func(c *cli.Context) error {
		dst, err := netip.ParseAddrPort(c.String("dst"))
		if err != nil {
			return usageError("--dst %q: %v", c.String("dst"), err)
		}
		return verify.ServeChild(verify.Local{}, uint8(c.Int("proto")), dst, os.Stdin, os.Stdout)
	},
}
