package iptables

import (
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
	s, err := ReadSave(text, table)
	if err != nil {
		return Installed{Family: f, OnlyOurs: true}, fmt.Errorf("reading %s %w", f, err)
	}
	return readInstalled(f, s.Table(table), sets), nil
}

// readInstalled reads what a family's nat table (nil when there is none)
// holds of ours.
func readInstalled(f snat.Family, nat *SavedTable, sets map[string]Set) Installed {
	in := Installed{Family: f, OnlyOurs: true}
	if nat == nil {
		return in
	}
	in.TableExists = true
	for _, c := range nat.Chains {
		switch {
		case c.Name == ChainName:
			in.ChainExists = true
		case c.Name == KeepChain:
			in.KeepExists = true
		case !c.builtinAccept(table):
			in.OnlyOurs = false
		}
	}
	postrouting := 0
	type ruleEntry struct {
		snat.Entry
		set string
		// ranges are a pool's rules' (see pool.go).
		ranges     []addrRange
		persistent bool
	}
	var found []ruleEntry
	byMatch := map[Rule]int{} // a rule's match -> index in found
	for _, sr := range nat.Rules {
		spec := sr.Spec
		switch sr.Chain {
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
			var rg []addrRange
			switch {
			case r.ToLast.IsValid():
				rg = []addrRange{{r.ToSource, r.ToLast}}
			case r.Proto != "" && r.DPort == 0:
				// A port range's rules (one protocol each) repeat
				// the addresses of the entry's rules without one,
				// which give To; the chain's comparison with the
				// rendered rules catches any that differ.
			case r.ToSource.IsValid():
				to = []netip.Addr{r.ToSource}
			}
			// A spread entry has one rule per address, all with one match.
			m := r.match()
			if i, seen := byMatch[m]; seen {
				found[i].To = append(found[i].To, to...)
				found[i].ranges = append(found[i].ranges, rg...)
				if !r.Ports.IsZero() {
					found[i].Ports = r.Ports
				}
				continue
			}
			byMatch[m] = len(found)
			dst := r.Dst
			if !dst.IsValid() {
				dst = everything(f)
			}
			e := snat.Entry{Match: snat.Match{Sender: r.Sender(), Dst: dst, Out: r.Out}, Natural: r.natural(), Ports: r.Ports}
			if r.DPort != 0 {
				e.Proto, e.DPort = r.Proto, r.DPort
			}
			if len(to) > 0 {
				e.To = to
			}
			if r.Pool.IsValid() {
				e.Pool, e.Sticky = r.Pool, snat.StickyPeriod
			}
			found = append(found, ruleEntry{e, r.Set, rg, r.Persistent})
		default:
			in.OnlyOurs = false
		}
	}
	slices.SortFunc(in.Keep, netip.Addr.Compare)
	// A pool's ranges stand for its prefix and stickiness; ranges that
	// are no pool's (mixed with addresses, or cut otherwise) are not ours.
	found = slices.DeleteFunc(found, func(f ruleEntry) bool {
		if len(f.ranges) == 0 {
			return false
		}
		if _, _, ok := poolOf(f.ranges, f.persistent); !ok || len(f.To) > 0 {
			in.Foreign = append(in.Foreign, fmt.Sprintf("rules for %s with --to-source ranges egress-snat does not write", f.Dst))
			return true
		}
		return false
	})
	for i := range found {
		if len(found[i].ranges) > 0 {
			found[i].Pool, found[i].Sticky, _ = poolOf(found[i].ranges, found[i].persistent)
		}
	}
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
	return in
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
