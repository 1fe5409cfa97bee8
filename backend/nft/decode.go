package nft

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/snat"
)

// decodeRule reads a rule's expressions back into a Rule. It accepts
// exactly the shapes ruleExprs writes, so that a rule read back compares
// equal to the rule written, and a rule changed by someone else does not:
// anything else is an error, and the rule is then foreign. spread returns
// the addresses of an anonymous map, by the kernel's name for it.
func decodeRule(exprs []expr.Any, spread func(name string) ([]netip.Addr, error)) (Rule, error) {
	d := decoder{exprs: exprs}
	var r Rule
	srcOff, dstOff := uint32(0), uint32(0)
	for !d.done() {
		start := d.i
		switch e := d.next().(type) {
		case *expr.Meta:
			if e.SourceRegister {
				return r, d.bad(start)
			}
			switch e.Key {
			case expr.MetaKeyNFPROTO:
				c, ok := d.cmp(expr.CmpOpEq)
				if !ok || len(c) != 1 || r.Family != 0 {
					return r, d.bad(start)
				}
				switch c[0] {
				case unix.NFPROTO_IPV4:
					r.Family = snat.IPv4
				case unix.NFPROTO_IPV6:
					r.Family = snat.IPv6
				default:
					return r, d.bad(start)
				}
				srcOff, dstOff = addrOffsets(r.Family)
			case expr.MetaKeyMARK:
				if d.ours() {
					v, ok := d.cmp32(expr.CmpOpEq)
					if !ok {
						return r, d.bad(start)
					}
					if v == 0 && !d.peekCt() {
						r.Unmarked = true
						continue
					}
					// meta mark & M == V ct mark set ct mark & ~M | V
					if ct, ok := d.next().(*expr.Ct); !ok || ct.Key != expr.CtKeyMARK || ct.SourceRegister ||
						!d.markBits(v) || !d.ctSet() || !d.done() {
						return r, d.bad(start)
					}
					r.Action = Action{Kind: ActSaveMark, Mark: v}
					continue
				}
				// meta mark set meta mark & ~M | V
				v, ok := d.markBitsAny()
				if !ok || !d.metaSet() || !d.done() {
					return r, d.bad(start)
				}
				r.Action = Action{Kind: ActMark, Mark: v}
			case expr.MetaKeyOIFNAME:
				c, ok := d.cmp(expr.CmpOpEq)
				i := bytes.IndexByte(c, 0)
				if !ok || len(c) != unix.IFNAMSIZ || i <= 0 || !allZero(c[i:]) {
					return r, d.bad(start)
				}
				r.Out = string(c[:i])
			case expr.MetaKeySKUID:
				v, ok := d.cmp32(expr.CmpOpEq)
				if !ok {
					return r, d.bad(start)
				}
				r.HasUID, r.UID = true, v
			case expr.MetaKeyL4PROTO:
				c, ok := d.cmp(expr.CmpOpEq)
				if !ok || len(c) != 1 || r.Proto != "" {
					return r, d.bad(start)
				}
				for name, p := range l4protos {
					if p == c[0] {
						r.Proto = name
					}
				}
				if r.Proto == "" {
					return r, d.bad(start)
				}
			default:
				return r, d.bad(start)
			}
		case *expr.Ct:
			if e.Key == expr.CtKeySTATE && !e.SourceRegister && isBitwise(d.peek(), ctStateNew, 0) {
				d.i++
				if v, ok := d.cmp32(expr.CmpOpNeq); !ok || v != 0 || r.CtNew {
					return r, d.bad(start)
				}
				r.CtNew = true
				continue
			}
			if e.Key == expr.CtKeySTATE && !e.SourceRegister && isBitwise(d.peek(), ctStateNew|ctStateInvalid, 0) {
				d.i++
				if v, ok := d.cmp32(expr.CmpOpNeq); !ok || v != 0 || r.CtNewOrInvalid {
					return r, d.bad(start)
				}
				r.CtNewOrInvalid = true
				continue
			}
			// ct mark & M == V meta mark set meta mark & ~M | V
			if e.Key != expr.CtKeyMARK || e.SourceRegister || !d.ours() {
				return r, d.bad(start)
			}
			v, ok := d.cmp32(expr.CmpOpEq)
			if !ok {
				return r, d.bad(start)
			}
			if m, ok := d.next().(*expr.Meta); !ok || m.Key != expr.MetaKeyMARK || m.SourceRegister || !d.markBits(v) || !d.metaSet() || !d.done() {
				return r, d.bad(start)
			}
			r.Action = Action{Kind: ActRestoreMark, Mark: v}
		case *expr.Fib:
			want := expr.Fib{Register: reg, FlagSADDR: true, ResultADDRTYPE: true}
			v, ok := d.cmp32(expr.CmpOpNeq)
			if *e != want || !ok || v != unix.RTN_LOCAL {
				return r, d.bad(start)
			}
			r.Forwarded = true
		case *expr.Payload:
			if e.Base == expr.PayloadBaseTransportHeader {
				// th dport N, after meta l4proto
				c, ok := d.cmp(expr.CmpOpEq)
				if !ok || e.OperationType != expr.PayloadLoad || e.Offset != 2 || e.Len != 2 || len(c) != 2 || r.Proto == "" || r.DPort != 0 {
					return r, d.bad(start)
				}
				if r.DPort = binary.BigEndian.Uint16(c); r.DPort == 0 {
					return r, d.bad(start)
				}
				continue
			}
			if r.Family == 0 || e.Base != expr.PayloadBaseNetworkHeader || e.OperationType != expr.PayloadLoad ||
				int(e.Len) != maskAddr(r.Family, 0).BitLen()/8 {
				return r, d.bad(start)
			}
			bits := int(e.Len * 8)
			if b, ok := d.peek().(*expr.Bitwise); ok {
				bits = prefixBits(b.Mask)
				if bits < 0 || !allZero(b.Xor) || int(b.Len) != int(e.Len) {
					return r, d.bad(start)
				}
				d.i++
			}
			if l, ok := d.peek().(*expr.Lookup); ok && e.Offset == dstOff {
				d.i++
				if l.IsDestRegSet || l.Invert || l.SourceRegister != reg {
					return r, d.bad(start)
				}
				r.Set, r.SetBits = l.SetName, bits
				continue
			}
			c, ok := d.cmp(expr.CmpOpEq)
			a, aok := netip.AddrFromSlice(c)
			if !ok || !aok {
				return r, d.bad(start)
			}
			p := netip.PrefixFrom(a, bits)
			if p.Masked() != p {
				return r, d.bad(start)
			}
			switch e.Offset {
			case srcOff:
				r.Src = p
			case dstOff:
				r.Dst = p
			default:
				return r, d.bad(start)
			}
		case *expr.Match:
			info, ok := e.Info.(*xt.Unknown)
			if e.Name != "cgroup" || !ok {
				return r, d.bad(start)
			}
			p, ok := cgroupPath(e.Rev, *info)
			if !ok {
				return r, d.bad(start)
			}
			r.Cgroup = p
		case *expr.Counter:
			r.Counter, r.Packets, r.Bytes = true, e.Packets, e.Bytes
		case *expr.Immediate:
			if _, nat := d.peek().(*expr.NAT); !nat && !d.peekPorts() {
				d.i = start
				p, sticky, at, err := d.decodePool(r.Family)
				if err != nil {
					return r, err
				}
				r.Action = Action{Kind: ActSNAT, Pool: p, Sticky: sticky}
				if at.IsValid() {
					r.Action.To = []netip.Addr{at}
				}
				continue
			}
			a, ok := netip.AddrFromSlice(e.Data)
			ports, pok := d.ports()
			if !ok || e.Register != reg || !pok || !d.snat(r.Family, ports) {
				return r, d.bad(start)
			}
			r.Action = Action{Kind: ActSNAT, To: []netip.Addr{a}, Ports: ports}
		case *expr.Numgen:
			l, ok := d.next().(*expr.Lookup)
			ports, pok := d.ports()
			if e.Register != reg || e.Type != unix.NFT_NG_INCREMENTAL || e.Offset != 0 || !ok || !l.IsDestRegSet || l.Invert ||
				!pok || !d.snat(r.Family, ports) {
				return r, d.bad(start)
			}
			to, err := spread(l.SetName)
			if err != nil {
				return r, fmt.Errorf("map %s of a spread rule: %w", l.SetName, err)
			}
			if len(to) != int(e.Modulus) {
				return r, fmt.Errorf("map %s of a spread rule has %d addresses for numgen mod %d", l.SetName, len(to), e.Modulus)
			}
			r.Action = Action{Kind: ActSNAT, To: to, Ports: ports}
		case *expr.Verdict:
			switch {
			case e.Kind == expr.VerdictAccept && d.done():
				r.Action = Action{Kind: ActAccept}
			case e.Kind == expr.VerdictReturn && d.done():
				r.Action = Action{Kind: ActReturn}
			case e.Kind == expr.VerdictDrop && d.done():
				r.Action = Action{Kind: ActDrop}
			default:
				return r, d.bad(start)
			}
		default:
			return r, d.bad(start)
		}
	}
	if r.Action.Kind == "" {
		if !r.Counter {
			return r, fmt.Errorf("no action")
		}
		r.Action.Kind = ActCount
	}
	return r, nil
}

type decoder struct {
	exprs []expr.Any
	i     int
}

func (d *decoder) done() bool { return d.i >= len(d.exprs) }

func (d *decoder) peek() expr.Any {
	if d.done() {
		return nil
	}
	return d.exprs[d.i]
}

func (d *decoder) next() expr.Any {
	e := d.peek()
	d.i++
	return e
}

func (d *decoder) bad(at int) error {
	if at >= len(d.exprs) {
		return fmt.Errorf("expressions end early")
	}
	return fmt.Errorf("expression %d (%T %+v) is not in a shape egress-snat writes", at, d.exprs[at], d.exprs[at])
}

// cmp takes a comparison of register 1 with op and returns its data.
func (d *decoder) cmp(op expr.CmpOp) ([]byte, bool) {
	c, ok := d.next().(*expr.Cmp)
	if !ok || c.Op != op || c.Register != reg {
		return nil, false
	}
	return c.Data, true
}

func (d *decoder) cmp32(op expr.CmpOp) (uint32, bool) {
	c, ok := d.cmp(op)
	if !ok || len(c) != 4 {
		return 0, false
	}
	return binary.NativeEndian.Uint32(c), true
}

func isBitwise(e expr.Any, mask, xor uint32) bool {
	b, ok := e.(*expr.Bitwise)
	return ok && b.SourceRegister == reg && b.DestRegister == reg && b.Len == 4 &&
		bytes.Equal(b.Mask, native32(mask)) && bytes.Equal(b.Xor, native32(xor))
}

// ours takes `& MarkMask`.
func (d *decoder) ours() bool {
	if isBitwise(d.peek(), MarkMask, 0) {
		d.i++
		return true
	}
	return false
}

// markBits takes `& ~MarkMask | v`.
func (d *decoder) markBits(v uint32) bool {
	if isBitwise(d.peek(), ^uint32(MarkMask), v) {
		d.i++
		return true
	}
	return false
}

func (d *decoder) markBitsAny() (uint32, bool) {
	b, ok := d.peek().(*expr.Bitwise)
	if !ok || len(b.Xor) != 4 {
		return 0, false
	}
	v := binary.NativeEndian.Uint32(b.Xor)
	return v, v&^uint32(MarkMask) == 0 && v != 0 && d.markBits(v)
}

func (d *decoder) metaSet() bool {
	m, ok := d.next().(*expr.Meta)
	return ok && m.Key == expr.MetaKeyMARK && m.SourceRegister && m.Register == reg
}

// ctSet takes `ct mark set` from register 1. google/nftables v0.3.0 does
// not read NFTA_CT_SREG back: a ct set reads as a ct load into register
// 0, which no load has (loads always name a register).
func (d *decoder) ctSet() bool {
	c, ok := d.next().(*expr.Ct)
	return ok && c.Key == expr.CtKeyMARK && (c.SourceRegister && c.Register == reg || !c.SourceRegister && c.Register == 0)
}

func (d *decoder) peekCt() bool {
	_, ok := d.peek().(*expr.Ct)
	return ok
}

// peekPorts reports whether a port range's loads come next.
func (d *decoder) peekPorts() bool {
	i, ok := d.peek().(*expr.Immediate)
	return ok && i.Register == regPortLo
}

// ports takes a port range's loads (portExprs), if they come next; false
// for loads of another shape.
func (d *decoder) ports() (snat.Ports, bool) {
	if !d.peekPorts() {
		return snat.Ports{}, true
	}
	lo, hi := d.next().(*expr.Immediate), d.peek()
	h, ok := hi.(*expr.Immediate)
	if !ok || h.Register != regPortHi || len(lo.Data) != 2 || len(h.Data) != 2 {
		return snat.Ports{}, false
	}
	d.i++
	p := snat.Ports{Lo: binary.BigEndian.Uint16(lo.Data), Hi: binary.BigEndian.Uint16(h.Data)}
	return p, p.Lo != 0 && p.Lo <= p.Hi
}

// snat takes the final `nat snat` of family f from register 1, with the
// port range p from its registers when p is not zero.
func (d *decoder) snat(f snat.Family, p snat.Ports) bool {
	n, ok := d.next().(*expr.NAT)
	if !ok || f == 0 {
		return false
	}
	// The kernel reports the end of the address range as the same
	// register when it was not given.
	got := *n
	if got.RegAddrMax == reg {
		got.RegAddrMax = 0
	}
	want := expr.NAT{Type: expr.NATTypeSourceNAT, Family: uint32(nfproto(f)), RegAddrMin: reg}
	if !p.IsZero() {
		want.RegProtoMin, want.RegProtoMax, want.Specified = regPortLo, regPortHi, true
	}
	return got == want && d.done()
}

// prefixBits is the length of a prefix mask, or -1 for another mask.
func prefixBits(mask []byte) int {
	bits := 0
	for i, b := range mask {
		ones := 0
		for x := b; x&0x80 != 0; x <<= 1 {
			ones++
		}
		bits += ones
		if ones < 8 {
			if b != byte(0xff<<(8-ones)) || !allZero(mask[i+1:]) {
				return -1
			}
			break
		}
	}
	return bits
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
