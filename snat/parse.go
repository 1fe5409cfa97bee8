package snat

import (
	"bufio"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Installed is what one family's nat table holds of ours.
type Installed struct {
	Family Family
	// TableExists is false when iptables-save printed no nat table at all.
	TableExists bool
	// ChainExists is true when the managed chain is declared.
	ChainExists bool
	// Jumps are the POSTROUTING rules jumping to the chain, as printed by
	// iptables-save without "-A POSTROUTING".
	Jumps [][]string
	// JumpFirst is true when the first POSTROUTING rule is a jump.
	JumpFirst bool
	// Entries are the managed rules read back.
	Entries []Entry
	// SetNames are the sets the chain refers to.
	SetNames []string
	// Foreign are rules in the managed chain this tool did not write (no
	// comment of ours, or a shape it does not produce): drift.
	Foreign []string
	// Rules are the chain's rule specs as read, for comparison.
	Rules [][]string
}

// InSync reports whether the installed chain is exactly c with one jump, first.
func (in Installed) InSync(c Chain) bool {
	if len(c.Rules) == 0 {
		return !in.ChainExists && len(in.Jumps) == 0
	}
	if !in.ChainExists || len(in.Jumps) != 1 || !in.JumpFirst || len(in.Foreign) > 0 {
		return false
	}
	return sameRules(in.Rules, c.Rules)
}

// sameRules compares rule specs as read back with rendered ones.
func sameRules(a, b [][]string) bool {
	return slices.EqualFunc(a, b, func(x, y []string) bool { return normalizeSpec(x) == normalizeSpec(y) })
}

// ParseSave reads `iptables-save -t nat` (or ip6tables-save) output.
// setMembers maps set names to their members, from ParseSets; entries in
// sets are expanded to one Entry per member.
func ParseSave(f Family, text string, sets map[string]Set) (Installed, error) {
	in := Installed{Family: f}
	inNat := false
	postrouting := 0
	type ruleEntry struct {
		Entry
		set string
	}
	var found []ruleEntry
	byKey := map[string]int{} // match key -> index in found
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
			continue
		case strings.HasPrefix(line, "*"):
			inNat = line == "*"+table
			if inNat {
				in.TableExists = true
			}
			continue
		case !inNat:
			continue
		case strings.HasPrefix(line, ":"+ChainName+" "):
			in.ChainExists = true
			continue
		case !strings.HasPrefix(line, "-A "):
			continue
		}
		words, err := splitWords(line)
		if err != nil {
			return in, fmt.Errorf("reading %s nat table: %w", f, err)
		}
		chain, spec := words[1], words[2:]
		switch chain {
		case hookChain:
			postrouting++
			if target(spec) == ChainName {
				in.Jumps = append(in.Jumps, spec)
				if postrouting == 1 {
					in.JumpFirst = true
				}
			}
		case ChainName:
			in.Rules = append(in.Rules, spec)
			r, ok := parseRule(f, spec)
			if !ok {
				in.Foreign = append(in.Foreign, strings.Join(spec, " "))
				continue
			}
			key := r.key()
			if i, seen := byKey[key]; seen {
				found[i].To = append(found[i].To, r.to...)
				continue
			}
			byKey[key] = len(found)
			found = append(found, ruleEntry{Entry{Dst: r.dst, Out: r.out, Natural: r.natural, To: r.to}, r.set})
		}
	}
	if err := sc.Err(); err != nil {
		return in, err
	}
	// A set rule stands for one entry per member.
	n := 0
	for _, f := range found {
		n += max(1, len(sets[f.set].Members))
	}
	in.Entries = make([]Entry, 0, n)
	for _, f := range found {
		if f.set == "" {
			in.Entries = append(in.Entries, f.Entry)
			continue
		}
		in.SetNames = append(in.SetNames, f.set)
		s, ok := sets[f.set]
		if !ok {
			in.Foreign = append(in.Foreign, "rule refers to missing set "+f.set)
			continue
		}
		for _, p := range s.Members {
			e := f.Entry
			e.Dst = p
			e.To = slices.Clone(f.To)
			in.Entries = append(in.Entries, e)
		}
	}
	SortEntries(in.Entries)
	return in, nil
}

type parsedRule struct {
	dst     netip.Prefix
	set     string
	out     string
	natural netip.Addr
	to      []netip.Addr // one, or none for RETURN
	nth     bool
}

// key identifies the rules of one entry: a spread entry has one rule per
// address, all with the same match.
func (r parsedRule) key() string {
	return fmt.Sprintf("%s|%s|%s|%s", r.dst, r.set, r.out, r.natural)
}

// parseRule reads back a rule of the shape ruleSpecs writes. Anything else,
// including a rule without our comment, is reported as not ours.
func parseRule(f Family, spec []string) (parsedRule, bool) {
	var r parsedRule
	ours := false
	tgt := ""
	for i := 0; i < len(spec); i++ {
		arg := func() string {
			if i+1 < len(spec) {
				i++
				return spec[i]
			}
			return ""
		}
		switch spec[i] {
		case "-s":
			p, err := netip.ParsePrefix(arg())
			if err != nil || !p.IsSingleIP() {
				return r, false
			}
			r.natural = p.Addr()
		case "-d":
			p, err := parsePrefix(arg())
			if err != nil {
				return r, false
			}
			r.dst = p
		case "-o":
			r.out = arg()
		case "-m":
			switch arg() {
			case "comment", "set", "statistic":
			default:
				return r, false
			}
		case "--comment":
			ours = arg() == Comment
		case "--match-set":
			r.set = arg()
			if arg() != "dst" {
				return r, false
			}
		case "--mode":
			if arg() != "nth" {
				return r, false
			}
			r.nth = true
		case "--every", "--packet":
			arg()
		case "-j":
			tgt = arg()
		case "--to-source":
			a, err := netip.ParseAddr(strings.Trim(arg(), "[]"))
			if err != nil {
				return r, false
			}
			r.to = []netip.Addr{a}
		default:
			return r, false
		}
	}
	if !ours || !r.natural.IsValid() || r.out == "" || FamilyOf(r.natural) != f || r.dst.IsValid() && FamilyOf(r.dst.Addr()) != f {
		return r, false
	}
	switch {
	case tgt == "RETURN" && len(r.to) == 0:
	case tgt == "SNAT" && len(r.to) == 1:
	default:
		return r, false
	}
	if r.set == "" && !r.dst.IsValid() {
		if f == IPv4 {
			r.dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		} else {
			r.dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
	}
	return r, true
}

func target(spec []string) string {
	for i := 0; i+1 < len(spec); i++ {
		if spec[i] == "-j" || spec[i] == "-g" {
			return spec[i+1]
		}
	}
	return ""
}

// parsePrefix accepts a prefix or a bare address (a host).
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, err
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// normalizeSpec makes a rendered spec comparable with what iptables-save
// prints: same words, quotes removed, host prefixes with their length.
func normalizeSpec(spec []string) string {
	out := make([]string, 0, len(spec))
	for i := 0; i < len(spec); i++ {
		w := spec[i]
		if (w == "-s" || w == "-d") && i+1 < len(spec) {
			if p, err := parsePrefix(spec[i+1]); err == nil {
				out = append(out, w, p.String())
				i++
				continue
			}
		}
		out = append(out, w)
	}
	return canonicalOrder(out)
}

// canonicalOrder sorts option groups so that rendering order and
// iptables-save order compare equal. Each group is an option word starting
// with '-' followed by its values; "-m" starts a module group that includes
// the module's own options.
func canonicalOrder(words []string) string {
	var groups []string
	var cur []string
	flush := func() {
		if len(cur) > 0 {
			groups = append(groups, strings.Join(cur, " "))
			cur = nil
		}
	}
	for _, w := range words {
		if w == "-s" || w == "-d" || w == "-o" || w == "-i" || w == "-m" || w == "-j" || w == "-p" {
			flush()
		}
		cur = append(cur, w)
	}
	flush()
	slices.Sort(groups)
	return strings.Join(groups, " ")
}

// splitWords splits an iptables-save line into words, honouring the double
// quotes iptables-save puts around comments with blanks.
func splitWords(line string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord, inQuote := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case inQuote && c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case c == '"':
			inQuote = !inQuote
			inWord = true
		case !inQuote && (c == ' ' || c == '\t'):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inQuote {
		return nil, fmt.Errorf("unterminated quote in %q", line)
	}
	if inWord {
		words = append(words, cur.String())
	}
	if len(words) < 2 {
		return nil, fmt.Errorf("short rule %q", line)
	}
	return words, nil
}

// ParseSets reads `ipset save` output and returns this tool's sets by name.
// It is on the path of every run, with one line per destination, so it
// avoids splitting lines it does not need.
func ParseSets(text string) (map[string]Set, error) {
	sets := map[string]Set{}
	for len(text) > 0 {
		line, rest, _ := strings.Cut(text, "\n")
		text = rest
		op, args, _ := strings.Cut(line, " ")
		name, args, _ := strings.Cut(args, " ")
		if !strings.HasPrefix(name, SetPrefix) {
			continue
		}
		switch op {
		case "create":
			fam := IPv4
			if strings.Contains(args, "family inet6") {
				fam = IPv6
			}
			sets[name] = Set{Name: name, Family: fam}
		case "add":
			member, opts, _ := strings.Cut(args, " ")
			p, err := parsePrefix(member)
			if err != nil {
				return nil, fmt.Errorf("set %s member %q: %w", name, member, err)
			}
			s := sets[name]
			if strings.Contains(opts, "nomatch") {
				s.NoMatch = append(s.NoMatch, p)
			} else {
				s.Members = append(s.Members, p)
			}
			sets[name] = s
		}
	}
	for n, s := range sets {
		if !slices.IsSortedFunc(s.Members, comparePrefix) {
			slices.SortFunc(s.Members, comparePrefix)
		}
		slices.SortFunc(s.NoMatch, comparePrefix)
		sets[n] = s
	}
	return sets, nil
}
