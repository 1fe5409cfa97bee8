package natscan

import (
	"bufio"
	"fmt"
	"net/netip"
	"strings"
)

// RulesAhead reads `iptables-save -t nat` (or ip6tables-save) output and
// returns the rules of POSTROUTING that come before the first jump to
// chain and can bind a source: SNAT and MASQUERADE, and those inside
// user chains jumped to from there. With no jump to chain, nothing of ours
// runs and the result is empty.
func RulesAhead(family int, saveText, chain string) ([]Rule, error) {
	rules := map[string][][]string{}
	sc := bufio.NewScanner(strings.NewReader(saveText))
	sc.Buffer(nil, 1<<20)
	inNat := false
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "*"):
			inNat = line == "*nat"
			continue
		case !inNat || !strings.HasPrefix(line, "-A "):
			continue
		}
		w, err := words(line)
		if err != nil {
			return nil, fmt.Errorf("reading the ipv%d nat table: %w", family, err)
		}
		if len(w) < 2 {
			continue
		}
		rules[w[1]] = append(rules[w[1]], w[2:])
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	var ahead [][]string
	jumped := false
	for _, spec := range rules["POSTROUTING"] {
		if jumpTarget(spec) == chain {
			jumped = true
			break
		}
		ahead = append(ahead, spec)
	}
	if !jumped {
		return nil, nil
	}
	var out []Rule
	var walk func(specs [][]string, outer Rule, where string, depth int)
	walk = func(specs [][]string, outer Rule, where string, depth int) {
		unsure := outer.Unsure
		for _, spec := range specs {
			r := parseSpec(family, spec)
			r = inherit(r, outer)
			r.Unsure = r.Unsure || unsure
			switch t := jumpTarget(spec); t {
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
				if depth < maxJumpDepth && t != chain {
					walk(rules[t], r, t, depth+1)
				}
			}
		}
	}
	walk(ahead, Rule{Family: family}, "POSTROUTING", 0)
	return out, nil
}

// parseSpec reads the matches of one rule that narrow the traffic it takes.
// Any other match (a set, a mark, a protocol) is ignored, so the rule is
// taken to match more, never less.
func parseSpec(family int, spec []string) Rule {
	r := Rule{Family: family}
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
			if p, err := prefix(val); err == nil {
				if w == "-s" {
					r.Src = Match{PrefixRange(p)}
				} else {
					r.Dst = Match{PrefixRange(p)}
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
			if a, ok := toSourceAddr(val); ok {
				r.Action = "snat to " + a.String()
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

func prefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return p.Masked(), err
	}
	a, err := netip.ParseAddr(s)
	return netip.PrefixFrom(a, a.BitLen()), err
}

func jumpTarget(spec []string) string {
	for i := 0; i+1 < len(spec); i++ {
		if spec[i] == "-j" || spec[i] == "-g" {
			return spec[i+1]
		}
	}
	return ""
}

// words splits an iptables-save line, honouring the double quotes it puts
// around values with blanks.
func words(line string) ([]string, error) {
	var out []string
	var cur strings.Builder
	in, quoted := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case c == '"':
			quoted, in = !quoted, true
		case !quoted && (c == ' ' || c == '\t'):
			if in {
				out = append(out, cur.String())
				cur.Reset()
				in = false
			}
		default:
			cur.WriteByte(c)
			in = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("unterminated quote in %q", line)
	}
	if in {
		out = append(out, cur.String())
	}
	return out, nil
}

// toSourceAddr returns the first address of a --to-source value:
// 192.0.2.23, 192.0.2.22-192.0.2.23, 192.0.2.23:40000-40099, 2001:db8::22,
// [2001:db8::22]:40000.
func toSourceAddr(v string) (netip.Addr, bool) {
	if rest, ok := strings.CutPrefix(v, "["); ok {
		host, _, _ := strings.Cut(rest, "]")
		a, err := netip.ParseAddr(host)
		return a, err == nil
	}
	host, _, _ := strings.Cut(v, "-")
	if a, err := netip.ParseAddr(host); err == nil {
		return a, true
	}
	host, _, _ = strings.Cut(v, ":")
	a, err := netip.ParseAddr(host)
	return a, err == nil && a.Is4()
}
