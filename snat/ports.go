package snat

import (
	"fmt"
	"strconv"
	"strings"
)

// Ports is the range of source ports a rule's SNAT gives new connections
// (--to-ports 40000-40099, to-ports:): the kernel then picks a free port of
// the range for each (address, destination, destination port, protocol),
// and a connection that finds none fails. The zero value gives the kernel
// its own range, the usual case. A range is for operators who must keep
// translated ports apart from others (a firewall upstream that lets only
// some through), and for a lab that wants to see the ports run out.
//
// A port range needs a protocol with ports: both kernels refuse SNAT to a
// port range in a rule that does not match TCP or UDP first. The backends
// write the rule once for TCP and once for UDP with the range, and once
// without it for the rest (ICMP), which keeps the kernel's choice.
type Ports struct{ Lo, Hi uint16 }

// PortProtocols are the protocols a rule's port range applies to, in the
// order the backends write their rules.
var PortProtocols = []string{"tcp", "udp"}

// IsZero reports whether p is no range: the kernel's own.
func (p Ports) IsZero() bool { return p == Ports{} }

// Size is how many ports the range holds.
func (p Ports) Size() int {
	if p.IsZero() {
		return 0
	}
	return int(p.Hi) - int(p.Lo) + 1
}

// String is "40000-40099", or "40000" for a range of one port.
func (p Ports) String() string {
	if p.Lo == p.Hi {
		return strconv.Itoa(int(p.Lo))
	}
	return fmt.Sprintf("%d-%d", p.Lo, p.Hi)
}

// ParsePorts reads --to-ports and to-ports:: "LO-HI" or one port, from 1
// to 65535, LO not above HI. "" is the zero value. Errors name the value.
func ParsePorts(s string) (Ports, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Ports{}, nil
	}
	lo, hi, ranged := strings.Cut(s, "-")
	if !ranged {
		hi = lo
	}
	l, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	h, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	switch {
	case err1 != nil || err2 != nil:
		return Ports{}, Invalid("ports %s: want a range LO-HI of ports from 1 to 65535, such as 40000-40099", quoteItem(s))
	case l == 0:
		return Ports{}, Invalid("ports %s: port 0 is no port; want 1 to 65535", quoteItem(s))
	case l > h:
		return Ports{}, Invalid("ports %s: the range ends before it starts", quoteItem(s))
	}
	return Ports{Lo: uint16(l), Hi: uint16(h)}, nil
}
