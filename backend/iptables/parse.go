package iptables

import (
	"bufio"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// Installed is what one family's nat table holds of ours.
type Installed struct {
	Family snat.Family
	// TableExists is false when iptables-save printed no nat table at all.
	TableExists bool
	// OnlyOurs is true when the nat table holds nothing but our chain and
	// jump (and the built-in chains, empty, policy ACCEPT): clearing our
	// rules leaves it empty.
	OnlyOurs bool
	// ChainExists is true when the managed chain is declared.
	ChainExists bool
	// Jumps are the POSTROUTING rules jumping to the chain, as printed by
	// iptables-save without "-A POSTROUTING".
	Jumps [][]string
	// JumpFirst is true when the first POSTROUTING rule is a jump.
	JumpFirst bool
	// Entries are the managed rules read back.
	Entries []snat.Entry
	// SetNames are the sets the chain refers to.
	SetNames []string
	// Foreign are rules in the managed chain this tool did not write (no
	// comment of ours, or a shape it does not produce): drift.
	Foreign []string
	// Rules are the chain's rules of our shape, in order.
	Rules []Rule
	// Raw is every rule of the chain as read, ours or not, so that a
	// failed write can put back exactly what was there.
	Raw [][]string
	// Keep are the addresses the keep chain holds conntrack for
	// (linger.go), and KeepExists whether the chain is declared.
	Keep       []netip.Addr
	KeepExists bool
}

// InSync reports whether the installed chain is exactly c with one jump,
// first, and the keep chain holds for exactly c.Keep.
func (in Installed) InSync(c Chain) bool {
	if !slices.Equal(in.Keep, c.Keep) || in.KeepExists != (len(c.Keep) > 0) {
		return false
	}
	if len(c.Rules) == 0 {
		return !in.ChainExists && len(in.Jumps) == 0
	}
	if !in.ChainExists || len(in.Jumps) != 1 || !in.JumpFirst || len(in.Foreign) > 0 {
		return false
	}
	return slices.Equal(in.Rules, c.Rules)
}

// ParseSave reads `iptables-save -t nat` (or ip6tables-save) output.
// sets maps set names to their content, from ParseSets; entries in sets are
// expanded to one Entry per member.
func ParseSave(f snat.Family, text string, sets map[string]Set) (Installed, error) {
	in := Installed{Family: f, OnlyOurs: true}
	inNat := false
	postrouting := 0
	type ruleEntry struct {
		snat.Entry
		set string
	}
	var found []ruleEntry
	byMatch := map[Rule]int{} // a rule's match -> index in found
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
		case strings.HasPrefix(line, ":"+KeepChain+" "):
			in.KeepExists = true
			continue
		case strings.HasPrefix(line, ":"):
			if name, pol, _ := strings.Cut(line[1:], " "); !slices.Contains(builtinChains[table], name) || !strings.HasPrefix(pol, "ACCEPT") {
				in.OnlyOurs = false
			}
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
			if target(spec) != ChainName {
				in.OnlyOurs = false
				continue
			}
			in.Jumps = append(in.Jumps, spec)
			if postrouting == 1 {
				in.JumpFirst = true
			}
		case KeepChain:
			if a, ok := parseKeep(spec); ok {
				in.Keep = append(in.Keep, a)
			} else {
				in.Foreign = append(in.Foreign, KeepChain+": "+strings.Join(spec, " "))
			}
		case ChainName:
			in.Raw = append(in.Raw, spec)
			r, err := ParseRule(f, spec)
			if err != nil {
				in.Foreign = append(in.Foreign, strings.Join(spec, " "))
				continue
			}
			in.Rules = append(in.Rules, r)
			to := []netip.Addr{}
			if r.ToSource.IsValid() {
				to = []netip.Addr{r.ToSource}
			}
			// A spread entry has one rule per address, all with one match.
			m := r.match()
			if i, seen := byMatch[m]; seen {
				found[i].To = append(found[i].To, to...)
				continue
			}
			byMatch[m] = len(found)
			dst := r.Dst
			if !dst.IsValid() {
				dst = everything(f)
			}
			e := snat.Entry{Match: snat.Match{Sender: r.Sender(), Dst: dst, Out: r.Out}, Natural: r.natural()}
			if len(to) > 0 {
				e.To = to
			}
			found = append(found, ruleEntry{e, r.Set})
		default:
			in.OnlyOurs = false
		}
	}
	if err := sc.Err(); err != nil {
		return in, err
	}
	slices.SortFunc(in.Keep, netip.Addr.Compare)
	// A set rule stands for one entry per member.
	n := 0
	for _, f := range found {
		n += max(1, len(sets[f.set].Members))
	}
	in.Entries = make([]snat.Entry, 0, n)
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
		// The members share the rule's To: a copy each was 100,000
		// allocations at 100,000 members, and nothing changes a To in place.
		to := slices.Clip(f.To)
		for _, p := range s.Members {
			e := f.Entry
			e.Dst = p
			e.To = to
			in.Entries = append(in.Entries, e)
		}
	}
	snat.SortEntries(in.Entries)
	return in, nil
}

// everything is the prefix of every destination of f.
func everything(f snat.Family) netip.Prefix {
	if f == snat.IPv4 {
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
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
	byName := map[string]*Set{}
	var cur *Set // ipset save prints a set's members after its create line
	var curName string
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
			fam := snat.IPv4
			if strings.Contains(args, "family inet6") {
				fam = snat.IPv6
			}
			cur, curName = &Set{Name: name, Family: fam, MaxElem: createOption(args, "maxelem")}, name
			byName[name] = cur
		case "add":
			member, opts, _ := strings.Cut(args, " ")
			p, err := parsePrefix(member)
			if err != nil {
				return nil, fmt.Errorf("set %s member %q: %w", name, member, err)
			}
			s := cur
			if s == nil || curName != name {
				if s = byName[name]; s == nil {
					// Members without a create line: kept, but with no
					// name, they are no set a rule can use.
					s = &Set{}
					byName[name] = s
				}
				cur, curName = s, name
			}
			if strings.Contains(opts, "nomatch") {
				s.NoMatch = append(s.NoMatch, p)
			} else {
				s.Members = append(s.Members, p)
			}
		}
	}
	sets := make(map[string]Set, len(byName))
	for n, s := range byName {
		sets[n] = *s
	}
	for n, s := range sets {
		if !slices.IsSortedFunc(s.Members, comparePrefix) {
			slices.SortFunc(s.Members, comparePrefix)
		}
		slices.SortFunc(s.NoMatch, comparePrefix)
		// A set holds a member once; text that repeats one (never the
		// kernel's) must not make two entries of it.
		s.Members, s.NoMatch = slices.Compact(s.Members), slices.Compact(s.NoMatch)
		sets[n] = s
	}
	return sets, nil
}

// createOption reads a numeric option of an ipset create line ("maxelem
// 65536"); 0 when absent.
func createOption(args, name string) int {
	f := strings.Fields(args)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == name {
			n, _ := strconv.Atoi(f[i+1])
			return n
		}
	}
	return 0
}
