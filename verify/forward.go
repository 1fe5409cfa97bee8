package verify

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/conntrack"
)

// Forwarded starts flows as if forwarded from From: from a throwaway
// network namespace joined to this one by a veth pair, the way a container
// or a VM is. The packet then really arrives on an interface, is routed,
// and meets POSTROUTING as forwarded traffic does.
//
// What it adds to this namespace is one veth end and the host route to
// From through it, both gone when the veth is deleted. The other namespace
// has no name and lives only as long as this process holds it, so even a
// killed run leaves nothing behind: the kernel destroys the namespace, and
// with it the veth pair and the route.
type Forwarded struct {
	From netip.Addr
}

// Link-local gateway the client namespace routes through; the host end
// answers for it by a static neighbour entry, so the host needs no
// address of its own on the veth.
var (
	gateway4 = netip.MustParseAddr("169.254.0.1")
	gateway6 = netip.MustParseAddr("fe80::1")
)

// Start builds the client namespace, sends the flow's first packet from
// From and returns its original tuple; done removes everything.
func (f Forwarded) Start(proto uint8, dst netip.AddrPort) (orig conntrack.Tuple, done func(), err error) {
	if f.From.Is4() != dst.Addr().Is4() {
		return orig, nil, fmt.Errorf("--from %s and --dst %s are of different families", f.From, dst.Addr())
	}
	if err := forwardingOn(f.From.Is4()); err != nil {
		return orig, nil, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	host, err := netns.Get()
	if err != nil {
		return orig, nil, err
	}
	client, err := netns.New() // this thread is now in it
	if err2 := netns.Set(host); err2 != nil {
		// Cannot happen short of a kernel bug; never run on elsewhere.
		panic(fmt.Sprintf("returning to the host network namespace: %v", err2))
	}
	if err != nil {
		host.Close()
		return orig, nil, fmt.Errorf("creating a network namespace for the forwarded flow: %w", err)
	}
	var cleanups []func()
	done = func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}
	cleanups = append(cleanups, func() { client.Close(); host.Close() })
	fail := func(err error) (conntrack.Tuple, func(), error) {
		done()
		return conntrack.Tuple{}, nil, err
	}
	hostH, err := netlink.NewHandleAt(host)
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, hostH.Close)
	clientH, err := netlink.NewHandleAt(client)
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, clientH.Close)

	name := fmt.Sprintf("esverify%d", os.Getpid()%1000000)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "eth0", PeerNamespace: netlink.NsFd(client)}
	if err := hostH.LinkAdd(veth); err != nil {
		return fail(fmt.Errorf("creating veth %s: %w", name, err))
	}
	hostEnd, err := hostH.LinkByName(name)
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, func() { hostH.LinkDel(hostEnd) })
	clientEnd, err := clientH.LinkByName("eth0")
	if err != nil {
		return fail(err)
	}
	bits := f.From.BitLen()
	gw := gateway4
	if f.From.Is6() {
		gw = gateway6
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"bringing up " + name, func() error { return hostH.LinkSetUp(hostEnd) }},
		{"bringing up the client's eth0", func() error { return clientH.LinkSetUp(clientEnd) }},
		{"adding " + f.From.String() + " to the client", func() error {
			return clientH.AddrAdd(clientEnd, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(f.From, bits)), Flags: unix.IFA_F_NODAD})
		}},
		{"the client's neighbour entry for its gateway", func() error {
			return clientH.NeighAdd(&netlink.Neigh{LinkIndex: clientEnd.Attrs().Index, IP: gw.AsSlice(), HardwareAddr: hostEnd.Attrs().HardwareAddr, State: netlink.NUD_PERMANENT, Family: family(f.From)})
		}},
		{"the client's default route", func() error {
			return clientH.RouteAdd(&netlink.Route{LinkIndex: clientEnd.Attrs().Index, Gw: gw.AsSlice(), Flags: int(netlink.FLAG_ONLINK), Family: family(f.From)})
		}},
		{"the host route to " + f.From.String() + " through " + name, func() error {
			return hostH.RouteAdd(&netlink.Route{LinkIndex: hostEnd.Attrs().Index, Dst: ipNet(netip.PrefixFrom(f.From, bits)), Scope: netlink.SCOPE_LINK})
		}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fail(fmt.Errorf("setting up the forwarded flow: %s: %w", s.what, err))
		}
	}
	fd, err := socketIn(client, host, proto, f.From)
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, func() { unix.Close(fd) })
	if orig, err = SendFirst(fd, proto, dst); err != nil {
		return fail(err)
	}
	return orig, done, nil
}

// socketIn creates a socket bound to from inside ns; the calling thread
// is locked and returns to back.
func socketIn(ns, back netns.NsHandle, proto uint8, from netip.Addr) (int, error) {
	if err := netns.Set(ns); err != nil {
		return -1, err
	}
	fd, err := Local{}.socket(proto, from)
	if err2 := netns.Set(back); err2 != nil {
		panic(fmt.Sprintf("returning to the host network namespace: %v", err2))
	}
	if err != nil {
		return -1, err
	}
	var sa unix.Sockaddr = &unix.SockaddrInet4{Addr: from.As4()}
	if from.Is6() {
		sa = &unix.SockaddrInet6{Addr: from.As16()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("binding %s in the client namespace: %w", from, err)
	}
	return fd, nil
}

// forwardingOn fails when this namespace does not forward the family:
// forwarded traffic would then not leave at all, and there is nothing to
// verify.
func forwardingOn(v4 bool) error {
	path := "/proc/sys/net/ipv4/ip_forward"
	if !v4 {
		path = "/proc/sys/net/ipv6/conf/all/forwarding"
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	if strings.TrimSpace(string(b)) != "1" {
		return errors.New("this host does not forward (" + path + " is not 1): forwarded traffic does not leave it at all")
	}
	return nil
}

func family(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
