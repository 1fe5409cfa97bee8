package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/snat"
)

// A transaction is one buffer: the batch begin message, every step's
// messages, the batch end message. It is written in two passes, one that
// only counts bytes and one that writes them into a buffer of exactly that
// size, so that a million destinations (16 MB of messages) cost that
// buffer and nothing else: google/nftables keeps every marshalled message,
// then copies them all into the one it sends, and its elements pass
// through several intermediate allocations each.
//
// Rule expressions are marshalled by google/nftables' expr package; tables,
// chains, sets and elements are simple enough to write here.

// maxAttrLen is the largest payload of one netlink attribute: nla_len is
// 16 bits. An element list is one attribute, so it bounds the elements of
// one message.
const maxAttrLen = 0xffff - 4

const (
	nlmsgHdrLen = unix.SizeofNlMsghdr // 16
	nfgenLen    = 4
	attrHdrLen  = 4
)

// batch writes netlink messages into buf, or only counts their bytes.
type batch struct {
	count bool
	buf   []byte
	n     int
	seq   uint32 // of the next message
	// steps[i] is the index of the step that wrote message i (after the
	// batch begin), to name it in errors.
	steps   []int
	step    int
	lastHdr int // offset of the last message's header
	setID   uint32
	err     error
}

func align4(n int) int { return (n + 3) &^ 3 }

func (b *batch) put(p []byte) {
	if !b.count {
		copy(b.buf[b.n:], p)
	}
	b.n += len(p)
}

func (b *batch) pad() {
	for b.n%4 != 0 {
		if !b.count {
			b.buf[b.n] = 0
		}
		b.n++
	}
}

// begin starts a message of type typ (an NFT_MSG_* of subsystem nftables,
// or a batch message) and returns its offset for end.
func (b *batch) begin(typ uint16, flags uint16, family uint8, resID uint16) int {
	start := b.n
	if !b.count {
		h := b.buf[start:]
		binary.NativeEndian.PutUint16(h[4:], typ)
		binary.NativeEndian.PutUint16(h[6:], flags|unix.NLM_F_REQUEST)
		binary.NativeEndian.PutUint32(h[8:], b.seq)
		binary.NativeEndian.PutUint32(h[12:], 0)
		h[16], h[17] = family, unix.NFNETLINK_V0
		binary.BigEndian.PutUint16(h[18:], resID)
	}
	b.n += nlmsgHdrLen + nfgenLen
	b.seq++
	return start
}

func (b *batch) end(start int) {
	if !b.count {
		binary.NativeEndian.PutUint32(b.buf[start:], uint32(b.n-start))
	}
}

// msg starts a message of ours (family inet).
func (b *batch) msg(m int, flags uint16) int {
	b.steps = append(b.steps, b.step)
	b.lastHdr = b.n
	return b.begin(uint16(unix.NFNL_SUBSYS_NFTABLES<<8|m), flags, unix.NFPROTO_INET, 0)
}

func (b *batch) attr(typ uint16, data []byte) {
	if !b.count {
		binary.NativeEndian.PutUint16(b.buf[b.n:], uint16(attrHdrLen+len(data)))
		binary.NativeEndian.PutUint16(b.buf[b.n+2:], typ)
	}
	b.n += attrHdrLen
	b.put(data)
	b.pad()
}

func (b *batch) str(typ uint16, s string) {
	if !b.count {
		binary.NativeEndian.PutUint16(b.buf[b.n:], uint16(attrHdrLen+len(s)+1))
		binary.NativeEndian.PutUint16(b.buf[b.n+2:], typ)
		copy(b.buf[b.n+attrHdrLen:], s)
		b.buf[b.n+attrHdrLen+len(s)] = 0
	}
	b.n += attrHdrLen + len(s) + 1
	b.pad()
}

func (b *batch) u32(typ uint16, v uint32) {
	var d [4]byte
	binary.BigEndian.PutUint32(d[:], v)
	b.attr(typ, d[:])
}

func (b *batch) nest(typ uint16) int {
	start := b.n
	if !b.count {
		binary.NativeEndian.PutUint16(b.buf[b.n+2:], typ|unix.NLA_F_NESTED)
	}
	b.n += attrHdrLen
	return start
}

func (b *batch) endNest(start int) {
	if l := b.n - start; l > 0xffff {
		b.fail(fmt.Errorf("attribute of %d bytes is longer than netlink's 65535", l))
	} else if !b.count {
		binary.NativeEndian.PutUint16(b.buf[start:], uint16(l))
	}
}

func (b *batch) fail(err error) {
	if b.err == nil {
		b.err = err
	}
}

// encodeProgram returns the transaction of p: the bytes to send, the
// sequence number of its last message (the one that asks for an
// acknowledgement), and which step wrote each message. gen, when not
// zero, makes the kernel refuse the transaction (ERESTART) if the ruleset's
// generation is no longer gen.
func encodeProgram(p Program, seq uint32, gen uint32) ([]byte, []int, error) {
	b := &batch{count: true, seq: seq}
	encodeAll(b, p, gen)
	if b.err != nil {
		return nil, nil, b.err
	}
	size := b.n
	b = &batch{buf: make([]byte, size), seq: seq}
	encodeAll(b, p, gen)
	if b.err != nil {
		return nil, nil, b.err
	}
	if b.n != size {
		return nil, nil, fmt.Errorf("internal error: transaction of %d bytes counted as %d", b.n, size)
	}
	return b.buf, b.steps, nil
}

func encodeAll(b *batch, p Program, gen uint32) {
	start := b.begin(unix.NFNL_MSG_BATCH_BEGIN, 0, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES)
	if gen != 0 {
		b.u32(unix.NFNL_BATCH_GENID, gen)
	}
	b.end(start)
	for i, s := range p.Steps {
		b.step = i
		s.encode(b)
	}
	// The last message asks for an acknowledgement: the kernel reports
	// every failing message whether asked or not, and the batch's end
	// is never acknowledged, so one acknowledgement tells when the whole
	// batch is done. Acknowledging every message would take an skb each
	// in our receive buffer.
	if !b.count && len(b.steps) > 0 {
		f := binary.NativeEndian.Uint16(b.buf[b.lastHdr+6:])
		binary.NativeEndian.PutUint16(b.buf[b.lastHdr+6:], f|unix.NLM_F_ACK)
	}
	b.end(b.begin(unix.NFNL_MSG_BATCH_END, 0, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES))
}

// tableComment is the table's userdata: nft(8) lists it as its comment.
const tableComment = "egress-snat: source addresses of outgoing traffic; written by egress-snat, do not edit"

func (AddTable) encode(b *batch) {
	m := b.msg(unix.NFT_MSG_NEWTABLE, unix.NLM_F_CREATE)
	b.str(unix.NFTA_TABLE_NAME, TableName)
	b.u32(unix.NFTA_TABLE_FLAGS, 0)
	b.attr(nftaTableUserdata, udataString(udataTableComment, tableComment))
	b.end(m)
}

func (DeleteTable) encode(b *batch) {
	m := b.msg(unix.NFT_MSG_DELTABLE, 0)
	b.str(unix.NFTA_TABLE_NAME, TableName)
	b.end(m)
}

var hookNums = map[string]uint32{
	"prerouting": unix.NF_INET_PRE_ROUTING, "input": unix.NF_INET_LOCAL_IN, "forward": unix.NF_INET_FORWARD,
	"output": unix.NF_INET_LOCAL_OUT, "postrouting": unix.NF_INET_POST_ROUTING,
}

func (s AddChain) encode(b *batch) {
	num, ok := hookNums[s.Chain.Hook.Hook]
	if !ok {
		b.fail(fmt.Errorf("chain %s: unknown hook %q", s.Chain.Name, s.Chain.Hook.Hook))
	}
	m := b.msg(unix.NFT_MSG_NEWCHAIN, unix.NLM_F_CREATE)
	b.str(unix.NFTA_CHAIN_TABLE, TableName)
	b.str(unix.NFTA_CHAIN_NAME, s.Chain.Name)
	h := b.nest(unix.NFTA_CHAIN_HOOK)
	b.u32(unix.NFTA_HOOK_HOOKNUM, num)
	b.u32(unix.NFTA_HOOK_PRIORITY, uint32(s.Chain.Hook.Priority))
	b.endNest(h)
	b.u32(unix.NFTA_CHAIN_POLICY, nfAccept)
	b.str(unix.NFTA_CHAIN_TYPE, s.Chain.Hook.Type)
	b.end(m)
}

func (s FlushChain) encode(b *batch) {
	m := b.msg(unix.NFT_MSG_DELRULE, 0)
	b.str(unix.NFTA_RULE_TABLE, TableName)
	b.str(unix.NFTA_RULE_CHAIN, s.Chain)
	b.end(m)
}

func (s DeleteChain) encode(b *batch) {
	m := b.msg(unix.NFT_MSG_DELCHAIN, 0)
	b.str(unix.NFTA_CHAIN_TABLE, TableName)
	b.str(unix.NFTA_CHAIN_NAME, s.Chain)
	b.end(m)
}

// Set userdata, as libnftnl writes it (nft(8) reads it to print keys).
const (
	udataSetKeyByteorder = 0 // NFTNL_UDATA_SET_KEYBYTEORDER
	udataRuleComment     = 0 // NFTNL_UDATA_RULE_COMMENT
	udataTableComment    = 0 // NFTNL_UDATA_TABLE_COMMENT
	byteorderHost        = 1
	byteorderBig         = 2
)

func udataString(typ byte, s string) []byte {
	return append([]byte{typ, byte(len(s) + 1)}, append([]byte(s), 0)...)
}

func udataU32(typ byte, v uint32) []byte {
	d := []byte{typ, 4, 0, 0, 0, 0}
	binary.NativeEndian.PutUint32(d[2:], v)
	return d
}

func addrType(f snat.Family) (magic, length uint32) {
	if f == snat.IPv6 {
		return 8, 16 // ipv6_addr
	}
	return 7, 4 // ipv4_addr
}

func (s AddSet) encode(b *batch) {
	magic, length := addrType(s.Set.Family)
	b.setID++
	m := b.msg(unix.NFT_MSG_NEWSET, unix.NLM_F_CREATE)
	b.str(unix.NFTA_SET_TABLE, TableName)
	b.str(unix.NFTA_SET_NAME, s.Set.Name)
	b.u32(unix.NFTA_SET_FLAGS, 0)
	b.u32(unix.NFTA_SET_KEY_TYPE, magic)
	b.u32(unix.NFTA_SET_KEY_LEN, length)
	b.u32(unix.NFTA_SET_ID, b.setID)
	b.attr(unix.NFTA_SET_USERDATA, udataU32(udataSetKeyByteorder, byteorderBig))
	b.end(m)
}

func (s DeleteSet) encode(b *batch) {
	m := b.msg(unix.NFT_MSG_DELSET, 0)
	b.str(unix.NFTA_SET_TABLE, TableName)
	b.str(unix.NFTA_SET_NAME, s.Set)
	b.end(m)
}

func (s AddElements) encode(b *batch) {
	encodeElems(b, unix.NFT_MSG_NEWSETELEM, unix.NLM_F_CREATE, s.Set, 0, s.Elems)
}

func (s DeleteElements) encode(b *batch) {
	encodeElems(b, unix.NFT_MSG_DELSETELEM, 0, s.Set, 0, s.Elems)
}

// encodeElems writes e's elements in as many messages as the 64 KiB limit
// of one element list needs: 4,095 IPv4 or 2,340 IPv6 addresses each.
// The sizes are fixed, so the counting pass needs no loop per element.
func encodeElems(b *batch, typ int, flags uint16, set string, setID uint32, e Elems) {
	elemLen := 3*attrHdrLen + e.width // list elem { key { value } }
	per := maxAttrLen / elemLen
	for lo := 0; lo < e.Len(); lo += per {
		hi := min(lo+per, e.Len())
		m := b.msg(typ, flags)
		b.str(unix.NFTA_SET_ELEM_LIST_TABLE, TableName)
		b.str(unix.NFTA_SET_ELEM_LIST_SET, set)
		if setID != 0 {
			b.u32(unix.NFTA_SET_ELEM_LIST_SET_ID, setID)
		}
		list := b.nest(unix.NFTA_SET_ELEM_LIST_ELEMENTS)
		if b.count {
			b.n += (hi - lo) * elemLen
		} else {
			for i := lo; i < hi; i++ {
				el := b.nest(unix.NFTA_LIST_ELEM)
				k := b.nest(unix.NFTA_SET_ELEM_KEY)
				b.attr(unix.NFTA_DATA_VALUE, e.key(i))
				b.endNest(k)
				b.endNest(el)
			}
		}
		b.endNest(list)
		b.end(m)
	}
}

func (s AddRule) encode(b *batch) {
	r := s.Rule
	var mapID uint32
	if r.Action.Kind == ActSNAT && len(r.Action.To) > 1 {
		mapID = b.spreadMap(r.Family, r.Action.To)
	}
	exprs, err := ruleExprs(r, mapID)
	if err != nil {
		b.fail(fmt.Errorf("rule %s: %w", r, err))
		return
	}
	m := b.msg(unix.NFT_MSG_NEWRULE, unix.NLM_F_CREATE|unix.NLM_F_APPEND)
	b.str(unix.NFTA_RULE_TABLE, TableName)
	b.str(unix.NFTA_RULE_CHAIN, s.Chain)
	list := b.nest(unix.NFTA_RULE_EXPRESSIONS)
	for _, e := range exprs {
		d, err := expr.Marshal(unix.NFPROTO_INET, e)
		if err != nil {
			b.fail(fmt.Errorf("rule %s: %w", r, err))
			return
		}
		el := b.nest(unix.NFTA_LIST_ELEM)
		b.put(d)
		b.endNest(el)
	}
	b.endNest(list)
	if r.Comment != "" {
		if len(r.Comment) > 250 {
			b.fail(fmt.Errorf("rule %s: comment of %d bytes is longer than userdata holds", r, len(r.Comment)))
			return
		}
		b.attr(unix.NFTA_RULE_USERDATA, udataString(udataRuleComment, r.Comment))
	}
	b.end(m)
}

// spreadMap writes the anonymous map from numgen's counter to the
// addresses a spread rule takes in turn, and returns its transaction id:
// the kernel names it (__mapN) and binds it to the rule, and deletes it
// with the rule.
func (b *batch) spreadMap(f snat.Family, to []netip.Addr) uint32 {
	magic, length := addrType(f)
	b.setID++
	id := b.setID
	m := b.msg(unix.NFT_MSG_NEWSET, unix.NLM_F_CREATE)
	b.str(unix.NFTA_SET_TABLE, TableName)
	b.str(unix.NFTA_SET_NAME, "__map%d")
	b.u32(unix.NFTA_SET_FLAGS, unix.NFT_SET_ANONYMOUS|unix.NFT_SET_CONSTANT|unix.NFT_SET_MAP)
	b.u32(unix.NFTA_SET_KEY_TYPE, 4) // integer
	b.u32(unix.NFTA_SET_KEY_LEN, 4)
	b.u32(unix.NFTA_SET_DATA_TYPE, magic)
	b.u32(unix.NFTA_SET_DATA_LEN, length)
	d := b.nest(unix.NFTA_SET_DESC)
	b.u32(unix.NFTA_SET_DESC_SIZE, uint32(len(to)))
	b.endNest(d)
	b.u32(unix.NFTA_SET_ID, id)
	b.attr(unix.NFTA_SET_USERDATA, udataU32(udataSetKeyByteorder, byteorderHost))
	b.end(m)

	m = b.msg(unix.NFT_MSG_NEWSETELEM, unix.NLM_F_CREATE)
	b.str(unix.NFTA_SET_ELEM_LIST_TABLE, TableName)
	b.str(unix.NFTA_SET_ELEM_LIST_SET, "__map%d")
	b.u32(unix.NFTA_SET_ELEM_LIST_SET_ID, id)
	list := b.nest(unix.NFTA_SET_ELEM_LIST_ELEMENTS)
	for i, a := range to {
		el := b.nest(unix.NFTA_LIST_ELEM)
		k := b.nest(unix.NFTA_SET_ELEM_KEY)
		b.attr(unix.NFTA_DATA_VALUE, native32(uint32(i)))
		b.endNest(k)
		v := b.nest(unix.NFTA_SET_ELEM_DATA)
		b.attr(unix.NFTA_DATA_VALUE, a.AsSlice())
		b.endNest(v)
		b.endNest(el)
	}
	b.endNest(list)
	b.end(m)
	return id
}

func native32(v uint32) []byte {
	d := make([]byte, 4)
	binary.NativeEndian.PutUint32(d, v)
	return d
}

// Network header offsets of the addresses.
func addrOffsets(f snat.Family) (src, dst uint32) {
	if f == snat.IPv6 {
		return 8, 24
	}
	return 12, 16
}

func nfproto(f snat.Family) byte {
	if f == snat.IPv6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

// ifname is an interface name as oifname compares it: padded with NULs to
// IFNAMSIZ, so the match is exact.
func ifname(s string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, s)
	return b
}

const reg = 1 // NFT_REG_1: 16 bytes, room for an IPv6 address

// regPortLo and regPortHi hold a port range's ends for SNAT (NFT_REG_2 and
// NFT_REG_3, as nft(8) uses them), each port in network order.
const (
	regPortLo = 2
	regPortHi = 3
)

// l4protos are the protocols a rule's Proto names, by their numbers.
var l4protos = map[string]byte{"tcp": unix.IPPROTO_TCP, "udp": unix.IPPROTO_UDP}

// portExprs load a port range into regPortLo and regPortHi; none for the
// zero range.
func portExprs(p snat.Ports) []expr.Any {
	if p.IsZero() {
		return nil
	}
	return []expr.Any{
		&expr.Immediate{Register: regPortLo, Data: binary.BigEndian.AppendUint16(nil, p.Lo)},
		&expr.Immediate{Register: regPortHi, Data: binary.BigEndian.AppendUint16(nil, p.Hi)},
	}
}

// matchAddr loads an address field and compares it with p: the whole
// address, or the masked prefix.
func matchAddr(off uint32, p netip.Prefix) []expr.Any {
	f := snat.FamilyOf(p.Addr())
	n := uint32(p.Addr().BitLen() / 8)
	out := []expr.Any{&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}}
	if p.Bits() < p.Addr().BitLen() {
		out = append(out, &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: n,
			Mask: maskAddr(f, p.Bits()).AsSlice(), Xor: make([]byte, n)})
	}
	return append(out, &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: p.Masked().Addr().AsSlice()})
}

// markBits sets the mark of ours to v in reg, keeping the other bits:
// (reg & ~MarkMask) ^ v.
func markBits(v uint32) *expr.Bitwise {
	return &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: native32(^uint32(MarkMask)), Xor: native32(v)}
}

// ours keeps the mark of ours in reg: reg & MarkMask.
func ours() *expr.Bitwise {
	return &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: native32(MarkMask), Xor: native32(0)}
}

// ruleExprs turns a rule into expressions, in the order the fields are
// documented. mapID is the spread map's transaction id.
func ruleExprs(r Rule, mapID uint32) ([]expr.Any, error) {
	var out []expr.Any
	add := func(e ...expr.Any) { out = append(out, e...) }
	srcOff, dstOff := addrOffsets(r.Family)
	if r.Family != 0 {
		add(&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: reg}, &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{nfproto(r.Family)}})
	}
	if (r.Src.IsValid() || r.Dst.IsValid() || r.Set != "" || r.Action.Kind == ActSNAT) && r.Family == 0 {
		return nil, fmt.Errorf("an address match or SNAT needs the rule's family")
	}
	for _, c := range []struct {
		on   bool
		mask uint32
	}{{r.CtNew, ctStateNew}, {r.CtNewOrInvalid, ctStateNew | ctStateInvalid}} {
		if c.on {
			add(&expr.Ct{Key: expr.CtKeySTATE, Register: reg},
				&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: native32(c.mask), Xor: native32(0)},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: reg, Data: native32(0)})
		}
	}
	if r.Unmarked {
		add(&expr.Meta{Key: expr.MetaKeyMARK, Register: reg}, ours(), &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: native32(0)})
	}
	if r.Out != "" {
		add(&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: reg}, &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: ifname(r.Out)})
	}
	if r.Forwarded {
		add(&expr.Fib{Register: reg, FlagSADDR: true, ResultADDRTYPE: true},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: reg, Data: native32(unix.RTN_LOCAL)})
	}
	if r.Src.IsValid() {
		add(matchAddr(srcOff, r.Src)...)
	}
	if r.HasUID {
		add(&expr.Meta{Key: expr.MetaKeySKUID, Register: reg}, &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: native32(r.UID)})
	}
	if r.Cgroup != "" {
		rev, info := cgroupInfo(r.Cgroup)
		add(&expr.Match{Name: "cgroup", Rev: rev, Info: &info})
	}
	switch {
	case r.Dst.IsValid():
		add(matchAddr(dstOff, r.Dst)...)
	case r.Set != "":
		n := uint32(maskAddr(r.Family, 0).BitLen() / 8)
		add(&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: dstOff, Len: n})
		if r.SetBits < int(n*8) {
			add(&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: n, Mask: maskAddr(r.Family, r.SetBits).AsSlice(), Xor: make([]byte, n)})
		}
		add(&expr.Lookup{SourceRegister: reg, SetName: r.Set})
	}
	if r.Proto != "" {
		p, ok := l4protos[r.Proto]
		if !ok {
			return nil, fmt.Errorf("protocol %q is not tcp or udp", r.Proto)
		}
		add(&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg}, &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{p}})
	}
	if r.DPort != 0 {
		if r.Proto == "" {
			return nil, fmt.Errorf("a destination port needs a protocol match")
		}
		// th dport: the transport header's bytes 2-3, TCP's and UDP's alike.
		add(&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: binary.BigEndian.AppendUint16(nil, r.DPort)})
	}
	if r.Counter {
		add(&expr.Counter{})
	}
	switch a := r.Action; a.Kind {
	case ActSNAT:
		nat := &expr.NAT{Type: expr.NATTypeSourceNAT, Family: uint32(nfproto(r.Family)), RegAddrMin: reg}
		if !a.Ports.IsZero() {
			if r.Proto == "" || a.Pool.IsValid() {
				return nil, fmt.Errorf("a port range needs a protocol match and addresses")
			}
			// Loaded after the address (a spread's lookup writes
			// register 1), each port in its own register.
			nat.RegProtoMin, nat.RegProtoMax, nat.Specified = regPortLo, regPortHi, true
		}
		ports := portExprs(a.Ports)
		if a.Pool.IsValid() {
			if r.Family != snat.IPv6 || (a.Sticky == snat.StickyPeriod) != (len(a.To) == 1) || len(a.To) > 1 {
				return nil, fmt.Errorf("pool %s per %s with sources %v: a pool is IPv6, with one address of it for a period and none else", a.Pool, a.Sticky, a.To)
			}
			at := netip.Addr{}
			if len(a.To) == 1 {
				at = a.To[0]
			}
			add(poolExprs(a.Pool, a.Sticky, at)...)
			add(nat)
			break
		}
		switch len(a.To) {
		case 0:
			return nil, fmt.Errorf("snat without an address")
		case 1:
			add(&expr.Immediate{Register: reg, Data: a.To[0].AsSlice()})
			add(ports...)
			add(nat)
		default:
			add(&expr.Numgen{Register: reg, Modulus: uint32(len(a.To)), Type: unix.NFT_NG_INCREMENTAL},
				&expr.Lookup{SourceRegister: reg, DestRegister: reg, IsDestRegSet: true, SetName: "__map%d", SetID: mapID})
			add(ports...)
			add(nat)
		}
	case ActAccept:
		add(&expr.Verdict{Kind: expr.VerdictAccept})
	case ActReturn:
		add(&expr.Verdict{Kind: expr.VerdictReturn})
	case ActDrop:
		add(&expr.Verdict{Kind: expr.VerdictDrop})
	case ActCount:
	case ActMark:
		add(&expr.Meta{Key: expr.MetaKeyMARK, Register: reg}, markBits(a.Mark), &expr.Meta{Key: expr.MetaKeyMARK, Register: reg, SourceRegister: true})
	case ActRestoreMark:
		add(&expr.Ct{Key: expr.CtKeyMARK, Register: reg}, ours(), &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: native32(a.Mark)},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: reg}, markBits(a.Mark), &expr.Meta{Key: expr.MetaKeyMARK, Register: reg, SourceRegister: true})
	case ActSaveMark:
		add(&expr.Meta{Key: expr.MetaKeyMARK, Register: reg}, ours(), &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: native32(a.Mark)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: reg}, markBits(a.Mark), &expr.Ct{Key: expr.CtKeyMARK, Register: reg, SourceRegister: true})
	default:
		return nil, fmt.Errorf("unknown action %q", a.Kind)
	}
	return out, nil
}

// The xt cgroup match's info (linux/netfilter/xt_cgroup.h): revision 2
// holds a path of up to 511 bytes in 512, revision 1 one of up to 4095 in
// 4096; iptables picks the same way. The kernel's pointer at the end is
// aligned to 8, and the whole to 8 (XT_ALIGN).
const (
	cgroupPathV2 = 512
	cgroupPathV1 = 4096
	cgroupInfoV2 = 528  // 4 + 512, pointer at 520
	cgroupInfoV1 = 4112 // 4 + 4096 + classid 4, pointer at 4104
)

func cgroupInfo(path string) (uint32, xt.Unknown) {
	if len(path) < cgroupPathV2 {
		info := make(xt.Unknown, cgroupInfoV2)
		info[0] = 1 // has_path
		copy(info[4:4+cgroupPathV2-1], path)
		return 2, info
	}
	info := make(xt.Unknown, cgroupInfoV1)
	info[0] = 1
	copy(info[4:4+cgroupPathV1-1], path)
	return 1, info
}

// cgroupPath reads the path back from a cgroup match's info.
func cgroupPath(rev uint32, info []byte) (string, bool) {
	var size, room int
	switch rev {
	case 2:
		size, room = cgroupInfoV2, cgroupPathV2
	case 1:
		size, room = cgroupInfoV1, cgroupPathV1
	default:
		return "", false
	}
	if len(info) != size || info[0] != 1 || info[1] != 0 || info[2] != 0 || info[3] != 0 {
		return "", false // no path, a classid, or inverted: not ours
	}
	p := info[4 : 4+room]
	for i, c := range p {
		if c == 0 {
			return string(p[:i]), i > 0
		}
	}
	return "", false
}

// Kernel constants x/sys/unix lacks.
const (
	nftaTableUserdata = 6 // NFTA_TABLE_USERDATA
	nfAccept          = 1 // NF_ACCEPT
	ctStateNew        = 8 // NF_CT_STATE_BIT(IP_CT_NEW)
	ctStateInvalid    = 1 // NF_CT_STATE_INVALID_BIT
)
