package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Packet is one IPv4 packet a Sniffer received: when the kernel received
// it, the Ethernet source (which neighbour sent it), and its addresses,
// protocol and ports.
type Packet struct {
	At       time.Time
	SrcMAC   [6]byte
	Src, Dst netip.Addr
	Proto    uint8
	// SrcPort and DstPort are those of TCP and UDP; 0 for other protocols.
	SrcPort, DstPort uint16
	// TCPFlags are the TCP header's flags (FIN 0x01, SYN 0x02, RST 0x04,
	// ACK 0x10); 0 for other protocols.
	TCPFlags uint8
}

// TCP flags of Packet.TCPFlags.
const (
	TCPFin = 0x01
	TCPSyn = 0x02
	TCPRst = 0x04
	TCPAck = 0x10
)

// Sniffer records every IPv4 packet that arrives at one interface of a
// namespace, with the kernel's receive timestamp, through an AF_PACKET
// socket of the test process. It is how the HA lab's far side knows which
// gateway sent a packet (by its MAC address) and from which source address:
// a packet that leaves a gateway untranslated never completes a handshake,
// so only a capture sees it.
type Sniffer struct {
	fd   int
	mu   sync.Mutex
	pkts []Packet
	stop chan struct{}
	done chan struct{}
}

// Sniff starts recording what arrives at dev in namespace ns (outgoing
// packets are left out). keep, if not nil, selects the packets to keep.
// The capture stops at t's cleanup, or with Stop.
func Sniff(t testing.TB, ns, dev string, keep func(*Packet) bool) *Sniffer {
	t.Helper()
	s := &Sniffer{fd: -1, stop: make(chan struct{}), done: make(chan struct{})}
	err := Do(ns, func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_IP)))
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		s.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifi.Index}); err != nil {
			return fmt.Errorf("bind to %s: %w", dev, err)
		}
		// A burst of a few thousand packets while the test goroutines are
		// busy must not overflow the socket.
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
			return fmt.Errorf("SO_TIMESTAMPNS: %w", err)
		}
		// Wake up now and then to see Stop.
		tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	if err != nil {
		if s.fd >= 0 {
			unix.Close(s.fd)
		}
		t.Fatalf("lab: sniff %s in %s: %v", dev, ns, err)
	}
	go s.run(keep)
	t.Cleanup(s.Stop)
	return s
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (s *Sniffer) run(keep func(*Packet) bool) {
	defer close(s.done)
	buf := make([]byte, 256) // headers are all it reads; the rest is truncated
	oob := make([]byte, 128)
	for {
		select {
		case <-s.stop:
			return
		default:
		}
		n, oobn, _, from, err := unix.Recvmsg(s.fd, buf, oob, unix.MSG_TRUNC)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		p, ok := parseIPv4(buf[:min(n, len(buf))])
		if !ok {
			continue
		}
		p.At = rxTime(oob[:oobn])
		if keep != nil && !keep(&p) {
			continue
		}
		s.mu.Lock()
		s.pkts = append(s.pkts, p)
		s.mu.Unlock()
	}
}

// rxTime is the kernel's receive time from SCM_TIMESTAMPNS, or now.
func rxTime(oob []byte) time.Time {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err == nil {
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_TIMESTAMPNS && len(m.Data) >= 16 {
				sec := int64(binary.NativeEndian.Uint64(m.Data[0:8]))
				nsec := int64(binary.NativeEndian.Uint64(m.Data[8:16]))
				return time.Unix(sec, nsec)
			}
		}
	}
	return time.Now()
}

// parseIPv4 reads an Ethernet frame (SOCK_RAW keeps the link header): the
// source MAC, the IPv4 header and, for TCP and UDP, the ports and flags.
func parseIPv4(frame []byte) (Packet, bool) {
	var p Packet
	if len(frame) < 14+20 {
		return p, false
	}
	copy(p.SrcMAC[:], frame[6:12])
	ip := frame[14:]
	if ip[0]>>4 != 4 {
		return p, false
	}
	ihl := int(ip[0]&0x0f) * 4
	if ihl < 20 || len(ip) < ihl {
		return p, false
	}
	p.Proto = ip[9]
	p.Src = netip.AddrFrom4([4]byte(ip[12:16]))
	p.Dst = netip.AddrFrom4([4]byte(ip[16:20]))
	fragOff := binary.BigEndian.Uint16(ip[6:8]) & 0x1fff
	l4 := ip[ihl:]
	if fragOff == 0 && (p.Proto == unix.IPPROTO_TCP || p.Proto == unix.IPPROTO_UDP) && len(l4) >= 4 {
		p.SrcPort = binary.BigEndian.Uint16(l4[0:2])
		p.DstPort = binary.BigEndian.Uint16(l4[2:4])
		if p.Proto == unix.IPPROTO_TCP && len(l4) >= 14 {
			p.TCPFlags = l4[13]
		}
	}
	return p, true
}

// Packets returns a copy of what was recorded so far, in arrival order.
func (s *Sniffer) Packets() []Packet {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Packet(nil), s.pkts...)
}

// Reset forgets what was recorded so far.
func (s *Sniffer) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pkts = nil
}

// Dropped returns how many packets the socket dropped since the last call
// (its receive buffer overflowed): a measurement with drops is incomplete.
func (s *Sniffer) Dropped() uint32 {
	st, err := unix.GetsockoptTpacketStats(s.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
	if err != nil {
		return 0
	}
	return st.Drops
}

// Stop ends the capture; the packets stay readable. Calling it again does
// nothing.
func (s *Sniffer) Stop() {
	select {
	case <-s.stop:
		return
	default:
	}
	close(s.stop)
	<-s.done
	unix.Close(s.fd)
}
