package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
)

// Client is a namespace routed through H, like a LAN or VPN client of a
// host that forwards (and usually masquerades) its traffic. Its traffic is
// forwarded by H, so it crosses H's nat POSTROUTING but never H's OUTPUT:
// that is what `egress-snat set --from CIDR` has to catch.
//
// G has no route back to the client's subnets. A client connection is
// therefore only answered when H rewrites its source (Masquerade, or an SNAT
// rule under test); otherwise G's reply has nowhere to go and SourceSeen
// reports "".
type Client struct {
	// NS is the client's netns name (usable with `ip netns exec`).
	NS string
	// Dev is the H side of the client's veth, lan0 for the first client,
	// lan1 for the second, and so on. The client side is eth0.
	Dev string
	// Subnet4 and Subnet6 are the link's subnets: 10.88.N.0/24 and
	// fd00:88:N::/64 for client N (counting from 0; hexadecimal in the
	// IPv6 one). Tests should give Docker networks subnets outside
	// 10.88.0.0/16.
	Subnet4, Subnet6 netip.Prefix
	// Addr4 and Addr6 are the client's addresses (.2 and ::2); H has .1
	// and ::1, the client's default gateways.
	Addr4, Addr6 netip.Addr

	lab *Lab
}

// ClientOptions tunes AddClient.
type ClientOptions struct {
	// Masquerade calls Client.Masquerade once the client is up.
	Masquerade bool
}

// maxClients keeps client subnets inside 10.88.0.0/16 and fd00:88::/32.
const maxClients = 256

// AddClient creates a client namespace C<n> with a veth to H (lan<n> in H,
// eth0 in C, both created inside the namespaces, so nothing appears in the
// root namespace), gives both ends addresses of the client's own subnets,
// routes the client's default (IPv4 and IPv6) through H, and enables
// forwarding in H for both families. Each call adds one more client with
// distinct subnets and device name. The namespace is deleted at t's cleanup.
//
// No NAT is installed unless opts.Masquerade is set: whether the client's
// source is rewritten, and by what, is the test's decision.
func (l *Lab) AddClient(t testing.TB, opts ClientOptions) *Client {
	t.Helper()
	l.mu.Lock()
	n := l.clients
	l.clients++
	l.mu.Unlock()
	if n >= maxClients {
		t.Fatalf("lab: AddClient: at most %d clients", maxClients)
	}

	c := &Client{
		NS:      fmt.Sprintf("%s-c%d", l.base, n),
		Dev:     fmt.Sprintf("lan%d", n),
		Subnet4: netip.MustParsePrefix(fmt.Sprintf("10.88.%d.0/24", n)),
		Subnet6: netip.MustParsePrefix(fmt.Sprintf("fd00:88:%x::/64", n)),
		Addr4:   netip.MustParseAddr(fmt.Sprintf("10.88.%d.2", n)),
		Addr6:   netip.MustParseAddr(fmt.Sprintf("fd00:88:%x::2", n)),
		lab:     l,
	}
	gw4 := netip.MustParseAddr(fmt.Sprintf("10.88.%d.1", n))
	gw6 := netip.MustParseAddr(fmt.Sprintf("fd00:88:%x::1", n))

	t.Cleanup(func() {
		if out, err := deleteNetns(c.NS); err != nil &&
			!strings.Contains(string(out), "No such file") {
			t.Errorf("lab: delete netns %s: %v: %s", c.NS, err, out)
		}
	})
	ip(t, "netns", "add", c.NS)
	sysctl(t, c.NS, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	// Forwarding is per namespace; H's all.forwarding also switches every
	// existing IPv6 interface to router mode, which the lab does not mind
	// (its routes are static).
	sysctl(t, l.Host, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

	// Only the client end gets an explicit ifindex (1000+n): it must differ
	// from the H end's (see the ifindex note in New), and H's own indexes
	// are left to the kernel because Docker in H allocates some too.
	ip(t, "-n", l.Host, "link", "add", c.Dev, "type", "veth",
		"peer", "name", "eth0", "index", fmt.Sprint(1000+n), "netns", c.NS)
	ipBatch(t, l.Host, []string{
		fmt.Sprintf("addr add %s/24 dev %s", gw4, c.Dev),
		fmt.Sprintf("addr add %s/64 dev %s nodad", gw6, c.Dev),
		"link set " + c.Dev + " up",
	})
	ipBatch(t, c.NS, []string{
		fmt.Sprintf("addr add %s/24 dev eth0", c.Addr4),
		fmt.Sprintf("addr add %s/64 dev eth0 nodad", c.Addr6),
		"link set lo up",
		"link set eth0 up",
	})
	waitIPv6Ready(t, l.Host, []string{c.Dev})
	waitIPv6Ready(t, c.NS, []string{"eth0"})
	ipBatch(t, c.NS, []string{
		"route add default via " + gw4.String(),
		"route add default via " + gw6.String(),
	})
	if opts.Masquerade {
		c.Masquerade(t)
	}
	return c
}

// Masquerade inserts, for both families, the rule Docker installs for its
// bridges: `-t nat -I POSTROUTING 1 -s SUBNET ! -o DEV -j MASQUERADE`, in
// the iptables backend EGRESS_SNAT_IPTABLES selects. Like Docker it inserts
// at position 1, so a test can reproduce the order a real host ends up with
// when such a rule is added after egress-snat's jump. Calling it twice adds
// the rules twice.
func (c *Client) Masquerade(t testing.TB) {
	t.Helper()
	for _, r := range []struct {
		cmd    string
		subnet netip.Prefix
	}{
		{iptablesCmd(t, "iptables", ""), c.Subnet4},
		{iptablesCmd(t, "ip6tables", ""), c.Subnet6},
	} {
		c.lab.Run(t, r.cmd, "-t", "nat", "-I", "POSTROUTING", "1",
			"-s", r.subnet.String(), "!", "-o", c.Dev, "-j", "MASQUERADE")
	}
}

// Run runs `ip netns exec NS name args...` in the client and returns its
// stdout, failing the test with stdout and stderr if the command fails.
func (c *Client) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	stdout, stderr, code := runIn(c.NS, name, args...)
	if code != 0 {
		t.Fatalf("in %s: %s %s: exit %d\nstdout:\n%s\nstderr:\n%s",
			c.NS, name, strings.Join(args, " "), code, stdout, stderr)
	}
	return stdout
}

// SourceSeen connects from the client to dst:TCPPort (G's probe, see
// StartProbe) and returns the source address the far side saw, or "" if
// the connection failed, which is what happens when H forwards the client's
// packets without rewriting their source: the SYN reaches G, but G cannot
// route the answer to 10.88/16 or fd00:88::/32. The failure is logged with
// that hint rather than failing the test, since it is the expected outcome
// of some tests.
func (c *Client) SourceSeen(t testing.TB, dst string) string {
	t.Helper()
	seen, err := askProbe(c.NS, net.Dialer{Timeout: probeTimeout}, dst)
	if err != nil {
		hint := ""
		if isTimeout(err) {
			hint = fmt.Sprintf(" (G has no route back to %s or %s: without SNAT or MASQUERADE in %s the answer cannot return)",
				c.Subnet4, c.Subnet6, c.lab.Host)
		}
		t.Logf("lab: from client %s: %v%s", c.NS, err, hint)
		return ""
	}
	return seen
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
