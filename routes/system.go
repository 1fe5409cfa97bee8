package routes

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os/exec"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// System reads our rules and routes over netlink and writes them with
// `ip -batch`, so that what --dry-run prints is exactly what runs.
type System struct{}

// Rules returns the family's ip rules of ours, sorted: those tagged with
// our protocol. The priority alone claims nothing: another tool may add a
// rule at one of our priorities (an ip rule added without pref lands next
// to the first non-zero one), and such a rule is never read, rewritten or
// deleted as ours.
func (System) Rules(is4 bool) ([]IPRule, error) {
	fam := netlink.FAMILY_V6
	if is4 {
		fam = netlink.FAMILY_V4
	}
	rules, err := netlink.RuleList(fam)
	if err != nil {
		return nil, fmt.Errorf("listing ip rules: %w", err)
	}
	var out []IPRule
	for _, r := range rules {
		if !Ours(r.Priority) || int(r.Protocol) != Protocol {
			continue
		}
		rule := IPRule{Priority: r.Priority, Table: r.Table, SuppressPrefixLen: r.SuppressPrefixlen, Mark: r.Mark, Goto: r.Goto}
		if r.Mark != 0 {
			rule.MarkMask = 0xffffffff
			if r.Mask != nil {
				rule.MarkMask = *r.Mask
			}
		}
		if r.Goto <= 0 {
			rule.Goto = 0
		} else {
			rule.Table = 0
		}
		// netlink's RuleList does not give the rule's action; of our rules
		// only the nop has neither a table nor a goto.
		rule.Nop = rule.Goto == 0 && rule.Table == 0
		if r.Src != nil {
			if p, ok := prefixOf(r.Src); ok {
				rule.From = p
			}
		}
		out = append(out, rule)
	}
	s := State{Rules: out}
	s.sort()
	return s.Rules, nil
}

// Read returns the family's rules and routes of ours (is4 selects IPv4).
func (sys System) Read(is4 bool) (State, error) {
	fam := netlink.FAMILY_V6
	if is4 {
		fam = netlink.FAMILY_V4
	}
	var s State
	var err error
	if s.Rules, err = sys.Rules(is4); err != nil {
		return s, err
	}
	routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return s, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if !OurTable(r.Table) || int(r.Protocol) != Protocol {
			continue
		}
		rt := Route{Table: r.Table, Local: r.Type == unix.RTN_LOCAL}
		if r.Dst != nil {
			rt.Dst, _ = prefixOf(r.Dst)
		} else if is4 {
			rt.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		} else {
			rt.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		if r.Gw != nil {
			rt.Via, _ = netip.AddrFromSlice(r.Gw)
			rt.Via = rt.Via.Unmap()
		}
		if r.Src != nil {
			rt.Src, _ = netip.AddrFromSlice(r.Src)
			rt.Src = rt.Src.Unmap()
		}
		if link, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
			rt.Dev = link.Attrs().Name
		}
		s.Routes = append(s.Routes, rt)
	}
	s.sort()
	return s, nil
}

// Batch runs `ip -force -4|-6 -batch -` with input. With -force ip runs
// every line and fails at the end if any failed, so a step's undo (which
// deletes what it added, and puts back what it replaced) always finds the
// step fully run but for the failing lines.
func (System) Batch(is4 bool, input string) error {
	fam := "-6"
	if is4 {
		fam = "-4"
	}
	cmd := exec.Command("ip", "-force", fam, "-batch", "-")
	cmd.Stdin = bytes.NewBufferString(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s -batch: %v: %s", fam, err, bytes.TrimSpace(out))
	}
	return nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a, ones).Masked(), true
}
