package main

import (
	"fmt"
	"net/netip"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// judgement is what egress-snat's rules promise for a new connection and
// whether they keep that promise on the path the kernel takes now: explain
// prints it, verify compares what left with it.
type judgement struct {
	// pkt is the connection's first packet, Out the interface it really
	// leaves by (for a sender marked out of another interface, the one
	// its mark sends it to).
	pkt snat.Packet
	// promised is the entry the operator set for this traffic; nil: no
	// rule of ours is about it.
	promised *snat.Entry
	// broken says why the promised entry's rule does not take the packet
	// now; "" when it does.
	broken string
	// decider is another tool's ip rule that decides the packet's path
	// ahead of ours, as `ip rule` prints it; "" when none does.
	decider string
	// sources are what the connection should leave with, and by says why.
	sources []netip.Addr
	by      string
}

// judge works out the judgement for pkt, whose path choice describes (the
// kernel's real lookup, egress-snat's routes included).
func judge(e *env, entries []snat.Entry, choice *selector.Choice, pkt snat.Packet) (judgement, error) {
	j := judgement{pkt: pkt, promised: snat.Promise(entries, pkt)}
	table := choice.Table
	if j.promised != nil && j.promised.Marked && e.policy != nil {
		// The mangle chains mark this traffic and the mark routes it:
		// the path that counts is the marked lookup's.
		if mark, ok := snat.ReplyMark(entries, *j.promised); ok {
			hop, err := e.policy.Route(choice.Probe, mark)
			switch {
			case selector.IsInput(err):
				j.broken = fmt.Sprintf("the rule's mark sends it nowhere: %v", err)
			case err != nil:
				return j, err
			default:
				j.pkt.Out, table = hop.Interface, hop.Table
			}
		}
	}
	if e.policy != nil && !routes.OurTable(table) && table != 254 && table != 255 {
		foreign, err := e.policy.Foreign(choice.Probe.Is4())
		if err != nil {
			return j, err
		}
		if r, ok := routes.Decider(foreign, table, 32766); ok {
			j.decider = r.Text
		}
	}
	switch p := j.promised; {
	case p == nil:
		j.sources = []netip.Addr{pkt.Src}
		j.by = "no rule applies (" + packetSender(pkt) + "), so the source " + pkt.Src.String()
		if !pkt.Forwarded {
			j.by = "no rule applies (" + packetSender(pkt) + "), so the natural source"
		}
		return j, nil
	case p.Keep():
		j.sources = []netip.Addr{pkt.Src}
		if p.Natural.IsValid() {
			j.sources = []netip.Addr{p.Natural}
		}
		j.by = "the rule for " + p.Match.String() + " keeps the natural source"
	default:
		j.sources = p.To
		j.by = "the rule for " + p.Match.String()
	}
	if j.broken == "" {
		j.broken = j.promised.Judge(j.pkt)
	}
	return j, nil
}

// cause says why the promise is broken, for people, naming the foreign ip
// rule that decides the path when there is one; "" when it is kept.
func (j judgement) cause() string {
	if j.broken == "" {
		return ""
	}
	if j.decider != "" {
		return fmt.Sprintf("%s: %s, decided by ip rule %q of another tool, ahead of egress-snat's", snat.DriftIPRuleAhead, j.broken, j.decider)
	}
	return j.broken
}
