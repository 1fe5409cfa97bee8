package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// The mangle chains send a sender's traffic (--from, --uid, --cgroup) out
// of another interface than its destination's route: a mark that an ip
// rule of ours (routes.MarkOf) sends to the source address's reply table.
// The nat chain's SNAT rule for that interface then gives it the address.
//
//	mangle PREROUTING  1: -m comment --comment egress-snat -j EGRESS-SNAT-FWD  (forwarded: --from)
//	mangle OUTPUT      1: -m comment --comment egress-snat -j EGRESS-SNAT-OUT  (local: --uid, --cgroup)
//
// EGRESS-SNAT-OUT starts with CONNMARK --restore-mark and ends with
// --save-mark, so the packets of a marked local connection that carry no
// socket of its owner still take its interface.
//
// In each chain, in the nat chain's precedence order, a marked entry is a
// MARK rule that only marks what no rule marked before, and a more
// specific entry of the same traffic that stays on its interface is a
// RETURN rule ahead of it. OUTPUT, because marking a local packet there
// makes the kernel route it again; PREROUTING, because forwarded packets
// are routed after it. The chain names, like the nat chain's, never change.
const (
	MarkChainFwd = "EGRESS-SNAT-FWD"
	MarkChainOut = "EGRESS-SNAT-OUT"
	mangleTable  = "mangle"
)

var markHooks = map[string]string{MarkChainFwd: "PREROUTING", MarkChainOut: "OUTPUT"}

// MangleInstalled is what one family's mangle table holds of ours.
type MangleInstalled struct {
	TableExists, OnlyOurs bool
	Exists                map[string]bool
	Jumps                 map[string][][]string // by our chain
	JumpFirst             map[string]bool
	Rules                 map[string][]Rule
	Raw                   map[string][][]string
	Foreign               []string
}

func (m MangleInstalled) any() bool {
	for _, c := range []string{MarkChainFwd, MarkChainOut} {
		if m.Exists[c] || len(m.Jumps[c]) > 0 {
			return true
		}
	}
	return false
}

// inSync reports whether the mangle chains are exactly want, jumps first.
func (m MangleInstalled) inSync(want map[string][]Rule) bool {
	if len(want[MarkChainFwd])+len(want[MarkChainOut]) == 0 {
		return !m.any()
	}
	if len(m.Foreign) > 0 {
		return false
	}
	for _, c := range []string{MarkChainFwd, MarkChainOut} {
		if !m.Exists[c] || len(m.Jumps[c]) != 1 || !m.JumpFirst[c] || !slices.Equal(m.Rules[c], want[c]) {
			return false
		}
	}
	return true
}

// parseMangle reads the mangle table of an iptables-save text.
func parseMangle(f snat.Family, text string) (MangleInstalled, error) {
	s, err := ReadSave(text, mangleTable)
	if err != nil {
		return readMangle(f, nil), fmt.Errorf("reading %s %w", f, err)
	}
	return readMangle(f, s.Table(mangleTable)), nil
}

// readMangle reads what a family's mangle table (nil when there is none)
// holds of ours.
func readMangle(f snat.Family, mangle *SavedTable) MangleInstalled {
	m := MangleInstalled{OnlyOurs: true, Exists: map[string]bool{}, Jumps: map[string][][]string{},
		JumpFirst: map[string]bool{}, Rules: map[string][]Rule{}, Raw: map[string][][]string{}}
	if mangle == nil {
		return m
	}
	m.TableExists = true
	for _, c := range mangle.Chains {
		if _, ours := markHooks[c.Name]; ours {
			m.Exists[c.Name] = true
		} else if !c.builtinAccept(mangleTable) {
			m.OnlyOurs = false
		}
	}
	count := map[string]int{}
	for _, sr := range mangle.Rules {
		chain, spec := sr.Chain, sr.Spec
		if _, ours := markHooks[chain]; ours {
			m.Raw[chain] = append(m.Raw[chain], spec)
			r, err := ParseRule(f, spec)
			if err != nil || r.Target == "SNAT" {
				m.Foreign = append(m.Foreign, strings.Join(spec, " "))
				continue
			}
			m.Rules[chain] = append(m.Rules[chain], r)
			continue
		}
		count[chain]++
		t := target(spec)
		if _, ours := markHooks[t]; ours && markHooks[t] == chain {
			m.Jumps[t] = append(m.Jumps[t], spec)
			if count[chain] == 1 {
				m.JumpFirst[t] = true
			}
			continue
		}
		m.OnlyOurs = false
	}
	return m
}

// markMatch is the mangle rule matching an entry's traffic, without -o:
// the route, and so the interface, is what the mark decides.
func markMatch(e snat.Entry) Rule {
	r := rulesFor(snat.Entry{Match: e.Match, Natural: e.Natural}, "")[0]
	r.Out, r.Target = "", ""
	return r
}

// renderMangle renders the mangle chains of one family's normalized entries
// (sorted in chain order). tables numbers the reply tables.
func renderMangle(f snat.Family, entries []snat.Entry, tables map[netip.Addr]int) map[string][]Rule {
	out := map[string][]Rule{}
	mine := snat.OfFamily(entries, f)
	var marked []snat.Entry
	for _, e := range mine {
		if e.Marked {
			marked = append(marked, e)
		}
	}
	if len(marked) == 0 {
		return out
	}
	for _, e := range mine {
		if e.Sender.IsHost() || e.Routed {
			continue
		}
		chain := MarkChainOut
		if !e.Sender.Local() {
			chain = MarkChainFwd
		}
		r := markMatch(e)
		if e.Marked {
			t, ok := tables[e.To[0]]
			if !ok {
				continue
			}
			r.Target, r.SetMark, r.Unmarked = "MARK", routes.MarkOf(t), true
			out[chain] = append(out[chain], r)
			continue
		}
		// An entry that stays on its interface but comes first must keep
		// the marked ones behind it from taking its traffic.
		if slices.ContainsFunc(marked, func(o snat.Entry) bool {
			return snat.CompareEntries(o, e) > 0 && o.Dst.Overlaps(e.Dst) && (o.Sender.Contains(e.Sender) || e.Sender.Contains(o.Sender))
		}) {
			r.Target = "RETURN"
			out[chain] = append(out[chain], r)
		}
	}
	if rs := out[MarkChainOut]; slices.ContainsFunc(rs, func(r Rule) bool { return r.Target == "MARK" }) {
		// A local connection's packets that the kernel sends without its
		// socket (the last ACK after close) match no owner or cgroup: they
		// get the connection's mark back from conntrack.
		out[MarkChainOut] = append(append([]Rule{{Target: "CONNMARK", Connmark: "restore-mark"}}, rs...),
			Rule{Target: "CONNMARK", Connmark: "save-mark"})
	}
	return out
}

// manglePayload makes the mangle chains exactly want (or removes them and
// their jumps when want is empty), in one iptables-restore transaction.
func manglePayload(want map[string][]Rule, have MangleInstalled) string {
	var b strings.Builder
	b.WriteString("*" + mangleTable + "\n")
	empty := len(want[MarkChainFwd])+len(want[MarkChainOut]) == 0
	for _, c := range []string{MarkChainFwd, MarkChainOut} {
		b.WriteString(":" + c + " - [0:0]\n")
		for _, j := range have.Jumps[c] {
			writeRule(&b, "-D", markHooks[c], j)
		}
		if empty {
			b.WriteString("-X " + c + "\n")
			continue
		}
		writeRule(&b, "-I", markHooks[c]+" 1", markJump(c))
		for _, r := range want[c] {
			writeRule(&b, "-A", c, r.Args())
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// mangleUndo puts back the mangle chains as read.
func mangleUndo(want map[string][]Rule, have MangleInstalled) string {
	var b strings.Builder
	b.WriteString("*" + mangleTable + "\n")
	for _, c := range []string{MarkChainFwd, MarkChainOut} {
		b.WriteString(":" + c + " - [0:0]\n")
		if len(want[MarkChainFwd])+len(want[MarkChainOut]) > 0 {
			writeRule(&b, "-D", markHooks[c], markJump(c))
		}
		if !have.Exists[c] {
			b.WriteString("-X " + c + "\n")
			continue
		}
		for range have.Jumps[c] {
			writeRule(&b, "-I", markHooks[c]+" 1", markJump(c))
		}
		for _, r := range have.Raw[c] {
			writeRule(&b, "-A", c, r)
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

func markJump(chain string) []string {
	return []string{"-m", "comment", "--comment", Comment, "-j", chain}
}

// markedMatches is the set of matches the mangle chains mark, for reading
// entries back.
func (m MangleInstalled) marks() map[Rule]uint32 {
	out := map[Rule]uint32{}
	for _, c := range []string{MarkChainFwd, MarkChainOut} {
		for _, r := range m.Rules[c] {
			if r.Target == "MARK" {
				k := r
				k.Target, k.SetMark, k.Unmarked = "", 0, false
				out[k] = r.SetMark
			}
		}
	}
	return out
}
