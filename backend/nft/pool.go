package nft

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/snat"
)

// A pool (snat's pool.go) is SNAT to an address the rule computes in the
// 16-byte register 1 from the prefix and random or hashed host bits:
//
//	immediate reg 1 PREFIX                           (initializes reg 1)
//	[payload load ip6 saddr . daddr (or saddr) => reg 2]  (destination, sender)
//	[numgen random mod 2^32-1 => reg 1's word 2]     (when the host part
//	 | jhash reg 2 mod 2^32-1 seed S2 => word 2]      passes 32 bits)
//	numgen random mod M offset 1 => word 3           (connection)
//	 | jhash reg 2 mod M offset 1 seed S3 => word 3  (destination, sender)
//	[byteorder hton word 3]                          (host part < 32 bits)
//	bitwise reg 1 = (reg 1 & HOSTMASK) ^ PREFIX
//	snat ip6 to reg 1
//
// A period (one address until the next rotate) needs no generator: its
// immediate is the period's address, and the bitwise, which leaves it as
// it is, still names the prefix it is an address of:
//
//	immediate reg 1 ADDRESS
//	bitwise reg 1 = (reg 1 & HOSTMASK) ^ PREFIX
//	snat ip6 to reg 1
//
// M is 2^min(hostbits, 32) - 1, and the offset 1 keeps the last word, and
// so the host part, from ever being zero: the pool's zero address is never
// used. The bitwise cuts the random words to the host bits and puts the
// prefix back in front. The byteorder puts a word of fewer than 32 random
// bits in network order, where the mask expects them; a whole random word
// needs none (any order of its bytes is as random, and as nonzero).
//
// google/nftables (v0.3.0) does not decode byteorder expressions: it
// skips them silently when it reads a rule. decodePool therefore takes a
// pool program without its byteorder too.
//
// Why this and not `snat ip6 to PREFIX`: the kernel picks an address of a
// range by hashing the connection's source and destination addresses
// (nf_nat_core.c), never its ports, and through a /64 it varies only the
// last 32 bits (its 32-bit distance of a word spanning 0-0xffffffff is 0).
// Measured in a lab: 300 connections from the host to one server through
// this rule left from 300 addresses over all 64 bits; through
// `snat ip6 to 2001:db8:1::/64`, from one. The jhash of the addresses
// (the sender's alone for sender) gives the kernel's stickiness, over all
// the host bits.
//
// Why the immediate: the kernel refuses a rule that loads a register
// nothing stored into (ENODATA, since 6.x), and the bitwise reads all of
// register 1. nft(8) lists such a rule without the numgen or jhash (as
// `snat ip6 to 0x2001... [invalid type] & ... | ...`): what it computes
// is this package's to read, and it does (decodePool).

// Registers of the pool program: word 2 and 3 of register 1 (NFT_REG32_02
// and NFT_REG32_03 overlay NFT_REG_1's last 8 bytes), and register 2 (16
// bytes; 32 with register 3) for the hashed addresses.
const (
	regWord2 = 10 // NFT_REG32_02
	regWord3 = 11 // NFT_REG32_03
	regKey   = 2  // NFT_REG_2
)

// The jhash seeds of the two words: fixed, so that a sender and
// destination keep their address across reloads and reboots, as the
// kernel's range hash does.
const (
	seedWord2 = 0x65677265 // "egre"
	seedWord3 = 0x73732d73 // "ss-s"
)

// poolExprs is the pool program for p and s (and a period's address at),
// from the immediate to the bitwise: the snat that follows takes register
// 1.
func poolExprs(p netip.Prefix, s snat.Sticky, at netip.Addr) []expr.Any {
	h := 128 - p.Bits()
	prefix := p.Addr().AsSlice()
	mask := &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 16, Mask: hostMask(p).AsSlice(), Xor: prefix}
	if s == snat.StickyPeriod {
		return []expr.Any{&expr.Immediate{Register: reg, Data: at.AsSlice()}, mask}
	}
	out := []expr.Any{&expr.Immediate{Register: reg, Data: prefix}}
	keyLen := uint32(0)
	switch s {
	case snat.StickyDestination:
		keyLen = 32 // saddr and daddr, adjacent in the header
	case snat.StickySender:
		keyLen = 16
	}
	if keyLen > 0 {
		out = append(out, &expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: keyLen})
	}
	gen := func(dreg, mod, off, seed uint32) expr.Any {
		if keyLen == 0 {
			return &expr.Numgen{Register: dreg, Modulus: mod, Offset: off, Type: unix.NFT_NG_RANDOM}
		}
		return &expr.Hash{SourceRegister: regKey, DestRegister: dreg, Length: keyLen, Modulus: mod, Offset: off, Seed: seed, Type: expr.HashTypeJenkins}
	}
	if h > 32 {
		out = append(out, gen(regWord2, 0xffffffff, 0, seedWord2))
	}
	last := uint32(0xffffffff)
	if h < 32 {
		last = 1<<h - 1
	}
	out = append(out, gen(regWord3, last, 1, seedWord3))
	if h < 32 {
		out = append(out, &expr.Byteorder{SourceRegister: regWord3, DestRegister: regWord3, Op: expr.ByteorderHton, Len: 4, Size: 4})
	}
	return append(out, mask)
}

// hostMask is the mask of p's host bits.
func hostMask(p netip.Prefix) netip.Addr {
	m := maskAddr(snat.IPv6, p.Bits()).As16()
	for i := range m {
		m[i] = ^m[i]
	}
	return netip.AddrFrom16(m)
}

// decodePool reads a pool program back, from its immediate (d's current
// expression) to the snat: the pool, its stickiness and a period's
// address, when the expressions are exactly what poolExprs writes for
// them.
func (d *decoder) decodePool(f snat.Family) (netip.Prefix, snat.Sticky, netip.Addr, error) {
	none := func(err error) (netip.Prefix, snat.Sticky, netip.Addr, error) {
		return netip.Prefix{}, "", netip.Addr{}, err
	}
	start := d.i
	imm, ok := d.peek().(*expr.Immediate)
	if !ok || f != snat.IPv6 || imm.Register != reg || len(imm.Data) != 16 {
		return none(d.bad(start))
	}
	end := start
	for end < len(d.exprs) {
		if _, ok := d.exprs[end].(*expr.NAT); ok {
			break
		}
		end++
	}
	if end == len(d.exprs) {
		return none(fmt.Errorf("a pool program without its snat"))
	}
	bw, ok := d.exprs[max(start, end-1)].(*expr.Bitwise)
	if !ok || len(bw.Mask) != 16 || len(bw.Xor) != 16 {
		return none(d.bad(end - 1))
	}
	inv := make([]byte, 16)
	for i, b := range bw.Mask {
		inv[i] = ^b
	}
	bits := prefixBits(inv)
	prefix, _ := netip.AddrFromSlice(bw.Xor)
	p := netip.PrefixFrom(prefix, bits)
	if bits < 0 || snat.CheckPool(p) != nil {
		return none(d.bad(end - 1))
	}
	sticky := snat.StickyConnection
	var at netip.Addr
	if pl, ok := d.exprs[min(start+1, end)].(*expr.Payload); ok && start+1 < end {
		sticky = snat.StickySender
		if pl.Len == 32 {
			sticky = snat.StickyDestination
		}
	}
	if end-start == 2 {
		// The immediate and the bitwise alone: a period's address.
		sticky = snat.StickyPeriod
		at, _ = netip.AddrFromSlice(imm.Data)
		if !snat.InPool(p, at) {
			return none(d.bad(start))
		}
	}
	want := poolExprs(p, sticky, at)
	if end-start == len(want)-1 {
		// Read by a google/nftables that skips the byteorder.
		want = slices.DeleteFunc(want, func(e expr.Any) bool { _, ok := e.(*expr.Byteorder); return ok })
	}
	if end-start != len(want) {
		return none(fmt.Errorf("pool program of %d expressions, want %d for %s per %s", end-start, len(want), p, sticky))
	}
	for i, w := range want {
		if !reflect.DeepEqual(d.exprs[start+i], w) {
			return none(d.bad(start + i))
		}
	}
	d.i = end
	if !d.snat(f, snat.Ports{}) {
		return none(d.bad(end))
	}
	return p, sticky, at, nil
}
