package conntrack

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Usage is what live flows and sockets hold of the host's addresses: what
// removing a rule must not take away from them (a NAT binding needs the
// kernel's NAT to stay registered; a connection from an address on another
// interface needs that address's reply route).
type Usage struct {
	// Translated counts the live flows whose source was translated to
	// each address (their replies are addressed to it).
	Translated map[netip.Addr]int
	// Sources counts the live flows and connected sockets that leave with
	// each address as their own source.
	Sources map[netip.Addr]int
}

// tcpLive are the socket states of a connection that still sends: all but
// TIME_WAIT (6), CLOSE (7) and LISTEN (10), as numbered in the kernel's
// tcp_states.h.
var tcpLive = map[uint8]bool{1: true, 2: true, 3: true, 4: true, 5: true, 8: true, 9: true, 11: true}

// ReadUsage reads both families' conntrack tables and TCP and UDP sockets
// (conntrack through h, nil: a handle of the caller's namespace; sockets
// in the process's namespace). Its cost grows with
// the flows on the host, so callers read it only when a change would take
// something away.
func ReadUsage(h *netlink.Handle) (Usage, error) {
	u := Usage{Translated: map[netip.Addr]int{}, Sources: map[netip.Addr]int{}}
	for _, fam := range []int{4, 6} {
		flows, err := Netlink{Handle: h}.Flows(fam)
		if err != nil {
			return u, err
		}
		for _, f := range flows {
			if !f.Live() {
				continue
			}
			if to := f.TranslatedSource().Addr(); to != f.Orig.Src.Addr() {
				u.Translated[to]++
			} else {
				u.Sources[to]++
			}
		}
	}
	// Sockets through netlink's default handle, which opens a sock_diag
	// socket in this process's namespace (h has no such socket).
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		tcp, err := netlink.SocketDiagTCP(fam)
		if err != nil {
			return u, fmt.Errorf("listing TCP sockets: %w", err)
		}
		udp, err := netlink.SocketDiagUDP(fam)
		if err != nil {
			return u, fmt.Errorf("listing UDP sockets: %w", err)
		}
		for _, s := range tcp {
			if tcpLive[s.State] {
				count(u.Sources, s)
			}
		}
		for _, s := range udp {
			// A UDP socket bound to an address sends from it whether or
			// not it is connected.
			count(u.Sources, s)
		}
	}
	return u, nil
}

func count(m map[netip.Addr]int, s *netlink.Socket) {
	if a, ok := netip.AddrFromSlice(s.ID.Source); ok && !a.Unmap().IsUnspecified() {
		m[a.Unmap()]++
	}
}
