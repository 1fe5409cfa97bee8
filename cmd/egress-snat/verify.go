package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/internal/who"
	"github.com/egress-snat/egress-snat/natscan"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/verify"
)

// verifyPort is the default destination port: traceroute's first, which
// nothing is expected to serve, so the probe datagram disturbs nobody.
const verifyPort = 33434

// maxVerifyFlows bounds the flows of a verify without --dst.
const maxVerifyFlows = 64

var verifyCommand = &cli.Command{
	Name:      "verify",
	Usage:     "start a real flow and check the source it left with against the rules (exit 0 agree, 1 differ, 2 bad input)",
	UsageText: "egress-snat verify [--dst ADDR|CIDR] [--from ADDR | --uid USER|UID | --cgroup PATH] [--proto udp|tcp] [--port N] [--json]",
	Description: `Rules say what should happen; the first NAT to bind a connection decides
what does. verify starts a real flow to the destination, reads its conntrack
entry and compares the source it was translated to with the source
egress-snat's rules promise for it (what "explain" shows).

By default the flow is one UDP datagram to port 33434: it creates a
conntrack entry whether or not anything answers. With --proto tcp the SYN
does the same, but a closed port's reset deletes the entry at once, so give
a --port that listens.

--uid and --cgroup send the flow as that user or from that cgroup (in a
child process), as a rule for them sees it. --from sends it as forwarded
traffic from ADDR: from a throwaway network namespace joined to this one by
a veth pair, which disappear when verify ends, even if it is killed. The
host must forward (net.ipv4.ip_forward=1), as it must for that traffic
anyway.

Without --dst, one destination of every managed rule is checked (an
address inside each prefix that takes the same route; at most 64 flows).

When they differ, verify names both addresses and the likely cause: a
foreign nat chain ahead of ours, a rule ahead of our jump, a missing jump.

EXIT STATUS: 0 every flow left as promised, 1 a flow differs or could not
be checked, 2 bad input.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "dst", Usage: "destination `ADDR` or prefix; without it, one destination of every rule"},
		&cli.StringFlag{Name: "from", Usage: "send as traffic forwarded from source `ADDR`"},
		&cli.StringFlag{Name: "uid", Usage: "send as `USER|UID`"},
		&cli.StringFlag{Name: "cgroup", Usage: "send from cgroup v2 `PATH`"},
		enum(&cli.StringFlag{Name: "proto", Value: "udp", Usage: "`PROTO` of the flow: udp or tcp"}, "udp", "tcp"),
		&cli.IntFlag{Name: "port", Value: verifyPort, Usage: "destination `PORT`"},
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
		e, err := envFor(c)
		if err != nil {
			return err
		}
		st, err := e.mgr.Read()
		if err != nil {
			return err
		}
		var probes []snat.Packet
		if c.IsSet("dst") {
			dst, err := parseDst(c.String("dst"))
			if err != nil {
				return err
			}
			choice, err := e.paths.Lookup(dst, "")
			if err != nil {
				if selector.IsInput(err) {
					return snat.Invalid("--dst %s: %w", dst, err)
				}
				return fmt.Errorf("--dst %s: %w", dst, err)
			}
			pkt, err := explainPacket(c, choice)
			if err != nil {
				return err
			}
			probes = append(probes, pkt)
		} else if probes, err = ruleProbes(e, st.Entries()); err != nil {
			return err
		}
		v := verifier{e: e, st: st, proto: proto, port: uint16(port)}
		results := []verify.Result{} // [] in --json when there is nothing to verify
		failed := false
		for _, p := range probes {
			r, err := v.check(p)
			if err != nil {
				var inv *snat.InvalidError
				if errors.As(err, &inv) || len(probes) == 1 {
					return err
				}
				fmt.Fprintf(c.App.ErrWriter, "egress-snat: %s to %s: %v\n", packetSender(p), p.Dst, err)
				failed = true
				continue
			}
			results = append(results, r)
			failed = failed || !r.Agree
		}
		if c.Bool("json") {
			if err := writeJSON(e.out, struct {
				Agree   bool            `json:"agree"`
				Results []verify.Result `json:"results"`
			}{!failed, results}); err != nil {
				return err
			}
		} else {
			if len(probes) == 0 {
				fmt.Fprintln(e.out, "no rules to verify (give --dst to check one destination)")
			}
			for _, r := range results {
				fmt.Fprintln(e.out, r)
			}
		}
		if failed {
			return quietExit(exitFailure)
		}
		return nil
	},
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

// verifier checks flows against one read of the rules.
type verifier struct {
	e     *env
	st    *snat.State
	proto uint8
	port  uint16
}

// check starts p's flow and compares.
func (v verifier) check(p snat.Packet) (verify.Result, error) {
	managed := snat.Effective(v.st.Entries(), p)
	promise := verify.Promise{Proto: v.proto, Dst: netip.AddrPortFrom(p.Dst, v.port)}
	switch {
	case managed == nil:
		promise.Sources = []netip.Addr{p.Src}
		promise.By = "no rule applies (" + packetSender(p) + "), so the source " + p.Src.String()
		if !p.Forwarded {
			promise.By = "no rule applies (" + packetSender(p) + "), so the natural source"
		}
	case managed.Keep():
		promise.Sources = []netip.Addr{p.Src}
		promise.By = "the rule for " + managed.Match.String() + " keeps the natural source"
	default:
		promise.Sources = managed.To
		promise.By = "the rule for " + managed.Match.String()
	}
	starter, err := v.starter(p)
	if err != nil {
		return verify.Result{}, err
	}
	return verify.Check(starter, conntrack.Netlink{Handle: v.e.nl}, promise, func(_, got netip.Addr) string {
		return v.cause(p, got)
	})
}

func (v verifier) starter(p snat.Packet) (verify.Starter, error) {
	switch {
	case p.Forwarded:
		if _, err := v.e.sel.Owner(p.Src); err == nil {
			return nil, snat.Invalid("--from %s is an address of this host: its traffic is not forwarded", p.Src)
		}
		return verify.Forwarded{From: p.Src}, nil
	case p.Cgroup != "":
		return verify.Child{Cmd: func(proto uint8, dst netip.AddrPort) (*exec.Cmd, error) {
			return flowChild(p.Cgroup, proto, dst)
		}}, nil
	case p.HasUID:
		uid := p.UID
		return verify.Local{UID: &uid}, nil
	}
	return verify.Local{}, nil
}

// flowChild re-executes this binary in its hidden flow mode inside cgroup
// path: a socket belongs to the cgroup of the process that creates it, and
// only a whole process can be moved into a cgroup.
func flowChild(path string, proto uint8, dst netip.AddrPort) (*exec.Cmd, error) {
	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	dir, err := who.OpenCgroup(path)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, verifyFlowCommand.Name, "--proto", strconv.Itoa(int(proto)), "--dst", dst.String())
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	cmd.ExtraFiles = []*os.File{dir} // open until the child starts; it inherits it as fd 3, unused
	return cmd, nil
}

// cause names the likely reason the flow for p left with got.
func (v verifier) cause(p snat.Packet, got netip.Addr) string {
	foreign, err := foreignNAT(v.e, []natscan.Traffic{packetPromise(p, p.Dst.String())})
	if err != nil {
		return "reading the other NAT rules failed: " + err.Error()
	}
	if f, exact := natscan.Explains(foreign, got); f != nil {
		if exact {
			return fmt.Sprintf("%s: %s", f.Kind, f.Detail())
		}
		return fmt.Sprintf("perhaps %s: %s", f.Kind, f.Detail())
	}
	for _, d := range snat.Diagnose(v.st, v.st.Entries()) {
		switch d.Kind {
		case snat.DriftJumpMissing, snat.DriftJumpNotFirst, snat.DriftChainMissing, snat.DriftChainAltered, snat.DriftChainEmpty:
			return fmt.Sprintf("%s: %s", d.Kind, d.Detail)
		}
	}
	return fmt.Sprintf("no NAT rule egress-snat can read sends it from %s: look for NAT in the other iptables backend (iptables-%s), a policy route or an application binding that address", got, v.e.backend.Other())
}

// ruleProbes picks one destination of every installed entry: an address
// inside its prefix that takes the route the whole prefix takes, sent as
// its sender. Beyond maxVerifyFlows, one per source group.
func ruleProbes(e *env, entries []snat.Entry) ([]snat.Packet, error) {
	type group struct {
		sender  snat.Sender
		out, to string
	}
	seen := map[group]bool{}
	var out []snat.Packet
	for _, en := range entries {
		g := group{en.Sender, en.Out, en.ToString()}
		if len(entries) > maxVerifyFlows && seen[g] {
			continue
		}
		seen[g] = true
		choice, err := e.paths.Lookup(en.Dst, en.Out)
		if err != nil {
			return nil, fmt.Errorf("rule for %s: %w", en.Match, err)
		}
		p := snat.Packet{Dst: choice.Probe, Out: choice.Interface, Src: choice.Source}
		switch en.Sender.Kind {
		case snat.SenderFrom:
			a, ok := clientIn(e, en.Sender.From)
			if !ok {
				continue
			}
			p.Src, p.Forwarded = a, true
		case snat.SenderUID:
			p.HasUID, p.UID = true, en.Sender.UID
		case snat.SenderCgroup:
			p.Cgroup = en.Sender.Cgroup
		}
		out = append(out, p)
		if len(out) == maxVerifyFlows {
			break
		}
	}
	return out, nil
}

// clientIn picks a client address inside a --from prefix: from the top of
// the prefix down, since the bottom usually holds the gateway (this host),
// skipping the broadcast address and this host's own addresses.
func clientIn(e *env, p netip.Prefix) (netip.Addr, bool) {
	last := natscan.PrefixRange(p).To
	a := last
	if p.Bits() < p.Addr().BitLen()-1 {
		a = a.Prev() // not the broadcast address
	}
	for range 16 {
		if !p.Contains(a) {
			break
		}
		if _, err := e.sel.Owner(a); err != nil {
			return a, true
		}
		a = a.Prev()
	}
	return netip.Addr{}, false
}

// verifyFlowCommand is verify's child for --cgroup: it starts the flow,
// reports its tuple and holds it until its stdin closes.
var verifyFlowCommand = &cli.Command{
	Name:   "__verify-flow",
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
