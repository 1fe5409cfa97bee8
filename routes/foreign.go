package routes

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ForeignRule is an ip rule of another tool (any rule without our
// Protocol, but the kernel's three defaults): egress-snat never writes or
// deletes it, but it may decide a path before our rules do.
type ForeignRule struct {
	Priority int
	// Table is the table the rule looks up; 0 when its action is another
	// (goto, nop, blackhole, unreachable, prohibit).
	Table int
	// To is the rule's destination selector; invalid: all.
	To netip.Prefix
	// Text is the rule as `ip rule` prints it: "7418: not from all fwmark
	// 0xca6c lookup 51820".
	Text string
}

// Foreign lists the family's ip rules of other tools, in priority order
// (the kernel's order). is4 selects IPv4.
func (System) Foreign(is4 bool) ([]ForeignRule, error) {
	fam := netlink.FAMILY_V6
	if is4 {
		fam = netlink.FAMILY_V4
	}
	rules, err := netlink.RuleList(fam)
	if err != nil {
		return nil, fmt.Errorf("listing ip rules: %w", err)
	}
	var out []ForeignRule
	for _, r := range rules {
		if int(r.Protocol) == Protocol || kernelDefault(r) {
			continue
		}
		f := ForeignRule{Priority: r.Priority, Text: RuleText(r)}
		if action(r) == unix.FR_ACT_TO_TBL {
			f.Table = r.Table
		}
		if r.Dst != nil {
			f.To, _ = prefixOf(r.Dst)
		}
		out = append(out, f)
	}
	return out, nil
}

// kernelDefault reports whether r is one of the rules every namespace
// starts with: 0 lookup local, 32766 lookup main, 32767 lookup default.
func kernelDefault(r netlink.Rule) bool {
	want := map[int]int{0: unix.RT_TABLE_LOCAL, 32766: unix.RT_TABLE_MAIN, 32767: unix.RT_TABLE_DEFAULT}
	t, ok := want[r.Priority]
	return ok && r.Table == t && r.Src == nil && r.Dst == nil && r.Mark == 0 && !r.Invert &&
		r.IifName == "" && r.OifName == "" && r.SuppressPrefixlen <= 0 && action(r) == unix.FR_ACT_TO_TBL
}

// action is the rule's FR_ACT_*: netlink leaves Type 0 for a lookup.
func action(r netlink.Rule) int {
	switch {
	case r.Goto > 0:
		return unix.FR_ACT_GOTO
	case r.Type != 0:
		return int(r.Type)
	}
	return unix.FR_ACT_TO_TBL
}

// RuleText renders r the way `ip rule` prints it, so that an operator can
// find it: "7418:	not from all fwmark 0xca6c lookup 51820".
func RuleText(r netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d: ", r.Priority)
	if r.Invert {
		b.WriteString("not ")
	}
	b.WriteString("from " + ipnetText(r.Src))
	if r.Dst != nil {
		b.WriteString(" to " + ipnetText(r.Dst))
	}
	if r.Mark != 0 || r.Mask != nil {
		fmt.Fprintf(&b, " fwmark %#x", r.Mark)
		if r.Mask != nil && *r.Mask != 0xffffffff {
			fmt.Fprintf(&b, "/%#x", *r.Mask)
		}
	}
	if r.IifName != "" {
		b.WriteString(" iif " + r.IifName)
	}
	if r.OifName != "" {
		b.WriteString(" oif " + r.OifName)
	}
	if r.UIDRange != nil {
		fmt.Fprintf(&b, " uidrange %d-%d", r.UIDRange.Start, r.UIDRange.End)
	}
	if r.IPProto != 0 {
		fmt.Fprintf(&b, " ipproto %d", r.IPProto)
	}
	if r.Sport != nil {
		fmt.Fprintf(&b, " sport %d-%d", r.Sport.Start, r.Sport.End)
	}
	if r.Dport != nil {
		fmt.Fprintf(&b, " dport %d-%d", r.Dport.Start, r.Dport.End)
	}
	switch action(r) {
	case unix.FR_ACT_GOTO:
		fmt.Fprintf(&b, " goto %d", r.Goto)
	case unix.FR_ACT_NOP:
		b.WriteString(" nop")
	case unix.FR_ACT_BLACKHOLE:
		b.WriteString(" blackhole")
	case unix.FR_ACT_UNREACHABLE:
		b.WriteString(" unreachable")
	case unix.FR_ACT_PROHIBIT:
		b.WriteString(" prohibit")
	default:
		b.WriteString(" lookup " + TableText(r.Table))
	}
	if r.SuppressPrefixlen >= 0 {
		fmt.Fprintf(&b, " suppress_prefixlength %d", r.SuppressPrefixlen)
	}
	if r.Protocol != 0 {
		fmt.Fprintf(&b, " proto %d", r.Protocol)
	}
	return b.String()
}

func ipnetText(n *net.IPNet) string {
	if n == nil {
		return "all"
	}
	p, ok := prefixOf(n)
	if !ok {
		return "all"
	}
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// TableText names a routing table as ip(8) does: main, local, default or
// its number.
func TableText(t int) string {
	switch t {
	case unix.RT_TABLE_MAIN:
		return "main"
	case unix.RT_TABLE_LOCAL:
		return "local"
	case unix.RT_TABLE_DEFAULT:
		return "default"
	}
	return fmt.Sprint(t)
}

// Decider returns the first of rules (in priority order) at or before
// priority before that looks up table: the rule that most likely sent a
// lookup there, since a lookup that matched an earlier rule with a route
// for it never reached the later ones. It reports false when no such rule
// exists.
func Decider(rules []ForeignRule, table, before int) (ForeignRule, bool) {
	for _, r := range rules {
		if r.Priority > before {
			break
		}
		if r.Table == table {
			return r, true
		}
	}
	return ForeignRule{}, false
}
