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
		var probes []probe
		var skipped []string
		if c.IsSet("dst") {
			dst, err := parseDst(c.String("dst"))
			if err != nil {
				return err
			}
			target, ok, err := safeTarget(e, dst, "", extra)
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
			probes = append(probes, probe{pkt, target})
		} else if probes, skipped, err = ruleProbes(e, st.Entries(), extra); err != nil {
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
				fmt.Fprintf(c.App.ErrWriter, "egress-snat: %s to %s: %v\n", packetSender(p.pkt), p.pkt.Dst, err)
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

// probe is one flow verify starts: its first packet and the kernel's
// path for it.
type probe struct {
	pkt    snat.Packet
	choice *selector.Choice
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

// check starts p's flow and compares what left with what the rules
// promise for it.
func (v verifier) check(p probe) (verify.Result, error) {
	j, err := judge(v.e, v.st.Entries(), p.choice, p.pkt)
	if err != nil {
		return verify.Result{}, err
	}
	promise := verify.Promise{Proto: v.proto, Dst: netip.AddrPortFrom(p.pkt.Dst, v.port), Sources: j.sources, By: j.by}
	starter, err := v.starter(p.pkt)
	if err != nil {
		return verify.Result{}, err
	}
	return verify.Check(starter, conntrack.Netlink{Handle: v.e.nl}, promise, func(_, got netip.Addr) string {
		if c := j.cause(); c != "" {
			return c
		}
		return v.cause(p.pkt, got)
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
	for _, d := range v.e.mgr.Diagnose(v.st, v.st.Entries()) {
		switch d.Kind {
		case snat.DriftJumpMissing, snat.DriftJumpNotFirst, snat.DriftChainMissing, snat.DriftChainAltered, snat.DriftChainEmpty:
			return fmt.Sprintf("%s: %s", d.Kind, d.Detail)
		}
	}
	where := "an iptables nat table"
	if v.e.ipt != nil {
		where = fmt.Sprintf("the other iptables backend (iptables-%s)", v.e.flavour.Other())
	}
	return fmt.Sprintf("no NAT rule egress-snat can read sends it from %s: look for NAT in %s, a policy route or an application binding that address", got, where)
}

// ruleProbes picks one destination of every installed entry to send to
// (see safeTarget), sent as its sender; beyond maxVerifyFlows, one per
// source group. skipped names the entries with no address verify may send
// to.
func ruleProbes(e *env, entries []snat.Entry, extra []netip.Addr) (probes []probe, skipped []string, err error) {
	type group struct {
		sender  snat.Sender
		out, to string
	}
	seen := map[group]bool{}
	for _, en := range entries {
		g := group{en.Sender, en.Out, en.ToString()}
		if len(entries) > maxVerifyFlows && seen[g] {
			continue
		}
		choice, ok, err := safeTarget(e, en.Dst, en.Out, extra)
		if err != nil {
			return nil, nil, fmt.Errorf("rule for %s: %w", en.Match, err)
		}
		if !ok {
			if len(entries) <= maxVerifyFlows || !seen[g] {
				skipped = append(skipped, fmt.Sprintf("%s -> %s: no address of it is a documentation address or one named by --probe", en.Match, en.ToString()))
			}
			continue
		}
		seen[g] = true
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
		probes = append(probes, probe{p, choice})
		if len(probes) == maxVerifyFlows {
			break
		}
	}
	return probes, skipped, nil
}

// safeTarget picks the address verify sends to for destination dst, and
// looks its path up: dst itself when it is one address (a destination the
// operator named); else an address inside dst of a documentation or
// benchmarking range (nobody's), else of extra (--probe: the operator's),
// that leaves the way dst does (the interface and natural source the
// rule matches). It reports false when there is none: verify never sends
// to any other address.
func safeTarget(e *env, dst netip.Prefix, out string, extra []netip.Addr) (*selector.Choice, bool, error) {
	lookup := func(a netip.Addr) (*selector.Choice, error) {
		c, err := e.paths.Lookup(netip.PrefixFrom(a, a.BitLen()), out)
		if err != nil && selector.IsInput(err) {
			return nil, snat.Invalid("%s: %w", a, err)
		}
		return c, err
	}
	if dst.IsSingleIP() {
		c, err := lookup(dst.Addr())
		return c, err == nil, err
	}
	whole, err := e.paths.Lookup(dst, out)
	if err != nil {
		if selector.IsInput(err) {
			return nil, false, snat.Invalid("%s: %w", dst, err)
		}
		return nil, false, err
	}
	for _, a := range safeAddrs(dst, extra) {
		c, err := lookup(a)
		if err != nil {
			continue // not routed as the rule's traffic is: try the next
		}
		if c.Interface == whole.Interface && c.Source == whole.Source && c.Table == whole.Table {
			return c, true, nil
		}
	}
	return nil, false, nil
}

// safeAddrs lists the addresses inside dst verify may send to, in the
// order it tries them: a few of each documentation range inside dst (away
// from the range's first and last address, which a network may give to
// its gateway or broadcast), then the --probe addresses inside it.
func safeAddrs(dst netip.Prefix, extra []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, d := range snat.DocPrefixes {
		if d.Addr().Is4() != dst.Addr().Is4() {
			continue
		}
		inside := d
		switch {
		case dst.Bits() <= d.Bits() && dst.Contains(d.Addr()):
		case d.Bits() <= dst.Bits() && d.Contains(dst.Addr()):
			inside = dst
		default:
			continue
		}
		a := inside.Addr()
		for range 3 {
			if a = a.Next(); !a.IsValid() || !inside.Contains(a) {
				break
			}
			out = append(out, a)
		}
	}
	for _, a := range extra {
		if dst.Contains(a) {
			out = append(out, a)
		}
	}
	return out
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
