package selector

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// PrefixUse is what the host already does with the addresses of an IPv6
// prefix that is to be a pool of source addresses (see snat's pool.go):
// its own addresses inside it, and the routes that put part of it on a
// link, where neighbours would ask for each address by neighbour
// discovery.
type PrefixUse struct {
	Addrs  []PrefixAddr
	OnLink []OnLinkRoute
}

// PrefixAddr is an address of the host inside the prefix.
type PrefixAddr struct {
	Addr  netip.Prefix
	Iface string
}

// OnLinkRoute is a route without a gateway that overlaps the prefix: its
// addresses are on Iface's link. ProxyNDP says neighbour proxying is on
// there (net.ipv6.conf.IFACE.proxy_ndp or .all.proxy_ndp): what an NDP
// proxy such as ndppd needs to answer for them.
type OnLinkRoute struct {
	Route    netip.Prefix
	Table    int
	Iface    string
	ProxyNDP bool
}

// ProxyNDP reads whether neighbour proxying is on for iface, in the
// caller's network namespace. A variable so tests of other namespaces or
// fakes can answer for it.
var ProxyNDP = func(iface string) (bool, error) {
	on := false
	for _, conf := range []string{"all", iface} {
		b, err := os.ReadFile("/proc/sys/net/ipv6/conf/" + conf + "/proxy_ndp")
		if err != nil {
			return false, fmt.Errorf("reading net.ipv6.conf.%s.proxy_ndp: %w", conf, err)
		}
		on = on || strings.TrimSpace(string(b)) != "0"
	}
	return on, nil
}

// PrefixUse finds the host's addresses inside p, of any interface, and the
// routes of any table but those skip names (egress-snat's own) and the
// local table (its routes are the host's addresses) that put part of p
// on-link: unicast, without a gateway, not through lo. A default route is
// not counted: it names no prefix of its own.
//
// The answer is remembered until Forget, as the host's addresses are, so
// that a pool given for 100,000 destinations lists the routes once; skip
// must therefore be the same between Forgets (egress-snat passes its own
// tables, routes.OurTable).
func (s *Selector) PrefixUse(p netip.Prefix, skip func(table int) bool) (PrefixUse, error) {
	if u, ok := s.prefixUse[p]; ok {
		return u, nil
	}
	u, err := s.prefixUse1(p, skip)
	if err != nil {
		return u, err
	}
	if s.prefixUse == nil {
		s.prefixUse = map[netip.Prefix]PrefixUse{}
	}
	s.prefixUse[p] = u
	return u, nil
}

func (s *Selector) prefixUse1(p netip.Prefix, skip func(table int) bool) (PrefixUse, error) {
	var u PrefixUse
	fam := netlink.FAMILY_V6
	if p.Addr().Is4() {
		fam = netlink.FAMILY_V4
	}
	addrs, err := s.hostAddrs(fam)
	if err != nil {
		return u, err
	}
	for _, x := range addrs {
		a, ok := prefixFrom(x.IPNet)
		if !ok || !p.Contains(a.Addr()) {
			continue
		}
		name := fmt.Sprint(x.LinkIndex)
		if l, err := s.link(x.LinkIndex); err == nil {
			name = l.Attrs().Name
		}
		u.Addrs = append(u.Addrs, PrefixAddr{Addr: a, Iface: name})
	}
	routes, err := s.nl.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return u, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		dst, ok := prefixFrom(r.Dst)
		if !ok || dst.Bits() == 0 || !dst.Masked().Overlaps(p) || r.Gw != nil || len(r.MultiPath) > 0 ||
			r.Type != unix.RTN_UNICAST || r.Table == unix.RT_TABLE_LOCAL || (skip != nil && skip(r.Table)) {
			continue
		}
		l, err := s.link(r.LinkIndex)
		if err != nil {
			return u, fmt.Errorf("interface of route %s (index %d): %w", dst, r.LinkIndex, err)
		}
		name := l.Attrs().Name
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		proxy, err := ProxyNDP(name)
		if err != nil {
			return u, err
		}
		u.OnLink = append(u.OnLink, OnLinkRoute{Route: dst.Masked(), Table: r.Table, Iface: name, ProxyNDP: proxy})
	}
	return u, nil
}
