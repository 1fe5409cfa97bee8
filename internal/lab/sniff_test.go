package lab

import (
	"net/netip"
	"testing"
	"time"
)

// TestParseIPv4 reads the fields the HA lab's far side judges by out of
// hand-made frames: the sender's MAC, the addresses, and for TCP and UDP
// the ports (and TCP's flags); a fragment's payload is not taken for ports.
func TestParseIPv4(t *testing.T) {
	frame := func(proto byte, fragOff uint16, l4 ...byte) []byte {
		f := []byte{
			0x02, 0, 0, 0, 0, 0x01, // destination MAC
			0x02, 0, 0, 0, 0x0a, 0x02, // source MAC
			0x08, 0x00, // IPv4
			0x45, 0, 0, 0, 0, 0, byte(fragOff >> 8), byte(fragOff), 64, proto, 0, 0,
			192, 0, 2, 100, // source
			198, 51, 100, 10, // destination
		}
		return append(f, l4...)
	}
	tcp := []byte{0xd9, 0x03, 0x1b, 0xbc, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, TCPSyn | TCPAck}
	for _, tc := range []struct {
		name  string
		frame []byte
		ok    bool
		want  Packet
	}{
		{"tcp", frame(6, 0, tcp...), true, Packet{Proto: 6, SrcPort: 55555, DstPort: 7100, TCPFlags: TCPSyn | TCPAck}},
		{"udp", frame(17, 0, 0x1b, 0xbd, 0x1b, 0xbd, 0, 8, 0, 0), true, Packet{Proto: 17, SrcPort: 7101, DstPort: 7101}},
		{"icmp", frame(1, 0, 8, 0, 0, 0), true, Packet{Proto: 1}},
		{"fragment", frame(6, 0x0010, tcp...), true, Packet{Proto: 6}},
		{"short", frame(6, 0)[:20], false, Packet{}},
		{"not IPv4", append(frame(6, 0)[:14], 0x60), false, Packet{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := parseIPv4(tc.frame)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v", ok, tc.ok)
			}
			if !ok {
				return
			}
			tc.want.SrcMAC = [6]byte{0x02, 0, 0, 0, 0x0a, 0x02}
			tc.want.Src = netip.MustParseAddr("192.0.2.100")
			tc.want.Dst = netip.MustParseAddr("198.51.100.10")
			if got != tc.want {
				t.Errorf("parseIPv4 = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestMedian(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var out []time.Duration
		for _, x := range v {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	for _, tc := range []struct {
		in   []time.Duration
		want time.Duration
	}{
		{nil, 0},
		{ms(5), 5 * time.Millisecond},
		{ms(9, 1, 5), 5 * time.Millisecond},
		{ms(4, 1, 3, 2), 2500 * time.Microsecond},
	} {
		if got := Median(tc.in); got != tc.want {
			t.Errorf("Median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}
