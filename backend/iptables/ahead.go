package iptables

import (
	"fmt"
	"strings"

	"github.com/egress-snat/egress-snat/natscan"
	"github.com/egress-snat/egress-snat/snat"
)

// RulesAhead reads the family's tables (a whole save, as every read: with
// the legacy backend, naming the nat table would load it) and returns the
// rules of nat POSTROUTING that come before the first jump to our chain
// and can bind a source, in natscan's model: SNAT, MASQUERADE and NETMAP,
// and those inside user chains jumped to from there. With no jump, nothing
// of ours runs and the result is empty. natscan.Scan judges them.
func (b *Backend) RulesAhead(f snat.Family) ([]natscan.NATRule, error) {
	text, err := b.Tables.Save(f)
	if err != nil {
		return nil, err
	}
	return rulesAhead(f, text, ChainName)
}

// rulesAhead is RulesAhead of a save text, with the jump to chain.
func rulesAhead(f snat.Family, saveText, chain string) ([]natscan.NATRule, error) {
	s, err := ReadSave(saveText, table)
	if err != nil {
		return nil, fmt.Errorf("reading the %s %w", f, err)
	}
	nat := s.Table(table)
	if nat == nil {
		return nil, nil
	}
	rules := map[string][][]string{}
	for _, r := range nat.Rules {
		rules[r.Chain] = append(rules[r.Chain], r.Spec)
	}
	var ahead [][]string
	jumped := false
	for _, spec := range rules[hookChain] {
		if target(spec) == chain {
			jumped = true
			break
		}
		ahead = append(ahead, spec)
	}
	if !jumped {
		return nil, nil
	}
	family := int(f)
	var out []natscan.NATRule
	var walk func(specs [][]string, outer natscan.NATRule, where string, depth int)
	walk = func(specs [][]string, outer natscan.NATRule, where string, depth int) {
		unsure := outer.Unsure
		for _, spec := range specs {
			r := foreignRule(family, spec).Within(outer)
			r.Unsure = r.Unsure || unsure
			switch t := target(spec); t {
			case "SNAT", "MASQUERADE", "NETMAP":
				r.Text = "-A " + where + " " + strings.Join(spec, " ")
				if t == "NETMAP" {
					r.Action = "NETMAP"
				}
				out = append(out, r)
			case "ACCEPT", "RETURN", "DROP":
				if !conditional(spec) {
					return // nothing after it runs
				}
				unsure = true // what it matches goes no further
			case "", "LOG", "DNAT", "REDIRECT", "MARK", "CONNMARK":
			default:
				if depth < natscan.MaxJumpDepth && t != chain {
					walk(rules[t], r, t, depth+1)
				}
			}
		}
	}
	walk(ahead, natscan.NATRule{Family: family}, hookChain, 0)
	return out, nil
}

// foreignRule reads the matches of another tool's rule that narrow the
// traffic it takes. Any other match (a set, a mark, a protocol) is
// ignored, so the rule is taken to match more, never less.
func foreignRule(family int, spec []string) natscan.NATRule {
	r := natscan.NATRule{Family: family}
	neg := false
	for i := 0; i < len(spec); i++ {
		w := spec[i]
		if w == "!" {
			neg = true
			r.Unsure = true
			continue
		}
		val := ""
		if i+1 < len(spec) {
			val = spec[i+1]
		}
		switch w {
		case "-s", "-d":
			i++
			if neg {
				break
			}
			if p, err := parsePrefix(val); err == nil {
				if w == "-s" {
					r.Src = natscan.Match{natscan.PrefixRange(p)}
				} else {
					r.Dst = natscan.Match{natscan.PrefixRange(p)}
				}
			}
		case "-o":
			i++
			if !neg && !strings.HasSuffix(val, "+") {
				r.Out = val
			}
		case "-j":
			i++
			r.Action = strings.ToLower(val)
		case "-m":
			i++
			if val != "comment" {
				r.Unsure = true
			}
		case "-p", "-i":
			i++
			r.Unsure = true
		case "--to-source":
			i++
			if ts, err := parseToSource(val); err == nil {
				r.Action = "snat to " + ts.From.String()
			}
		}
		neg = false
	}
	return r
}

// conditional reports whether a rule matches on anything (beyond a
// comment), that is whether some packets pass it.
func conditional(spec []string) bool {
	for i := 0; i < len(spec); i++ {
		switch spec[i] {
		case "-j", "-g", "--comment":
			i++
		case "-m":
			if i+1 < len(spec) && spec[i+1] == "comment" {
				i++
				continue
			}
			return true
		default:
			return true
		}
	}
	return false
}
