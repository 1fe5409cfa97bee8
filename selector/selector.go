// Package selector answers one question: for a destination, which route does
// the kernel take and which source address does it naturally choose, and why?
//
// It asks the kernel itself (RTM_GETROUTE, the call behind `ip route get`)
// instead of re-implementing source address selection, so its answer for a
// host destination is by construction the one `ip route get` prints. The only
// logic of its own is the explanation: which of the kernel's rules produced
// that source.
package selector

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNoRoute means the kernel has no route for the destination.
var ErrNoRoute = errors.New("no route")

// IsInput reports whether err says that the destination, interface or
// address asked about cannot work on this host as it is (no route, not a
// local address, the wrong or an unknown interface, a destination that is
// not sent out), as opposed to a failure of netlink itself. Only the former
// is the operator's to fix; callers give it the bad-input exit status.
func IsInput(err error) bool {
	var in inputError
	return errors.Is(err, ErrNoRoute) || errors.Is(err, ErrNotLocal) || errors.As(err, &in)
}

// inputError marks an answer no retry can change.
type inputError struct{ error }

func (e inputError) Unwrap() error { return e.error }

func inputErrorf(format string, args ...any) error {
	return inputError{fmt.Errorf(format, args...)}
}

// Netlink is the part of *netlink.Handle the selector uses, so tests can give
// it a handle inside a namespace (netlink.NewHandleAt) or a fake.
type Netlink interface {
	RouteGetWithOptions(dst net.IP, opts *netlink.RouteGetOptions) ([]netlink.Route, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkByName(name string) (netlink.Link, error)
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	RuleList(family int) ([]netlink.Rule, error)
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
}

// Reason says which of the kernel's rules picked the natural source, in the
// terms of the three mechanisms Linux uses when the application did not bind.
type Reason string

const (
	// ReasonRouteSrc: the matching route carries a `src` attribute.
	ReasonRouteSrc Reason = "route-src"
	// ReasonConnected: the destination is on a directly connected subnet; the
	// kernel's own subnet route carries that subnet's primary address as src.
	ReasonConnected Reason = "connected-subnet"
	// ReasonSameSubnet: the interface's primary address on the gateway's subnet.
	ReasonSameSubnet Reason = "same-subnet-as-gateway"
	// ReasonPrimary: no address shares a subnet with the gateway, so the
	// interface's first primary address is used.
	ReasonPrimary Reason = "primary-address"
	// ReasonIPv6: IPv6 default source address selection (RFC 6724).
	ReasonIPv6 Reason = "ipv6-source-selection"
)

// Describe is a one-line explanation of the reason for operators.
func (r Reason) Describe() string {
	switch r {
	case ReasonRouteSrc:
		return "the route has a src attribute"
	case ReasonConnected:
		return "the destination is on a connected subnet; its kernel route carries the subnet's primary address as src"
	case ReasonSameSubnet:
		return "the interface's primary address on the same subnet as the gateway"
	case ReasonPrimary:
		return "no interface address shares the gateway's subnet, so the interface's primary address"
	case ReasonIPv6:
		return "IPv6 source address selection (RFC 6724): longest matching prefix among the interface's preferred addresses"
	}
	return string(r)
}

// Address is one address of the outgoing interface.
type Address struct {
	Prefix  netip.Prefix `json:"prefix"`
	Primary bool         `json:"primary"`
}

// Choice is the kernel's answer for one destination.
type Choice struct {
	// Dst is what was asked about: a host or a prefix.
	Dst netip.Prefix `json:"dst"`
	// Probe is the host address actually looked up. For a host it is Dst's
	// address; for a prefix it is an address inside it that takes the route
	// covering the whole prefix.
	Probe     netip.Addr   `json:"probe"`
	Table     int          `json:"table"`
	Route     netip.Prefix `json:"route"`
	Gateway   netip.Addr   `json:"gateway,omitzero"`
	Interface string       `json:"interface"`
	Source    netip.Addr   `json:"source"`
	Reason    Reason       `json:"reason"`
	// Addresses are the outgoing interface's addresses of Dst's family.
	Addresses []Address `json:"addresses"`
}

// Selector looks routes up through one netlink handle. It remembers
// interface names and the host's addresses between lookups, because
// resolving thousands of destinations would otherwise list them thousands of
// times; call Forget when the host may have changed.
type Selector struct {
	nl      Netlink
	links   map[int]netlink.Link
	addrs   map[int][]netlink.Addr // by family, all interfaces
	fib     *fib4
	byRoute map[routeKey]natural
	// prefixUse remembers PrefixUse's answers (prefix.go).
	prefixUse map[netip.Prefix]PrefixUse
	// mark is the fwmark lookups are made with; skipped says which policy
	// rules such a lookup never matches. See Excluding.
	mark    uint32
	skipped func(priority int) bool
}

// New returns a Selector using nl, typically netlink.NewHandle() or a
// handle made with netlink.NewHandleAt for another namespace.
func New(nl Netlink) *Selector { return &Selector{nl: nl} }

// Excluding returns a Selector whose lookups carry fwmark mark, so that
// the policy rules that send lookups with that mark past others are passed
// over (see routes.PrioExempt): it answers as
// the host would route without those rules. skipped names their
// priorities, so the user-space FIB may still stand in for the kernel.
// egress-snat resolves with it, so that its own routes never decide where
// a destination "naturally" goes.
func Excluding(nl Netlink, mark uint32, skipped func(priority int) bool) *Selector {
	return &Selector{nl: nl, mark: mark, skipped: skipped}
}

// Real returns a Selector without the exclusion: the path packets take.
func (s *Selector) Real() *Selector { return New(s.nl) }

// Forget drops what the selector remembers of interfaces and addresses.
func (s *Selector) Forget() {
	s.links = nil
	s.addrs = nil
	s.fib = nil
	s.byRoute = nil
	s.prefixUse = nil
}

func (s *Selector) link(index int) (netlink.Link, error) {
	if l, ok := s.links[index]; ok {
		return l, nil
	}
	l, err := s.nl.LinkByIndex(index)
	if err != nil {
		return nil, err
	}
	if s.links == nil {
		s.links = map[int]netlink.Link{}
	}
	s.links[index] = l
	return l, nil
}

func (s *Selector) hostAddrs(family int) ([]netlink.Addr, error) {
	if a, ok := s.addrs[family]; ok {
		return a, nil
	}
	a, err := s.nl.AddrList(nil, family)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	if s.addrs == nil {
		s.addrs = map[int][]netlink.Addr{}
	}
	s.addrs[family] = a
	return a, nil
}

// Natural is Lookup without the explanation: the outgoing interface and
// natural source only, for resolving many destinations. A host destination
// costs one route lookup.
//
// IPv4 destinations that take the same route share one kernel lookup (see
// fib4); the first one of each route is looked up in full, and its answer is
// kept only if the kernel confirms it matched that very route.
func (s *Selector) Natural(dst netip.Prefix, out string) (iface string, src netip.Addr, err error) {
	iface, _, src, err = s.Path(dst, out)
	return iface, src, err
}

// Lookup returns the route and natural source for dst. When out is not
// empty the lookup is made as if the traffic were sent out of that interface
// (like `ip route get ... oif OUT`), and it fails if the kernel would not use
// that interface.
//
// A prefix that is not a host (0.0.0.0/0, 198.51.100.0/24) means "the
// destinations that use the route covering this prefix": the answer is that
// route's, never the answer for the prefix's first address (0.0.0.0 is
// looked up as the host itself by the kernel).
func (s *Selector) Lookup(dst netip.Prefix, out string) (*Choice, error) {
	return s.lookup(dst, out, true)
}

func (s *Selector) lookup(dst netip.Prefix, out string, explain bool) (*Choice, error) {
	c, err := s.lookupVia(dst, out, explain)
	if err != nil && out != "" {
		// Say where the traffic really goes, which is what the operator
		// got wrong, rather than only that out has no route.
		if routed, err2 := s.lookupVia(dst, "", false); err2 == nil && routed.Interface != out {
			return nil, inputErrorf("traffic to %s leaves by %s, not %q", dst.Masked(), routed.Interface, out)
		}
	}
	return c, err
}

func (s *Selector) lookupVia(dst netip.Prefix, out string, explain bool) (*Choice, error) {
	dst = dst.Masked()
	opts := &netlink.RouteGetOptions{Mark: s.mark}
	if out != "" {
		link, err := s.nl.LinkByName(out)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return nil, inputErrorf("interface %q: %w", out, err)
			}
			return nil, fmt.Errorf("interface %q: %w", out, err)
		}
		opts.OifIndex = link.Attrs().Index
	}
	var probe netip.Addr
	var fib netlink.Route
	if explain || !dst.IsSingleIP() {
		var err error
		if probe, fib, err = s.probe(dst, opts); err != nil {
			return nil, err
		}
	} else {
		probe = dst.Addr()
	}
	routes, err := s.nl.RouteGetWithOptions(probe.AsSlice(), opts)
	if err := refused(dst, err); err != nil {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("route lookup for %s: %w", probe, err)
	}
	if len(routes) == 0 {
		return nil, fmt.Errorf("%s: %w", dst, ErrNoRoute)
	}
	r := routes[0]
	c := &Choice{Dst: dst, Probe: probe, Table: r.Table, Route: fibPrefix(fib, dst.Addr().Is4())}
	if r.Type != unix.RTN_UNICAST && r.Type != 0 {
		return nil, inputErrorf("%s: route type %s is not unicast (local, broadcast or unreachable destinations are not sent out)", dst, routeType(r.Type))
	}
	if r.Src == nil {
		return nil, inputErrorf("%s: the kernel chose no source address (interface without an address of this family?)", dst)
	}
	c.Source = addrFrom(r.Src)
	if r.Gw != nil {
		c.Gateway = addrFrom(r.Gw)
	}
	link, err := s.link(r.LinkIndex)
	if err != nil {
		return nil, fmt.Errorf("outgoing interface of %s (index %d): %w", dst, r.LinkIndex, err)
	}
	c.Interface = link.Attrs().Name
	if out != "" && c.Interface != out {
		return nil, inputErrorf("traffic to %s leaves by %s, not %q", dst, c.Interface, out)
	}
	if !explain {
		return c, nil
	}
	family := netlink.FAMILY_V4
	if !dst.Addr().Is4() {
		family = netlink.FAMILY_V6
	}
	addrs, err := s.nl.AddrList(link, family)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", c.Interface, err)
	}
	for _, a := range addrs {
		p, ok := prefixFrom(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		c.Addresses = append(c.Addresses, Address{Prefix: p, Primary: a.Flags&unix.IFA_F_SECONDARY == 0})
	}
	c.Reason = reasonFor(c, fib)
	return c, nil
}

// reasonFor names the kernel rule that produced c.Source. The kernel made the
// choice; this only classifies it.
func reasonFor(c *Choice, fib netlink.Route) Reason {
	if fib.Src != nil {
		if fib.Protocol == unix.RTPROT_KERNEL && fib.Scope == netlink.SCOPE_LINK {
			return ReasonConnected
		}
		return ReasonRouteSrc
	}
	if !c.Dst.Addr().Is4() {
		return ReasonIPv6
	}
	if c.Gateway.IsValid() {
		for _, a := range c.Addresses {
			if a.Primary && a.Prefix.Contains(c.Gateway) && a.Prefix.Addr() == c.Source {
				return ReasonSameSubnet
			}
		}
	}
	return ReasonPrimary
}

// probe finds a host address inside dst whose route covers all of dst, and
// returns it with that route (the FIB entry, as `ip route get fibmatch`).
func (s *Selector) probe(dst netip.Prefix, opts *netlink.RouteGetOptions) (netip.Addr, netlink.Route, error) {
	fibOpts := *opts
	fibOpts.FIBMatch = true
	var last error
	for _, cand := range candidates(dst) {
		routes, err := s.nl.RouteGetWithOptions(cand.AsSlice(), &fibOpts)
		if err != nil {
			last = err
			if err := refused(dst, err); err != nil {
				return netip.Addr{}, netlink.Route{}, err
			}
			continue
		}
		if len(routes) == 0 {
			continue
		}
		if fibPrefix(routes[0], dst.Addr().Is4()).Bits() <= dst.Bits() {
			return cand, routes[0], nil
		}
	}
	if last != nil {
		return netip.Addr{}, netlink.Route{}, fmt.Errorf("route lookup for %s: %w", dst, last)
	}
	return netip.Addr{}, netlink.Route{}, inputErrorf("no single route covers %s: its addresses take different routes; name the narrower prefixes instead", dst)
}

// refused turns the errors a route lookup fails with when the kernel
// itself will not send to dst into the operator's error: no route (or a
// throw route) and unreachable are ErrNoRoute; blackhole and prohibit, routes
// or policy rules, fail with EINVAL and EACCES (fib_props in the kernel).
// It returns nil for any other error, a failure of netlink itself.
func refused(dst netip.Prefix, err error) error {
	switch {
	case errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EHOSTUNREACH):
		return fmt.Errorf("%s: %w", dst, ErrNoRoute)
	case errors.Is(err, unix.EINVAL):
		return inputErrorf("%s: the kernel refuses to route it (a blackhole route or rule): %w", dst, err)
	case errors.Is(err, unix.EACCES):
		return inputErrorf("%s: the kernel refuses to route it (a prohibit route or rule): %w", dst, err)
	}
	return nil
}

func fibPrefix(r netlink.Route, is4 bool) netip.Prefix {
	if r.Dst == nil {
		if is4 {
			return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		}
		return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	p, _ := prefixFrom(r.Dst)
	return p
}

func addrFrom(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func prefixFrom(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

func routeType(t int) string {
	switch t {
	case unix.RTN_LOCAL:
		return "local"
	case unix.RTN_BROADCAST:
		return "broadcast"
	case unix.RTN_MULTICAST:
		return "multicast"
	case unix.RTN_UNREACHABLE:
		return "unreachable"
	case unix.RTN_PROHIBIT:
		return "prohibit"
	case unix.RTN_BLACKHOLE:
		return "blackhole"
	}
	return fmt.Sprintf("%d", t)
}

// ErrNotLocal means an address is not assigned to any interface of the host.
var ErrNotLocal = errors.New("not an address of this host")

// ErrNotUsable means an address is assigned to the host but the kernel will
// not send from it: an IPv6 address whose duplicate address detection is
// still running (tentative, or optimistic) or found another node using it
// (dadfailed). Connections from it hang, so it counts as absent: an error
// that is ErrNotUsable is ErrNotLocal too, and says why.
var ErrNotUsable = errors.New("not usable as a source")

// unusable is the error of an address that is on the host but unusable.
type unusable struct {
	addr netip.Addr
	why  string
}

func (e unusable) Error() string {
	return fmt.Sprintf("%s is on this host but %s", e.addr, e.why)
}

func (e unusable) Is(target error) bool { return target == ErrNotLocal || target == ErrNotUsable }

// usability says why the kernel will not send from an address with these
// IFA_F_* flags, or "" when it will.
func usability(flags int) string {
	switch {
	case flags&unix.IFA_F_DADFAILED != 0:
		return "dadfailed: duplicate address detection found another node using it, so the kernel will not send from it"
	case flags&unix.IFA_F_TENTATIVE != 0:
		return "tentative: duplicate address detection is still running, and the kernel sends nothing from it until it ends"
	case flags&unix.IFA_F_OPTIMISTIC != 0:
		return "optimistic: duplicate address detection is still running (it may turn out to be another node's)"
	}
	return ""
}

// Owner returns the name of the interface that holds a. An address that is
// there but unusable (see ErrNotUsable) fails like an absent one, naming
// why.
func (s *Selector) Owner(a netip.Addr) (string, error) {
	x, err := s.hostAddr(a)
	if err != nil {
		return "", err
	}
	if why := usability(x.Flags); why != "" {
		return "", unusable{a, why}
	}
	link, err := s.link(x.LinkIndex)
	if err != nil {
		return "", fmt.Errorf("interface of %s (index %d): %w", a, x.LinkIndex, err)
	}
	return link.Attrs().Name, nil
}

// Deprecated reports whether a is a deprecated address of the host (its
// preferred lifetime ended): the kernel no longer picks it by itself, but
// it still works as a source that is asked for.
func (s *Selector) Deprecated(a netip.Addr) bool {
	x, err := s.hostAddr(a)
	return err == nil && x.Flags&unix.IFA_F_DEPRECATED != 0
}

// hostAddr finds a among the host's addresses.
func (s *Selector) hostAddr(a netip.Addr) (netlink.Addr, error) {
	family := netlink.FAMILY_V4
	if !a.Is4() {
		family = netlink.FAMILY_V6
	}
	addrs, err := s.hostAddrs(family)
	if err != nil {
		return netlink.Addr{}, err
	}
	for _, x := range addrs {
		if p, ok := prefixFrom(x.IPNet); ok && p.Addr() == a {
			return x, nil
		}
	}
	return netlink.Addr{}, ErrNotLocal
}

// Path is Natural plus the route's gateway (invalid when on-link), with
// the same grouping of IPv4 destinations by route.
func (s *Selector) Path(dst netip.Prefix, out string) (iface string, gw, src netip.Addr, err error) {
	dst = dst.Masked()
	if dst.Addr().Is4() && !outputSpecial(dst) {
		if k, ok := s.loadFIB4().route(dst); ok {
			k.out = out
			if n, ok := s.byRoute[k]; ok {
				return n.iface, n.gateway, n.source, nil
			}
			c, err := s.lookup(dst, out, true)
			if err != nil {
				return "", netip.Addr{}, netip.Addr{}, err
			}
			if c.Table == k.table && c.Route == k.prefix {
				if s.byRoute == nil {
					s.byRoute = map[routeKey]natural{}
				}
				s.byRoute[k] = natural{c.Interface, c.Source, c.Gateway}
			}
			return c.Interface, c.Gateway, c.Source, nil
		}
	}
	// With out, the route itself must be matched (FIBMatch, as explain
	// does): a plain lookup with an output interface would have the kernel
	// assume any destination is on-link there.
	c, err := s.lookup(dst, out, out != "")
	if err != nil {
		return "", netip.Addr{}, netip.Addr{}, err
	}
	return c.Interface, c.Gateway, c.Source, nil
}

// outputSpecial reports whether the kernel answers for dst other than by
// the route covering it: a multicast or limited broadcast destination has
// a route of its own type, 0.0.0.0 is looked up as a local address. Such a
// destination must not share the answer remembered for its route.
func outputSpecial(dst netip.Prefix) bool {
	a := dst.Addr()
	return a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || (dst.IsSingleIP() && a.IsUnspecified())
}

// Gateways lists the distinct gateways of the host's routes that leave by
// iface, in the given family, in any table but those skipped ones the
// selector excludes (a backup default route with a higher metric, a
// DHCP-provided one): the way out of that interface.
func (s *Selector) Gateways(iface string, is4 bool, exclude func(table int) bool) ([]netip.Addr, error) {
	link, err := s.nl.LinkByName(iface)
	if err != nil {
		return nil, inputErrorf("interface %q: %w", iface, err)
	}
	if err := up(link); err != nil {
		return nil, err
	}
	family := netlink.FAMILY_V6
	if is4 {
		family = netlink.FAMILY_V4
	}
	routes, err := s.nl.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_UNSPEC, LinkIndex: link.Attrs().Index},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_OIF)
	if err != nil {
		return nil, fmt.Errorf("listing routes of %s: %w", iface, err)
	}
	var out []netip.Addr
	for _, r := range routes {
		if r.Gw == nil || (exclude != nil && exclude(r.Table)) || r.Table == unix.RT_TABLE_LOCAL {
			continue
		}
		if g := addrFrom(r.Gw); !slices.Contains(out, g) {
			out = append(out, g)
		}
	}
	return out, nil
}

// up is ErrNoRoute for an interface set down: the kernel has deleted every
// route through it, and refuses new ones ("Nexthop has invalid gateway"),
// so a way out of it can only wait until it is up again. Its addresses
// stay, which is why the address checks alone do not see it.
func up(link netlink.Link) error {
	if link.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("interface %s is down: %w", link.Attrs().Name, ErrNoRoute)
	}
	return nil
}

// OnLink reports whether a can be reached directly on iface: it lies in a
// subnet of one of iface's addresses, or is an IPv6 link-local address.
func (s *Selector) OnLink(iface string, a netip.Addr) (bool, error) {
	link, err := s.nl.LinkByName(iface)
	if err != nil {
		return false, inputErrorf("interface %q: %w", iface, err)
	}
	if err := up(link); err != nil {
		return false, err
	}
	if a.Is6() && a.IsLinkLocalUnicast() {
		return true, nil
	}
	family := netlink.FAMILY_V6
	if a.Is4() {
		family = netlink.FAMILY_V4
	}
	addrs, err := s.nl.AddrList(link, family)
	if err != nil {
		return false, fmt.Errorf("addresses of %s: %w", iface, err)
	}
	for _, x := range addrs {
		if p, ok := prefixFrom(x.IPNet); ok && p.Masked().Contains(a) && p.Addr() != a {
			return true, nil
		}
	}
	return false, nil
}

// Hop is the kernel's answer to one route lookup: the table the route
// came from and the interface the packet leaves by.
type Hop struct {
	Table     int
	Interface string
	Source    netip.Addr
}

// Route looks dst up as the first packet of a new connection carrying
// fwmark mark (0: none) is looked up, every policy rule included: the path
// it really takes, not the natural one Excluding answers with. An
// unreachable, blackhole or prohibit answer is an input error naming it.
func (s *Selector) Route(dst netip.Addr, mark uint32) (Hop, error) {
	routes, err := s.nl.RouteGetWithOptions(dst.AsSlice(), &netlink.RouteGetOptions{Mark: mark})
	if err := refused(netip.PrefixFrom(dst, dst.BitLen()), err); err != nil {
		return Hop{}, err
	}
	if err != nil {
		return Hop{}, fmt.Errorf("route lookup for %s: %w", dst, err)
	}
	if len(routes) == 0 {
		return Hop{}, fmt.Errorf("%s: %w", dst, ErrNoRoute)
	}
	r := routes[0]
	h := Hop{Table: r.Table}
	if r.Src != nil {
		h.Source = addrFrom(r.Src)
	}
	link, err := s.link(r.LinkIndex)
	if err != nil {
		return Hop{}, fmt.Errorf("outgoing interface of %s (index %d): %w", dst, r.LinkIndex, err)
	}
	h.Interface = link.Attrs().Name
	return h, nil
}
