package lab

import (
	"net/netip"
	"testing"
)

// A leak is an orphan only when another gateway opened its connection.
func TestOpenedElsewhere(t *testing.T) {
	p := Packet{Src: netip.MustParseAddr("10.50.0.12"), Dst: netip.MustParseAddr("198.51.100.10"), Proto: 6, SrcPort: 49797, DstPort: 7102, TCPFlags: TCPFin | 0x10}
	ct := []Event{{Node: "b", What: "[NEW] tcp 6 120 SYN_SENT src=10.50.0.12 dst=198.51.100.10 sport=49797 dport=7102 [UNREPLIED] src=198.51.100.10 dst=192.0.2.100 sport=7102 dport=49797"}}
	if !openedElsewhere(ct, "a", p) {
		t.Error("opened on b, leaked via a: want an orphan")
	}
	if openedElsewhere(ct, "b", p) {
		t.Error("opened on b, leaked via b: not an orphan")
	}
	p.SrcPort = 4979 // a prefix of the other's port
	if openedElsewhere(ct, "a", p) {
		t.Error("another connection's NEW matched")
	}
}
