package iptables

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/egress-snat/egress-snat/stats"
)

// toSource is a SNAT rule's --to-source value, as iptables-save prints it:
//
//	192.0.2.23  192.0.2.22-192.0.2.23  192.0.2.23:40000-40099
//	192.0.2.22-192.0.2.23:40000  2001:db8::22  2001:db8::22-2001:db8::23
//	[2001:db8::22]:40000-40099  [2001:db8::22-2001:db8::23]:40000
//
// (and [2001:db8::22]-[2001:db8::23], [2001:db8::22]). It is the one
// reader of the value: ParseRule takes only one address, what egress-snat
// writes; the scan of foreign rules and stats take the first address, and
// stats the port range.
type toSource struct {
	// From is the first address; To the last of a range, invalid for a
	// single address.
	From, To netip.Addr
	// Ports is the port range, when HasPorts.
	Ports    stats.PortRange
	HasPorts bool
}

// parseToSource reads a --to-source value; it fails, naming the value, on
// an address or a port range it cannot read.
func parseToSource(v string) (toSource, error) {
	var ts toSource
	bad := func(what string) (toSource, error) {
		return toSource{}, fmt.Errorf("--to-source %q: %s", v, what)
	}
	addrs, ports := v, ""
	if i := strings.LastIndexByte(v, ']'); i >= 0 {
		// IPv6 addresses are bracketed when a port follows.
		if v[0] != '[' {
			return bad("unbalanced brackets")
		}
		addrs = strings.NewReplacer("[", "", "]", "").Replace(v[:i])
		if rest := v[i+1:]; rest != "" {
			p, ok := strings.CutPrefix(rest, ":")
			if !ok {
				return bad("text after the address")
			}
			ports, ts.HasPorts = p, true
		}
	} else if strings.Count(v, ":") == 1 {
		// IPv4 with ports; a bare IPv6 address has more colons.
		addrs, ports, _ = strings.Cut(v, ":")
		ts.HasPorts = true
	}
	first, last, ranged := strings.Cut(addrs, "-")
	var err error
	if ts.From, err = netip.ParseAddr(first); err != nil {
		return bad("not an address")
	}
	if ranged {
		if ts.To, err = netip.ParseAddr(last); err != nil {
			return bad("not an address range")
		}
	}
	if ts.HasPorts {
		lo, hi, found := strings.Cut(ports, "-")
		if !found {
			hi = lo
		}
		l, err1 := strconv.ParseUint(lo, 10, 16)
		h, err2 := strconv.ParseUint(hi, 10, 16)
		if err1 != nil || err2 != nil || l > h {
			return bad("not a port range")
		}
		ts.Ports = stats.PortRange{Lo: uint16(l), Hi: uint16(h)}
	}
	return ts, nil
}
