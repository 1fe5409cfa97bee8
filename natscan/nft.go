package natscan

import (
	"bytes"
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Chain is one nftables nat chain on the postrouting hook, with the NAT
// rules found in it and in the chains it jumps to.
type Chain struct {
	Family   string // ip, ip6 or inet
	Table    string
	Name     string
	Priority int32
	Rules    []NATRule
}

// IPTablesNFT reports whether a chain is iptables-nft's own nat
// POSTROUTING, the one egress-snat's jump is in when its backend is nft:
// iptables-nft keeps the nat table of iptables as table "nat" of family ip
// (ip6tables-nft: ip6), with its POSTROUTING at priority srcnat. Its rules
// are read from iptables-save instead, where their order relative to our
// jump is visible. Another base chain someone added to that table by hand
// is judged like any other.
func IPTablesNFT(c Chain) bool {
	return c.Table == "nat" && (c.Family == "ip" || c.Family == "ip6") && c.Name == "POSTROUTING"
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyINet:
		return "inet"
	}
	return ""
}

// Lister is the part of *nftables.Conn ReadNFT uses.
type Lister interface {
	ListChains() ([]*nftables.Chain, error)
	GetRules(*nftables.Table, *nftables.Chain) ([]*nftables.Rule, error)
	GetSetByName(*nftables.Table, string) (*nftables.Set, error)
	GetSetElements(*nftables.Set) ([]nftables.SetElement, error)
}

// MaxJumpDepth bounds how deep jumps are followed, here and in the iptables
// backend's reading of the rules ahead of our jump; the kernel itself
// refuses loops, this only keeps a broken read from recursing forever.
const MaxJumpDepth = 16

// ReadNFT reads every nat chain on the postrouting hook of the ip, ip6
// and inet families, whatever its priority, with the NAT rules it and the
// chains it jumps to hold.
func ReadNFT(l Lister) ([]Chain, error) {
	chains, err := l.ListChains()
	if err != nil {
		return nil, fmt.Errorf("listing nftables chains: %w", err)
	}
	type tableKey struct {
		family nftables.TableFamily
		name   string
	}
	byTable := map[tableKey]map[string]*nftables.Chain{}
	for _, c := range chains {
		k := tableKey{c.Table.Family, c.Table.Name}
		if byTable[k] == nil {
			byTable[k] = map[string]*nftables.Chain{}
		}
		byTable[k][c.Name] = c
	}
	var out []Chain
	for _, c := range chains {
		fam := familyName(c.Table.Family)
		if c.Table.Family == nftables.TableFamilyINet && c.Table.Name == OurTable {
			continue // ours (the nftables backend's), whose big sets are not read here
		}
		if fam == "" || c.Type != nftables.ChainTypeNAT || c.Hooknum == nil || *c.Hooknum != *nftables.ChainHookPostrouting || c.Priority == nil {
			continue
		}
		sets := setReader(l, c.Table)
		var walk func(ch *nftables.Chain, outer NATRule, depth int, seen map[string]bool) ([]NATRule, error)
		walk = func(ch *nftables.Chain, outer NATRule, depth int, seen map[string]bool) ([]NATRule, error) {
			if depth > MaxJumpDepth || seen[ch.Name] {
				return nil, nil
			}
			seen[ch.Name] = true
			defer delete(seen, ch.Name)
			rules, err := l.GetRules(ch.Table, ch)
			if err != nil {
				return nil, fmt.Errorf("reading nftables chain %s %s %s: %w", fam, ch.Table.Name, ch.Name, err)
			}
			var found []NATRule
			unsure := outer.Unsure
			for _, r := range rules {
				d := Decode(c.Table.Family, r.Exprs, sets)
				d.NATRule = d.NATRule.Within(outer)
				d.Unsure = d.Unsure || unsure
				if d.Ends {
					if !d.Conditional {
						break // nothing after it runs
					}
					// Packets it matches go no further: later rules may
					// take less than they seem to.
					unsure = true
				}
				switch {
				case d.Jump != "":
					target := byTable[tableKey{c.Table.Family, c.Table.Name}][d.Jump]
					if target == nil {
						continue
					}
					inner, err := walk(target, d.NATRule, depth+1, seen)
					if err != nil {
						return nil, err
					}
					found = append(found, inner...)
				case d.NATRule.Action != "":
					d.NATRule.Text = fmt.Sprintf("%s (handle %d)", d.NATRule.describe(), r.Handle)
					if ch != c {
						d.NATRule.Text = fmt.Sprintf("%s, in chain %s", d.NATRule.Text, ch.Name)
					}
					found = append(found, d.NATRule)
				}
			}
			return found, nil
		}
		rules, err := walk(c, NATRule{}, 0, map[string]bool{})
		if err != nil {
			return nil, err
		}
		out = append(out, Chain{Family: fam, Table: c.Table.Name, Name: c.Name, Priority: int32(*c.Priority), Rules: rules})
	}
	slices.SortFunc(out, func(a, b Chain) int {
		return cmp.Or(cmp.Compare(a.Priority, b.Priority), cmp.Compare(a.Family, b.Family), cmp.Compare(a.Table, b.Table), cmp.Compare(a.Name, b.Name))
	})
	return out, nil
}

// Within narrows a rule reached by a jump with what the jumping rule
// (outer) matched; the inner rule's own matches, usually narrower, win.
func (r NATRule) Within(outer NATRule) NATRule {
	if r.Family == 0 {
		r.Family = outer.Family
	}
	if r.Src == nil {
		r.Src = outer.Src
	}
	if r.Dst == nil {
		r.Dst = outer.Dst
	}
	if r.Out == "" {
		r.Out = outer.Out
	}
	return r
}

// SetFunc returns the addresses of a named (or anonymous) set; ok is false
// when they cannot be read, and the match is then taken as any address.
type SetFunc func(name string) (m Match, ok bool)

func setReader(l Lister, t *nftables.Table) SetFunc {
	cache := map[string]Match{}
	return func(name string) (Match, bool) {
		if m, ok := cache[name]; ok {
			return m, m != nil
		}
		s, err := l.GetSetByName(t, name)
		if err != nil {
			cache[name] = nil
			return nil, false
		}
		els, err := l.GetSetElements(s)
		if err != nil {
			cache[name] = nil
			return nil, false
		}
		m := SetMatch(els, s.Interval)
		cache[name] = m
		return m, m != nil
	}
}

// SetMatch turns the elements of an address set into ranges. Interval sets
// hold each interval as a start element and an end element flagged
// IntervalEnd whose key is the first address after the interval; newer
// kernels may give the end in KeyEnd instead.
func SetMatch(els []nftables.SetElement, interval bool) Match {
	var m Match
	if !interval || slices.ContainsFunc(els, func(e nftables.SetElement) bool { return len(e.KeyEnd) > 0 }) {
		for _, e := range els {
			from, ok := addrOf(e.Key)
			if !ok || e.IntervalEnd {
				continue
			}
			to := from
			if a, ok := addrOf(e.KeyEnd); ok {
				to = a
			}
			m = append(m, Range{from, to})
		}
		return m
	}
	els = slices.Clone(els)
	slices.SortStableFunc(els, func(a, b nftables.SetElement) int {
		if c := bytes.Compare(a.Key, b.Key); c != 0 {
			return c
		}
		// An interval that ends where the next starts: end first.
		switch {
		case a.IntervalEnd == b.IntervalEnd:
			return 0
		case a.IntervalEnd:
			return -1
		}
		return 1
	})
	var start netip.Addr
	for _, e := range els {
		a, ok := addrOf(e.Key)
		if !ok {
			continue
		}
		switch {
		case !e.IntervalEnd:
			start = a
		case start.IsValid():
			m = append(m, Range{start, a.Prev()})
			start = netip.Addr{}
		}
	}
	if start.IsValid() { // open to the end of the address space
		last := netip.IPv4Unspecified().Prev()
		if start.Is6() {
			last = netip.IPv6Unspecified().Prev()
		}
		m = append(m, Range{start, last})
	}
	return m
}

func addrOf(b []byte) (netip.Addr, bool) {
	switch len(b) {
	case 4, 16:
		a, _ := netip.AddrFromSlice(b)
		return a, true
	}
	return netip.Addr{}, false
}

// Decoded is what one nftables rule means for source NAT.
type Decoded struct {
	NATRule
	// Jump is the chain the rule jumps or goes to, if it does.
	Jump string
	// Ends is true for a rule whose verdict ends the chain for the packets
	// it matches (accept, return, drop); Conditional when it matches on
	// anything at all.
	Ends, Conditional bool
}

// What a register holds, as far as decoding cares.
type regKind int

const (
	regOther regKind = iota
	regPayload
	regNFProto
	regOIFName
	regImmediate
)

type register struct {
	kind           regKind
	offset, length uint32 // payload: network header bytes
	mask           []byte // after a bitwise AND
	data           []byte // immediate
}

// Network header offsets of the address fields.
const (
	ip4Src, ip4Dst = 12, 16
	ip6Src, ip6Dst = 8, 24
)

// Decode reads a rule's expressions as nft(8) writes them for address,
// nfproto and oifname matches, SNAT, MASQUERADE (native or iptables-nft's
// xt targets), jump and goto. A match it does not understand narrows
// nothing, so the rule is taken to match more, never less.
func Decode(tf nftables.TableFamily, exprs []expr.Any, sets SetFunc) Decoded {
	var d Decoded
	switch tf {
	case nftables.TableFamilyIPv4:
		d.Family = 4
	case nftables.TableFamilyIPv6:
		d.Family = 6
	}
	regs := map[uint32]register{}
	// field says which address a payload register holds, for the
	// family known at that point of the rule.
	field := func(r register) (src bool, ok bool) {
		if r.kind != regPayload {
			return false, false
		}
		switch {
		case d.Family == 4 && r.offset == ip4Src && r.length <= 4:
			return true, true
		case d.Family == 4 && r.offset == ip4Dst && r.length <= 4:
			return false, true
		case d.Family == 6 && r.offset == ip6Src && r.length <= 16:
			return true, true
		case d.Family == 6 && r.offset == ip6Dst && r.length <= 16:
			return false, true
		}
		return false, false
	}
	narrow := func(src bool, m Match) {
		if src {
			d.Src = m
		} else {
			d.Dst = m
		}
	}
	width := func() int {
		if d.Family == 4 {
			return 4
		}
		return 16
	}
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Payload:
			if e.OperationType != expr.PayloadLoad {
				continue
			}
			if e.Base == expr.PayloadBaseNetworkHeader {
				regs[e.DestRegister] = register{kind: regPayload, offset: e.Offset, length: e.Len}
			} else {
				regs[e.DestRegister] = register{}
			}
		case *expr.Meta:
			if e.SourceRegister {
				continue
			}
			switch e.Key {
			case expr.MetaKeyNFPROTO:
				regs[e.Register] = register{kind: regNFProto}
			case expr.MetaKeyOIFNAME:
				regs[e.Register] = register{kind: regOIFName}
			default:
				regs[e.Register] = register{}
			}
		case *expr.Bitwise:
			r := regs[e.SourceRegister]
			if r.kind == regPayload && len(e.Mask) == int(r.length) && allZero(e.Xor) {
				r.mask = e.Mask
			} else {
				r = register{}
			}
			regs[e.DestRegister] = r
		case *expr.Immediate:
			regs[e.Register] = register{kind: regImmediate, data: e.Data}
		case *expr.Cmp:
			r := regs[e.Register]
			d.Conditional = true
			if r.kind == regOther || r.kind == regImmediate {
				d.Unsure = true
			}
			switch r.kind {
			case regNFProto:
				if e.Op == expr.CmpOpEq && len(e.Data) == 1 {
					switch e.Data[0] {
					case unix.NFPROTO_IPV4:
						d.Family = 4
					case unix.NFPROTO_IPV6:
						d.Family = 6
					}
				}
			case regOIFName:
				// A name with its NUL is exact; without it, a wildcard.
				if i := bytes.IndexByte(e.Data, 0); i > 0 && e.Op == expr.CmpOpEq {
					d.Out = string(e.Data[:i])
				} else {
					d.Unsure = true
				}
			case regPayload:
				src, ok := field(r)
				if !ok || e.Op != expr.CmpOpEq {
					d.Unsure = true
					continue
				}
				if p, ok := prefixOf(e.Data, r, width()); ok {
					narrow(src, Match{PrefixRange(p)})
				} else {
					d.Unsure = true
				}
			}
		case *expr.Range:
			r := regs[e.Register]
			d.Conditional = true
			src, ok := field(r)
			if !ok || e.Op != expr.CmpOpEq || r.mask != nil {
				d.Unsure = true
				continue
			}
			from, ok1 := addrOf(e.FromData)
			to, ok2 := addrOf(e.ToData)
			if ok1 && ok2 {
				narrow(src, Match{{from, to}})
			}
		case *expr.Lookup:
			r := regs[e.SourceRegister]
			d.Conditional = true
			src, ok := field(r)
			if !ok || e.Invert || e.IsDestRegSet || sets == nil {
				d.Unsure = true
				continue
			}
			if m, ok := sets(e.SetName); ok {
				narrow(src, m)
			} else {
				d.Unsure = true
			}
		case *expr.NAT:
			if e.Type != expr.NATTypeSourceNAT {
				continue
			}
			d.Action = "snat"
			if r := regs[e.RegAddrMin]; e.RegAddrMin != 0 && r.kind == regImmediate {
				if a, ok := addrOf(r.data); ok {
					d.Action = "snat to " + a.String()
				}
			}
		case *expr.Masq:
			d.Action = "masquerade"
		case *expr.Target:
			switch e.Name {
			case "SNAT", "MASQUERADE":
				d.Action = e.Name + " (iptables-nft rule)"
			}
		case *expr.Verdict:
			switch e.Kind {
			case expr.VerdictJump, expr.VerdictGoto:
				d.Jump = e.Chain
			case expr.VerdictAccept, expr.VerdictReturn, expr.VerdictDrop:
				d.Ends = true
			}
		}
	}
	return d
}

// To returns the address a decoded action SNATs to, if it names one.
func (r NATRule) To() (netip.Addr, bool) {
	s, ok := strings.CutPrefix(r.Action, "snat to ")
	if !ok {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(s)
	return a, err == nil
}

// prefixOf turns compared bytes into a prefix: a payload shorter than the
// address (nft loads 3 bytes for a /24) or a mask of leading ones.
func prefixOf(data []byte, r register, width int) (netip.Prefix, bool) {
	if len(data) != int(r.length) || int(r.length) > width {
		return netip.Prefix{}, false
	}
	bits := 8 * len(data)
	if r.mask != nil {
		bits = 0
		for i, b := range r.mask {
			ones := leadingOnes(b)
			bits += ones
			if ones < 8 {
				if !allZero(r.mask[i+1:]) || b != byte(0xff<<(8-ones)) {
					return netip.Prefix{}, false // not a prefix mask
				}
				break
			}
		}
	}
	full := make([]byte, width)
	copy(full, data)
	a, _ := netip.AddrFromSlice(full)
	return netip.PrefixFrom(a, bits).Masked(), true
}

func leadingOnes(b byte) int {
	n := 0
	for b&0x80 != 0 {
		n++
		b <<= 1
	}
	return n
}

func allZero(b []byte) bool { return !slices.ContainsFunc(b, func(x byte) bool { return x != 0 }) }
