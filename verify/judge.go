package verify

import (
	"fmt"
	"net/netip"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// Judgement is what egress-snat's rules promise for a new connection and
// whether they keep that promise on the path the kernel takes now:
// explain prints it, verify compares what left with it.
type Judgement struct {
	// Packet is the connection's first packet, Out the interface it
	// really leaves by (for a sender marked out of another interface, the
	// one its mark sends it to).
	Packet snat.Packet
	// Promised is the entry the operator set for this traffic; nil: no
	// rule of ours is about it.
	Promised *snat.Entry
	// Broken says why the promised entry's rule does not take the packet
	// now; "" when it does.
	Broken string
	// Decider is another tool's ip rule that decides the packet's path
	// ahead of ours, as `ip rule` prints it; "" when none does.
	Decider string
	// Sources are what the connection should leave with, and By says why.
	Sources []netip.Addr
	By      string
	// Pool is the promised entry's pool (snat's pool.go): any of its
	// addresses is what the connection should leave with; Sources is
	// then empty.
	Pool netip.Prefix
}

// Judge works out the judgement for pkt, whose path choice describes (the
// kernel's real lookup, egress-snat's routes included), given the
// installed entries. policy looks up the marked path and other tools' ip
// rules; nil (tests with fakes) looks up neither.
func Judge(policy snat.PathLooker, entries []snat.Entry, choice *selector.Choice, pkt snat.Packet) (Judgement, error) {
	j := Judgement{Packet: pkt, Promised: snat.Promise(entries, pkt)}
	table := choice.Table
	if j.Promised != nil && j.Promised.Marked && policy != nil {
		// The mangle chains mark this traffic and the mark routes it:
		// the path that counts is the marked lookup's.
		if mark, ok := snat.ReplyMark(entries, *j.Promised); ok {
			hop, err := policy.Route(choice.Probe, mark)
			switch {
			case selector.IsInput(err):
				j.Broken = fmt.Sprintf("the rule's mark sends it nowhere: %v", err)
			case err != nil:
				return j, err
			default:
				j.Packet.Out, table = hop.Interface, hop.Table
			}
		}
	}
	if policy != nil && !routes.OurTable(table) && table != 254 && table != 255 {
		foreign, err := policy.Foreign(choice.Probe.Is4())
		if err != nil {
			return j, err
		}
		if r, ok := routes.Decider(foreign, table, 32766); ok {
			j.Decider = r.Text
		}
	}
	switch p := j.Promised; {
	case p == nil:
		j.Sources = []netip.Addr{pkt.Src}
		j.By = "no rule applies (" + SenderName(pkt) + "), so the source " + pkt.Src.String()
		if !pkt.Forwarded {
			j.By = "no rule applies (" + SenderName(pkt) + "), so the natural source"
		}
		return j, nil
	case p.Keep():
		j.Sources = []netip.Addr{pkt.Src}
		if p.Natural.IsValid() {
			j.Sources = []netip.Addr{p.Natural}
		}
		j.By = "the rule for " + p.Match.String() + " keeps the natural source"
	default:
		j.Sources, j.Pool = p.To, p.Pool
		j.By = "the rule for " + p.Match.String()
	}
	if j.Broken == "" {
		j.Broken = j.Promised.Judge(j.Packet)
	}
	return j, nil
}

// Cause says why the promise is broken, for people, naming the foreign ip
// rule that decides the path when there is one; "" when it is kept.
func (j Judgement) Cause() string {
	if j.Broken == "" {
		return ""
	}
	if j.Decider != "" {
		return fmt.Sprintf("%s: %s, decided by ip rule %q of another tool, ahead of egress-snat's", snat.DriftIPRuleAhead, j.Broken, j.Decider)
	}
	return j.Broken
}

// SenderName names who sends p: "host", "from ADDR", "uid N", "cgroup P".
func SenderName(p snat.Packet) string {
	switch {
	case p.Forwarded:
		return "from " + p.Src.String()
	case p.HasUID:
		return snat.UID(p.UID).String()
	case p.Cgroup != "":
		return snat.Cgroup(p.Cgroup).String()
	}
	return "host"
}
