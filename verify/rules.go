package verify

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/internal/who"
	"github.com/egress-snat/egress-snat/natscan"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// DefaultPort is the default destination port: traceroute's first, which
// nothing is expected to serve, so the probe datagram disturbs nobody.
const DefaultPort = 33434

// MaxFlows bounds the flows of a check of every rule (RuleProbes).
const MaxFlows = 64

// FlowCommand is the hidden command of this binary that runs a --cgroup
// flow (ServeChild), re-executed by a Verifier inside the cgroup.
const FlowCommand = "__verify-flow"

// Host is what checking the rules' flows asks of the host.
type Host struct {
	// Owners tells which interface holds an address: this host's own
	// addresses are never a forwarded probe's client.
	Owners interface {
		Owner(a netip.Addr) (iface string, err error)
	}
	// Paths tells the path packets really take, egress-snat's own routes
	// included.
	Paths interface {
		Lookup(dst netip.Prefix, out string) (*selector.Choice, error)
	}
	// Policy looks up the marked path and other tools' ip rules (see
	// Judge); nil in tests with fakes.
	Policy snat.PathLooker
	// Manager names drift of our chain, a cause of a flow that differs.
	Manager *snat.Manager
	// Conntrack is where a flow's entry is read.
	Conntrack conntrack.Table
	// ForeignNAT names another tool's NAT that may have given the flow of
	// p the source got ("" when none does): the first cause looked for.
	ForeignNAT func(p snat.Packet, got netip.Addr) (string, error)
	// OtherBackend names where egress-snat cannot read NAT rules ("the
	// other iptables backend (iptables-legacy)"), for the cause when
	// nothing it reads explains a flow.
	OtherBackend string
}

// Probe is one flow to start: its first packet and the kernel's path for
// it.
type Probe struct {
	Packet snat.Packet
	Choice *selector.Choice
}

// Verifier checks flows against one read of the rules.
type Verifier struct {
	Host  Host
	State *snat.State
	Proto uint8
	Port  uint16
}

// Check starts p's flow and compares what left with what the rules
// promise for it.
func (v Verifier) Check(p Probe) (Result, error) {
	j, err := Judge(v.Host.Policy, v.State.Entries(), p.Choice, p.Packet)
	if err != nil {
		return Result{}, err
	}
	promise := Promise{Proto: v.Proto, Dst: netip.AddrPortFrom(p.Packet.Dst, v.Port), Sources: j.Sources, Pool: j.Pool, By: j.By}
	starter, err := v.starter(p.Packet)
	if err != nil {
		return Result{}, err
	}
	return Check(starter, v.Host.Conntrack, promise, func(_, got netip.Addr) string {
		if c := j.Cause(); c != "" {
			return c
		}
		return v.cause(p.Packet, got)
	})
}

func (v Verifier) starter(p snat.Packet) (Starter, error) {
	switch {
	case p.Forwarded:
		if _, err := v.Host.Owners.Owner(p.Src); err == nil {
			return nil, snat.Invalid("--from %s is an address of this host: its traffic is not forwarded", p.Src)
		}
		return Forwarded{From: p.Src}, nil
	case p.Cgroup != "":
		return Child{Cmd: func(proto uint8, dst netip.AddrPort) (*exec.Cmd, error) {
			return flowChild(p.Cgroup, proto, dst)
		}}, nil
	case p.HasUID:
		uid := p.UID
		return Local{UID: &uid}, nil
	}
	return Local{}, nil
}

// flowChild re-executes this binary in its hidden flow mode (FlowCommand)
// inside cgroup path: a socket belongs to the cgroup of the process that
// creates it, and only a whole process can be moved into a cgroup.
func flowChild(path string, proto uint8, dst netip.AddrPort) (*exec.Cmd, error) {
	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	dir, err := who.OpenCgroup(path)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, FlowCommand, "--proto", strconv.Itoa(int(proto)), "--dst", dst.String())
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	cmd.ExtraFiles = []*os.File{dir} // open until the child starts; it inherits it as fd 3, unused
	return cmd, nil
}

// cause names the likely reason the flow for p left with got: another
// tool's NAT, then drift of our chain, else where to look.
func (v Verifier) cause(p snat.Packet, got netip.Addr) string {
	if v.Host.ForeignNAT != nil {
		c, err := v.Host.ForeignNAT(p, got)
		if err != nil {
			return "reading the other NAT rules failed: " + err.Error()
		}
		if c != "" {
			return c
		}
	}
	for _, d := range v.Host.Manager.Diagnose(v.State, v.State.Entries()) {
		switch d.Kind {
		case snat.DriftJumpMissing, snat.DriftJumpNotFirst, snat.DriftChainMissing, snat.DriftChainAltered, snat.DriftChainEmpty:
			return fmt.Sprintf("%s: %s", d.Kind, d.Detail)
		}
	}
	return fmt.Sprintf("no NAT rule egress-snat can read sends it from %s: look for NAT in %s, a policy route or an application binding that address", got, v.Host.OtherBackend)
}

// RuleProbes picks one destination of every installed entry to send to
// (see SafeTarget), sent as its sender; beyond MaxFlows, one per source
// group. skipped names the entries with no address verify may send to.
func RuleProbes(h Host, entries []snat.Entry, extra []netip.Addr) (probes []Probe, skipped []string, err error) {
	type group struct {
		sender  snat.Sender
		out, to string
	}
	seen := map[group]bool{}
	for _, en := range entries {
		if en.IsSpill() {
			continue // one destination port, which a probe does not take: its rule's probe covers it
		}
		g := group{en.Sender, en.Out, en.ToString()}
		if len(entries) > MaxFlows && seen[g] {
			continue
		}
		choice, ok, err := SafeTarget(h, en.Dst, en.Out, extra)
		if err != nil {
			return nil, nil, fmt.Errorf("rule for %s: %w", en.Match, err)
		}
		if !ok {
			if len(entries) <= MaxFlows || !seen[g] {
				skipped = append(skipped, fmt.Sprintf("%s -> %s: no address of it is a documentation address or one named by --probe", en.Match, en.ToString()))
			}
			continue
		}
		seen[g] = true
		p := snat.Packet{Dst: choice.Probe, Out: choice.Interface, Src: choice.Source}
		switch en.Sender.Kind {
		case snat.SenderFrom:
			a, ok := clientIn(h, en.Sender.From)
			if !ok {
				continue
			}
			p.Src, p.Forwarded = a, true
		case snat.SenderUID:
			p.HasUID, p.UID = true, en.Sender.UID
		case snat.SenderCgroup:
			p.Cgroup = en.Sender.Cgroup
		}
		probes = append(probes, Probe{p, choice})
		if len(probes) == MaxFlows {
			break
		}
	}
	return probes, skipped, nil
}

// SafeTarget picks the address verify sends to for destination dst, and
// looks its path up: dst itself when it is one address (a destination the
// operator named); else an address inside dst of a documentation or
// benchmarking range (nobody's), else of extra (--probe: the operator's),
// that leaves the way dst does (the interface and natural source the
// rule matches). It reports false when there is none: verify never sends
// to any other address.
func SafeTarget(h Host, dst netip.Prefix, out string, extra []netip.Addr) (*selector.Choice, bool, error) {
	lookup := func(a netip.Addr) (*selector.Choice, error) {
		c, err := h.Paths.Lookup(netip.PrefixFrom(a, a.BitLen()), out)
		if err != nil && selector.IsInput(err) {
			return nil, snat.Invalid("%s: %w", a, err)
		}
		return c, err
	}
	if dst.IsSingleIP() {
		c, err := lookup(dst.Addr())
		return c, err == nil, err
	}
	whole, err := h.Paths.Lookup(dst, out)
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
func clientIn(h Host, p netip.Prefix) (netip.Addr, bool) {
	last := natscan.PrefixRange(p).To
	a := last
	if p.Bits() < p.Addr().BitLen()-1 {
		a = a.Prev() // not the broadcast address
	}
	for range 16 {
		if !p.Contains(a) {
			break
		}
		if _, err := h.Owners.Owner(a); err != nil {
			return a, true
		}
		a = a.Prev()
	}
	return netip.Addr{}, false
}
