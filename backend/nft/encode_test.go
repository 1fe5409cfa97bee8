package nft

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/snat"
)

// TestRuleRoundTrip: every rule shape ruleExprs writes, decodeRule reads
// back as the same rule.
func TestRuleRoundTrip(t *testing.T) {
	spread := addrs("192.0.2.22", "192.0.2.23", "192.0.2.24")
	rules := []Rule{
		hostRule("198.51.100.4", "192.0.2.22"),
		hostRule("198.51.100.0/24", "192.0.2.22"),
		hostRule("", "192.0.2.22"),
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Set: "d4-24-0123456789", SetBits: 24, Counter: true, Action: Action{Kind: ActSNAT, To: spread}},
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Set: "d4-32-0123456789", SetBits: 32, Counter: true, Action: Action{Kind: ActAccept}},
		// A weighted spread (snat.Weigh): an address once per turn.
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Dst: pfx("198.51.100.0/24"), Counter: true, Action: Action{Kind: ActSNAT, To: addrs("192.0.2.22", "192.0.2.22", "192.0.2.23", "192.0.2.22")}},
		{Family: snat.IPv4, Out: "eth0", Forwarded: true, Src: pfx("10.88.0.0/24"), Dst: pfx("198.51.100.4"), Counter: true, Action: Action{Kind: ActSNAT, To: addrs("192.0.2.22")}},
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), HasUID: true, UID: 0, Counter: true, Action: Action{Kind: ActSNAT, To: addrs("192.0.2.22")}},
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Cgroup: "system.slice/postfix.service", Counter: true, Action: Action{Kind: ActSNAT, To: addrs("192.0.2.22")}},
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Cgroup: strings.Repeat("long/", 200) + "x", Counter: true, Action: Action{Kind: ActSNAT, To: addrs("192.0.2.22")}},
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Set: "d6-64-0123456789", SetBits: 64, Counter: true, Action: Action{Kind: ActSNAT, To: addrs("2001:db8::22")}},
		{Family: snat.IPv6, Out: "eth0", Forwarded: true, Src: pfx("fd00:88::/64"), Dst: pfx("2001:db8:ffff::/48"), Counter: true, Action: Action{Kind: ActSNAT, To: addrs("2001:db8::22", "2001:db8::23")}},
		{Family: snat.IPv4, Unmarked: true, Src: pfx("192.0.2.250"), HasUID: true, UID: 4242, Dst: pfx("198.51.100.0/24"), Action: Action{Kind: ActMark, Mark: 0x01000000}},
		{Family: snat.IPv4, Src: pfx("192.0.2.250"), HasUID: true, UID: 4242, Dst: pfx("198.51.100.4"), Action: Action{Kind: ActReturn}},
		{Action: Action{Kind: ActRestoreMark, Mark: 0x02000000}},
		{Action: Action{Kind: ActSaveMark, Mark: 0}},
		{Action: Action{Kind: ActSaveMark, Mark: 0x02000000}},
		keeper,
		// Pools (pool.go): every stickiness, a host part of 64, of more
		// than 32 and of fewer bits.
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Counter: true, Action: Action{Kind: ActSNAT, Pool: pfx("2001:db8:1::/64"), Sticky: snat.StickyConnection}},
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Dst: pfx("2001:db8:ffff::/48"), Counter: true, Action: Action{Kind: ActSNAT, Pool: pfx("2001:db8:1::/64"), Sticky: snat.StickyDestination}},
		{Family: snat.IPv6, Out: "eth0", Forwarded: true, Src: pfx("fd00:88::/64"), Counter: true, Action: Action{Kind: ActSNAT, Pool: pfx("2001:db8:1::/80"), Sticky: snat.StickySender}},
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Counter: true, Action: Action{Kind: ActSNAT, Pool: pfx("2001:db8:1::/124"), Sticky: snat.StickyConnection}},
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Counter: true, Action: Action{Kind: ActSNAT, Pool: pfx("2001:db8:1::/100"), Sticky: snat.StickyDestination}},
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Counter: true, Action: Action{Kind: ActSNAT, Pool: pfx("2001:db8:1::/64"), Sticky: snat.StickyPeriod, To: addrs("2001:db8:1::abcd:1")}},
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Counter: true, Action: Action{Kind: ActSNAT, Pool: pfx("2001:db8:1::/124"), Sticky: snat.StickyPeriod, To: addrs("2001:db8:1::f")}},
		{Family: snat.IPv4, CtNewOrInvalid: true, Out: "eth0", Forwarded: true, Src: pfx("10.88.0.0/24"), Counter: true, Action: Action{Kind: ActDrop}},
		// Port ranges (snat.Ports): one address, a spread, a set; TCP
		// and UDP.
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Dst: pfx("203.0.113.7"), Proto: "tcp", Counter: true, Action: Action{Kind: ActSNAT, To: addrs("192.0.2.22"), Ports: snat.Ports{Lo: 40000, Hi: 40007}}},
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Dst: pfx("203.0.113.7"), Proto: "udp", Counter: true, Action: Action{Kind: ActSNAT, To: spread, Ports: snat.Ports{Lo: 40000, Hi: 40000}}},
		{Family: snat.IPv6, Out: "eth0", Src: pfx("2001:db8::250"), Set: "d6-64-0123456789", SetBits: 64, Proto: "tcp", Counter: true, Action: Action{Kind: ActSNAT, To: addrs("2001:db8::22"), Ports: snat.Ports{Lo: 1024, Hi: 65535}}},
		// Spill entries (snat/spill.go): a destination port, with and
		// without a port range.
		{Family: snat.IPv4, Out: "eth0", Src: pfx("192.0.2.250"), Dst: pfx("203.0.113.7"), Proto: "tcp", DPort: 443, Counter: true, Action: Action{Kind: ActSNAT, To: addrs("192.0.2.23"), Ports: snat.Ports{Lo: 40000, Hi: 40007}}},
		{Family: snat.IPv6, Out: "eth0", Forwarded: true, Src: pfx("fd00:88::/64"), Dst: pfx("2001:db8:ffff::4"), Proto: "udp", DPort: 53, Counter: true, Action: Action{Kind: ActSNAT, To: addrs("2001:db8::22", "2001:db8::23")}},
	}
	for _, r := range rules {
		exprs, err := ruleExprs(r, 1)
		if err != nil {
			t.Errorf("%s: %v", r, err)
			continue
		}
		got, err := decodeRule(exprs, func(string) ([]netip.Addr, error) { return r.Action.To, nil })
		if err != nil {
			t.Errorf("%s: %v", r, err)
			continue
		}
		got.Comment = r.Comment // userdata, not an expression
		if diff := cmp.Diff(r, got, cmpOpts); diff != "" {
			t.Errorf("%s: round trip (-want +got):\n%s", r, diff)
		}
	}
}

// TestEncodeTransaction: a transaction is the batch begin, the steps'
// messages with consecutive sequence numbers, only the last asking for an
// acknowledgement, no element list over netlink's 64 KiB, and the batch
// end; the elements are all there.
func TestEncodeTransaction(t *testing.T) {
	v4 := NewElems(snat.IPv4)
	for i := range 10000 {
		v4.Add(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}))
	}
	v6 := NewElems(snat.IPv6)
	for i := range 5000 {
		v6.Add(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(i >> 8), 15: byte(i)}))
	}
	p := Program{Steps: []Step{
		AddTable{},
		AddChain{Chain: Chain{Name: ChainNAT, Hook: natHook}},
		AddSet{Set: Set{Name: "d4-32-x", Family: snat.IPv4, Bits: 32}},
		AddElements{Set: "d4-32-x", Elems: v4},
		AddSet{Set: Set{Name: "d6-128-x", Family: snat.IPv6, Bits: 128}},
		AddElements{Set: "d6-128-x", Elems: v6},
		AddRule{Chain: ChainNAT, Rule: hostRule("198.51.100.4", "192.0.2.22")},
	}}
	buf, steps, err := encodeProgram(p, 100, 0)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := syscall.ParseNetlinkMessage(buf)
	if err != nil {
		t.Fatal(err)
	}
	// 10000/4095 -> 3 messages, 5000/2340 -> 3.
	if want := 2 + 5 + 3 + 3; len(msgs) != want || len(steps) != want-2 {
		t.Fatalf("%d messages (%d of steps), want %d", len(msgs), len(steps), want)
	}
	if msgs[0].Header.Type != unix.NFNL_MSG_BATCH_BEGIN || msgs[len(msgs)-1].Header.Type != unix.NFNL_MSG_BATCH_END {
		t.Errorf("batch: first %d, last %d", msgs[0].Header.Type, msgs[len(msgs)-1].Header.Type)
	}
	elems := map[int]int{}
	for i, m := range msgs {
		if m.Header.Seq != uint32(100+i) {
			t.Errorf("message %d: seq %d", i, m.Header.Seq)
		}
		if acked := m.Header.Flags&unix.NLM_F_ACK != 0; acked != (i == len(msgs)-2) {
			t.Errorf("message %d: ack %v", i, acked)
		}
		if m.Header.Type != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			t.Fatal(err)
		}
		for ad.Next() {
			if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
				continue
			}
			if len(ad.Bytes()) > maxAttrLen {
				t.Errorf("message %d: element list of %d bytes", i, len(ad.Bytes()))
			}
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					elems[len(nad.Bytes())]++
				}
				return nil
			})
		}
	}
	if elems[16-4] != 10000 || elems[28-4] != 5000 {
		t.Errorf("elements by size: %v, want 10000 of 12 bytes and 5000 of 24", elems)
	}
	if got := binary.NativeEndian.Uint32(buf); int(got) != int(msgs[0].Header.Len) {
		t.Errorf("header length %d", got)
	}
}
