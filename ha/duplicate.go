package ha

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// OtherHolders asks the link of iface who else answers for address a: an
// ARP probe (RFC 5227: sender address 0.0.0.0, so no neighbour learns
// anything from it) and the replies that come within wait, from hardware
// addresses other than iface's own. A master that finds one shares its
// virtual address with another node: both are master, a split brain (the
// VRRP path is cut, but the link still carries ARP). Only IPv4: the pair's
// virtual addresses are.
func OtherHolders(iface string, a netip.Addr, wait time.Duration) ([]net.HardwareAddr, error) {
	if !a.Is4() {
		return nil, fmt.Errorf("probing %s: only IPv4 addresses are probed by ARP", a)
	}
	ifi, err := net.InterfaceByName(iface)
	if err != nil {
		return nil, fmt.Errorf("probing %s on %s: %w", a, iface, err)
	}
	if len(ifi.HardwareAddr) != 6 {
		return nil, fmt.Errorf("probing %s on %s: not an Ethernet link", a, iface)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return nil, fmt.Errorf("probing %s on %s: %w", a, iface, err)
	}
	defer unix.Close(fd)
	ll := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifi.Index, Halen: 6}
	if err := unix.Bind(fd, ll); err != nil {
		return nil, fmt.Errorf("probing %s on %s: %w", a, iface, err)
	}
	copy(ll.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	if err := unix.Sendto(fd, arpProbe(ifi.HardwareAddr, a), 0, ll); err != nil {
		return nil, fmt.Errorf("probing %s on %s: %w", a, iface, err)
	}
	var others []net.HardwareAddr
	deadline := time.Now().Add(wait)
	buf := make([]byte, 128)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return others, nil
		}
		tv := unix.NsecToTimeval(left.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return others, err
		}
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if err != nil {
			return others, fmt.Errorf("probing %s on %s: %w", a, iface, err)
		}
		if mac, ok := arpReplyFor(buf[:n], a); ok && !bytes.Equal(mac, ifi.HardwareAddr) &&
			!slices.ContainsFunc(others, func(o net.HardwareAddr) bool { return bytes.Equal(o, mac) }) {
			others = append(others, mac)
		}
	}
}

// arpProbe is an ARP request for a from mac with sender address 0.0.0.0.
func arpProbe(mac net.HardwareAddr, a netip.Addr) []byte {
	p := make([]byte, 28)
	binary.BigEndian.PutUint16(p[0:], 1)      // Ethernet
	binary.BigEndian.PutUint16(p[2:], 0x0800) // IPv4
	p[4], p[5] = 6, 4
	binary.BigEndian.PutUint16(p[6:], 1) // request
	copy(p[8:14], mac)
	// p[14:18], the sender address, stays 0.0.0.0; p[18:24], the target
	// hardware address, stays zero.
	t := a.As4()
	copy(p[24:28], t[:])
	return p
}

// arpReplyFor returns the sender hardware address of an ARP reply from a.
func arpReplyFor(p []byte, a netip.Addr) (net.HardwareAddr, bool) {
	if len(p) < 28 || binary.BigEndian.Uint16(p[6:]) != 2 || p[4] != 6 || p[5] != 4 {
		return nil, false
	}
	if from, ok := netip.AddrFromSlice(p[14:18]); !ok || from != a {
		return nil, false
	}
	return net.HardwareAddr(slices.Clone(p[8:14])), true
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
