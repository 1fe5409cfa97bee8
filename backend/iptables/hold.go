package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// The hold chain drops, for each rule standing by (snat/standby.go), its
// clients' packets that belong to no connection the kernel knows, while the
// rule's SNAT rule stays in the nat chain:
//
//	filter FORWARD  1: -m comment --comment egress-snat -j EGRESS-SNAT-HOLD
//	filter EGRESS-SNAT-HOLD
//	  -s FROM -o OUT [-d DST | -m set --match-set SET dst] -m addrtype ! --src-type LOCAL
//	    -m conntrack --ctstate INVALID,NEW -m comment --comment egress-snat -j DROP
//
// Each rule is the nat chain rule's match (its set too), so it drops
// exactly the traffic the standing-by rule would translate. In the filter
// table because dropping is what it is for (the nat table cannot drop, and
// sees neither INVALID packets nor any but a connection's first), on
// FORWARD because a standby rule is about forwarded traffic. The chain and
// its jump exist only while a rule stands by. Adding to the hold runs
// before the nat chain changes and taking from it after, so a rule is
// never active without its SNAT rule.
const (
	HoldChain   = "EGRESS-SNAT-HOLD"
	filterTable = "filter"
	holdHook    = "FORWARD"
)

// HoldInstalled is what one family's filter table holds of ours.
type HoldInstalled struct {
	TableExists, OnlyOurs bool
	Exists                bool
	Jumps                 [][]string
	// JumpFirst is true when the first FORWARD rule is a jump of ours.
	JumpFirst bool
	Rules     []Rule
	Raw       [][]string
	Foreign   []string
}

// inSync reports whether the hold chain is exactly want, with one jump,
// first: a FORWARD rule ahead of it that accepts (Docker's) would let the
// clients' new connections past the hold.
func (h HoldInstalled) inSync(want []Rule) bool {
	if len(want) == 0 {
		return !h.Exists && len(h.Jumps) == 0
	}
	return h.Exists && len(h.Jumps) == 1 && h.JumpFirst && len(h.Foreign) == 0 && slices.Equal(h.Rules, want)
}

// readHold reads what a family's filter table (nil when there is none)
// holds of ours.
func readHold(f snat.Family, filter *SavedTable) HoldInstalled {
	h := HoldInstalled{OnlyOurs: true}
	if filter == nil {
		return h
	}
	h.TableExists = true
	for _, c := range filter.Chains {
		if c.Name == HoldChain {
			h.Exists = true
		} else if !c.builtinAccept(filterTable) {
			h.OnlyOurs = false
		}
	}
	forward := 0
	for _, sr := range filter.Rules {
		if sr.Chain == holdHook {
			forward++
		}
		switch {
		case sr.Chain == HoldChain:
			h.Raw = append(h.Raw, sr.Spec)
			r, err := ParseRule(f, sr.Spec)
			if err != nil || r.Target != "DROP" {
				h.Foreign = append(h.Foreign, strings.Join(sr.Spec, " "))
				continue
			}
			h.Rules = append(h.Rules, r)
		case sr.Chain == holdHook && target(sr.Spec) == HoldChain:
			h.Jumps = append(h.Jumps, sr.Spec)
			h.JumpFirst = h.JumpFirst || forward == 1
		default:
			h.OnlyOurs = false
		}
	}
	return h
}

// holdRules are the hold chain's rules for a chain whose set names are
// final: one per held rule's match (a spread entry's rules share one).
func holdRules(c Chain) []Rule {
	var out []Rule
	for i, r := range c.Rules {
		if i >= len(c.held) || !c.held[i] || r.Target != "SNAT" {
			continue
		}
		h := r.match()
		h.Target, h.NewOrInvalid = "DROP", true
		if !slices.Contains(out, h) {
			out = append(out, h)
		}
	}
	return out
}

// held reports, for reading entries back, which (sender, destination,
// interface) the hold chain drops for; sets are the installed sets.
func (h HoldInstalled) held(f snat.Family, sets map[string]Set) map[holdKey]bool {
	out := map[holdKey]bool{}
	for _, r := range h.Rules {
		k := holdKey{r.Sender(), r.Dst, r.Out}
		switch {
		case r.Set != "":
			for _, m := range sets[r.Set].Members {
				k.dst = m
				out[k] = true
			}
			continue
		case !k.dst.IsValid():
			k.dst = everything(f)
		}
		out[k] = true
	}
	return out
}

type holdKey struct {
	sender snat.Sender
	dst    netip.Prefix
	out    string
}

// heldEntries marks the entries the hold chain drops for, in place.
func heldEntries(entries []snat.Entry, held map[holdKey]bool) []snat.Entry {
	if len(held) == 0 {
		return entries
	}
	for i := range entries {
		e := &entries[i]
		e.Hold = held[holdKey{e.Sender, e.Dst, e.Out}]
	}
	return entries
}

// holdStep writes f's hold chain when it differs from want. first says
// it must run before the nat chain is written: it holds something the
// chain had not held.
func (b *Backend) holdStep(f snat.Family, have HoldInstalled, want []Rule) (s snat.Step, first, ok bool) {
	if have.inSync(want) {
		return s, false, false
	}
	for _, r := range want {
		if !slices.Contains(have.Rules, r) {
			first = true
		}
	}
	why := fmt.Sprintf("hold %s: drop the new connections of its clients while it stands by", snat.Plural(len(want), "rule"))
	if len(want) == 0 {
		why = "remove the hold: the rules that stood by are active"
	}
	why = fmt.Sprintf("%s (%s)", why, f)
	return snat.NewStep(why, restore{b.Tables, f, holdPayload(want, have)}, restore{b.Tables, f, holdUndo(want, have)}), first, true
}

// holdPayload makes the hold chain exactly want, its jump first in
// FORWARD, or removes chain and jumps when want is empty.
func holdPayload(want []Rule, have HoldInstalled) string {
	var b strings.Builder
	b.WriteString("*" + filterTable + "\n:" + HoldChain + " - [0:0]\n")
	for _, j := range have.Jumps {
		writeRule(&b, "-D", holdHook, j)
	}
	if len(want) == 0 {
		b.WriteString("-X " + HoldChain + "\n")
	} else {
		writeRule(&b, "-I", holdHook+" 1", markJump(HoldChain))
		for _, r := range want {
			writeRule(&b, "-A", HoldChain, r.Args())
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// holdUndo puts back the hold chain as read.
func holdUndo(want []Rule, have HoldInstalled) string {
	var b strings.Builder
	b.WriteString("*" + filterTable + "\n:" + HoldChain + " - [0:0]\n")
	if len(want) > 0 {
		writeRule(&b, "-D", holdHook, markJump(HoldChain))
	}
	if !have.Exists {
		b.WriteString("-X " + HoldChain + "\n")
	} else {
		for range have.Jumps {
			writeRule(&b, "-I", holdHook+" 1", markJump(HoldChain))
		}
		for _, r := range have.Raw {
			writeRule(&b, "-A", HoldChain, r)
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}
