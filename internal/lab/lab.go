// Package lab builds a throwaway two-namespace network for integration tests,
// so that SNAT rules can be installed for real and the source address that
// connections arrive from can be observed on the far side.
//
// Topology (documentation ranges, and private ranges only inside the lab's
// own namespaces; the root namespace is never touched):
//
//	H (Host) eth0                      G (Gateway) eth0
//	  192.0.2.250/24 (primary)           192.0.2.1/24
//	  192.0.2.22/24, 192.0.2.23/24       198.18.0.1/15
//	  198.18.0.10/15                     2001:db8::1/64
//	  2001:db8::250/64, ::22, ::23     G lo (the "far hosts")
//	  default via 192.0.2.1              198.51.100.4, 198.51.100.5,
//	  default via 2001:db8::1            203.0.113.7, 2001:db8:ffff::4
//	H lanN (AddClient, client N = 0, 1, ...)
//	  10.88.N.1/24, fd00:88:N::1/64 --- C<N> (Client) eth0
//	  forwarding on                        10.88.N.2/24, fd00:88:N::2/64
//	                                       default via H (both families)
//	H eth1 (WithSecondNIC)             G eth1
//	  203.0.113.130/25, .131/25          203.0.113.129/25
//	  WithSecondUplink adds:             2001:db8:1::129/64
//	  2001:db8:1::130/64, ::131/64
//	  default via 203.0.113.129, via 2001:db8:1::129, both metric 2048
//	H docker0, br-* (StartDocker)
//	  172.30.0.1/16 and the test's networks, containers behind them
//
// The far hosts live on G itself, so G needs no forwarding and whatever G's
// probe servers see as the peer address is exactly what left H. G has no
// route to the clients' or containers' private subnets, on purpose: their
// connections only get an answer when H rewrites their source (MASQUERADE,
// or an SNAT rule under test), just as on a real host behind a provider.
//
// Senders inside H other than the test process (another uid, a cgroup, a
// container) are separate processes, see SourceSeenAsUID,
// SourceSeenInCgroup and StartDocker.
package lab

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Lab is one instance of the topology. Host and Gateway are netns names
// usable with `ip netns exec`.
type Lab struct {
	Host, Gateway string

	base    string // the namespaces' common prefix, for client names
	mu      sync.Mutex
	seen    map[string]int
	probing bool
	clients int // AddClient calls so far: the next client's index
	// devs are G's interfaces towards H, where Arrivals captures.
	devs []string
}

// Option changes the topology built by New.
type Option func(*config)

type config struct {
	secondNIC bool
	uplink    bool
}

// WithSecondNIC adds a second veth pair H eth1 <-> G eth1 for tests of
// multi-interface hosts. H eth1 gets 203.0.113.130/25 (primary) and
// 203.0.113.131/25, G eth1 gets 203.0.113.129/25. The /25 keeps the link
// clear of the far host 203.0.113.7, which stays reachable only through
// H's default route on eth0. No route points at eth1.
func WithSecondNIC() Option { return func(c *config) { c.secondNIC = true } }

// WithSecondUplink is WithSecondNIC with eth1 as a second way out, as on a
// host with two providers: eth1 has IPv6 too (H 2001:db8:1::130/64, the
// default source of the prefix, and 2001:db8:1::131/64; G
// 2001:db8:1::129/64), and H has backup default routes through it, via
// 203.0.113.129 and 2001:db8:1::129 with metric 2048, so that eth0's stay
// the ones taken (IPv6's default metric is 1024, IPv4's 0). The far hosts on G's lo are reachable either way, so
// Arrivals shows which way a connection came.
func WithSecondUplink() Option {
	return func(c *config) { c.secondNIC, c.uplink = true, true }
}

// New builds a fresh lab and registers t.Cleanup to tear it down, so no
// namespace outlives the test even when it fails. It calls Require first.
func New(t testing.TB, opts ...Option) *Lab {
	t.Helper()
	Require(t)
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}

	sweepStale()
	base := uniqueName()
	l := &Lab{Host: base + "-h", Gateway: base + "-g", base: base, seen: map[string]int{}}
	// Register before creating anything so a half-built lab is removed too.
	// Deleting a name that was never created is harmless.
	t.Cleanup(func() {
		for _, ns := range []string{l.Host, l.Gateway} {
			if out, err := deleteNetns(ns); err != nil &&
				!strings.Contains(string(out), "No such file") {
				t.Errorf("lab: delete netns %s: %v: %s", ns, err, out)
			}
		}
	})

	ip(t, "netns", "add", l.Host)
	ip(t, "netns", "add", l.Gateway)
	// Set before any interface exists, since interfaces copy "default".
	// No DAD at all: nodad alone would leave the link-local address
	// tentative for a second or two. promote_secondaries is what
	// systemd-based hosts run with (the kernel default is off): deleting
	// 192.0.2.250 then promotes .22 instead of silently flushing every
	// secondary of the subnet.
	sysctl(t, l.Gateway, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	sysctl(t, l.Host, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
		"net.ipv4.conf.all.promote_secondaries=1", "net.ipv4.conf.default.promote_secondaries=1")

	// Both veth ends are created directly inside the namespaces, so no
	// interface ever appears in the root namespace. The explicit, distinct
	// ifindexes matter: in two fresh namespaces both ends would get index 2,
	// the kernel then treats their carrier change as non-urgent and delays
	// it (and with it IPv6 setup) by up to a second.
	ip(t, "-n", l.Host, "link", "add", "eth0", "index", "10", "type", "veth",
		"peer", "name", "eth0", "index", "20", "netns", l.Gateway)
	host := []string{
		"addr add 192.0.2.250/24 dev eth0",
		"addr add 192.0.2.22/24 dev eth0",
		"addr add 192.0.2.23/24 dev eth0",
		"addr add 198.18.0.10/15 dev eth0",
		// When RFC 6724 source selection ties, Linux picks the most
		// recently added IPv6 address, so ::250 goes last to be the
		// default source like 192.0.2.250 (the first, primary) is for IPv4.
		"addr add 2001:db8::23/64 dev eth0 nodad",
		"addr add 2001:db8::22/64 dev eth0 nodad",
		"addr add 2001:db8::250/64 dev eth0 nodad",
		"link set lo up",
		"link set eth0 up",
	}
	gw := []string{
		"addr add 192.0.2.1/24 dev eth0",
		"addr add 198.18.0.1/15 dev eth0",
		"addr add 2001:db8::1/64 dev eth0 nodad",
		"addr add 198.51.100.4/32 dev lo",
		"addr add 198.51.100.5/32 dev lo",
		"addr add 203.0.113.7/32 dev lo",
		"addr add 2001:db8:ffff::4/128 dev lo",
		"link set lo up",
		"link set eth0 up",
	}
	if cfg.secondNIC {
		ip(t, "-n", l.Host, "link", "add", "eth1", "index", "11", "type", "veth",
			"peer", "name", "eth1", "index", "21", "netns", l.Gateway)
		host = append(host,
			"addr add 203.0.113.130/25 dev eth1",
			"addr add 203.0.113.131/25 dev eth1",
			"link set eth1 up")
		gw = append(gw,
			"addr add 203.0.113.129/25 dev eth1",
			"link set eth1 up")
	}
	if cfg.uplink {
		// ::130 last, to be the prefix's default source (see eth0's).
		host = append(host,
			"addr add 2001:db8:1::131/64 dev eth1 nodad",
			"addr add 2001:db8:1::130/64 dev eth1 nodad")
		gw = append(gw, "addr add 2001:db8:1::129/64 dev eth1 nodad")
	}
	ipBatch(t, l.Host, host)
	ipBatch(t, l.Gateway, gw)

	devs := []string{"eth0"}
	if cfg.secondNIC {
		devs = append(devs, "eth1")
	}
	l.devs = devs
	waitIPv6Ready(t, l.Host, devs)
	waitIPv6Ready(t, l.Gateway, devs)
	defaults := []string{
		"route add default via 192.0.2.1",
		"route add default via 2001:db8::1",
	}
	if cfg.uplink {
		defaults = append(defaults,
			"route add default via 203.0.113.129 dev eth1 metric 2048",
			"route add default via 2001:db8:1::129 dev eth1 metric 2048")
	}
	ipBatch(t, l.Host, defaults)
	return l
}

// Run runs `ip netns exec Host name args...` and returns its stdout, failing
// the test with stdout and stderr if the command fails.
func (l *Lab) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	stdout, stderr, code := l.RunErr(name, args...)
	if code != 0 {
		t.Fatalf("in %s: %s %s: exit %d\nstdout:\n%s\nstderr:\n%s",
			l.Host, name, strings.Join(args, " "), code, stdout, stderr)
	}
	return stdout
}

// RunErr runs `ip netns exec Host name args...` without judging the result.
// exitCode is -1 when the command could not be run at all; the reason is
// then in stderr.
func (l *Lab) RunErr(name string, args ...string) (stdout, stderr string, exitCode int) {
	return runIn(l.Host, name, args...)
}

func runIn(ns, name string, args ...string) (stdout, stderr string, exitCode int) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return o.String(), e.String(), 0
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		return o.String(), e.String(), ee.ExitCode()
	default:
		return o.String(), e.String() + err.Error(), -1
	}
}

var counters = regexp.MustCompile(`\[\d+:\d+\]`)

// Ruleset returns H's iptables and ip6tables rules plus every ipset, as
// ipset save prints it (the create line and every member), normalised (no
// comments, zeroed counters, each set's members sorted, since a hash set
// lists them in bucket order) so tests can compare it before and after an
// operation or against a golden text. A member changed in place shows.
//
// EGRESS_SNAT_IPTABLES=legacy|nft selects the backend explicitly, because
// the plain iptables-save only shows rules of its own backend and the tool
// may be configured to use the other one.
func (l *Lab) Ruleset(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range []string{iptablesCmd(t, "iptables", "-save"), iptablesCmd(t, "ip6tables", "-save")} {
		for line := range strings.Lines(l.Run(t, cmd)) {
			if strings.HasPrefix(line, "#") {
				continue
			}
			b.WriteString(counters.ReplaceAllString(line, "[0:0]"))
		}
	}
	if _, err := exec.LookPath("ipset"); err == nil {
		b.WriteString(SortedIPSetSave(l.Run(t, "ipset", "save")))
	}
	// egress-snat's own nftables table (its nftables backend), when there
	// is one: without counters, each set's elements sorted.
	if out, _, code := runIn(l.Host, "nft", "-s", "list", "table", "inet", "egress-snat"); code == 0 {
		b.WriteString(SortedNFTElements(out))
	}
	return b.String()
}

// SortedNFTElements returns nft list output with each set's elements on
// one line, sorted: the kernel lists a hash set's elements in bucket order,
// which a change in place may reshuffle.
func SortedNFTElements(list string) string {
	var b strings.Builder
	var elems []string
	in := false
	for line := range strings.Lines(list) {
		trim := strings.TrimSpace(line)
		if rest, ok := strings.CutPrefix(trim, "elements = {"); ok {
			in, elems = true, nil
			trim = rest
		} else if !in {
			b.WriteString(line)
			continue
		}
		end := strings.HasSuffix(trim, "}")
		trim = strings.TrimSuffix(trim, "}")
		for _, e := range strings.Split(trim, ",") {
			if e = strings.TrimSpace(e); e != "" {
				elems = append(elems, e)
			}
		}
		if end {
			in = false
			slices.Sort(elems)
			b.WriteString("\t\telements = { " + strings.Join(elems, ", ") + " }\n")
		}
	}
	return b.String()
}

// SetNames returns the names of the sets a Ruleset holds, in its order.
func SetNames(ruleset string) []string {
	var out []string
	for line := range strings.Lines(ruleset) {
		if rest, ok := strings.CutPrefix(line, "create "); ok {
			name, _, _ := strings.Cut(rest, " ")
			out = append(out, name)
		}
	}
	return out
}

// SortedIPSetSave returns the text of ipset save with the add lines of each
// set sorted; create lines and the order of sets stay as the kernel gave
// them.
func SortedIPSetSave(save string) string {
	var b strings.Builder
	var adds []string
	flush := func() {
		slices.Sort(adds)
		for _, a := range adds {
			b.WriteString(a)
		}
		adds = adds[:0]
	}
	for line := range strings.Lines(save) {
		if strings.HasPrefix(line, "add ") {
			adds = append(adds, line)
			continue
		}
		flush()
		b.WriteString(line)
	}
	flush()
	return b.String()
}

// Routing returns H's policy rules and all routing tables of both families,
// without the routes the kernel makes by itself for local addresses
// (local, broadcast, multicast, link-local), so that the text changes only
// when a program changes the routing. A local route of egress-snat's own
// (proto 83: a pool's AnyIP route) is kept.
func (l *Lab) Routing(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"-4", "rule"}, {"-6", "rule"},
		{"-4", "route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
	} {
		fmt.Fprintf(&b, "# ip %s\n", strings.Join(args, " "))
		for line := range strings.Lines(l.Run(t, "ip", args...)) {
			if strings.HasPrefix(line, "local ") && !strings.Contains(line, " proto 83") || strings.HasPrefix(line, "broadcast ") ||
				strings.HasPrefix(line, "multicast ") || strings.Contains(line, "fe80::") || strings.Contains(line, "ff00::") {
				continue
			}
			b.WriteString(line)
		}
	}
	return b.String()
}

// HostState is everything egress-snat may change on H: policy rules and
// routes (Routing), iptables of both families and every ipset with its
// members (Ruleset).
func (l *Lab) HostState(t testing.TB) string {
	t.Helper()
	return l.Routing(t) + l.Ruleset(t)
}

// iptablesCmd names the command of the backend EGRESS_SNAT_IPTABLES selects:
// iptablesCmd(t, "ip6tables", "-save") is ip6tables-save, or
// ip6tables-legacy-save under EGRESS_SNAT_IPTABLES=legacy. Lab helpers that
// write rules use it so that they land in the backend the tool reads.
func iptablesCmd(t testing.TB, base, suffix string) string {
	t.Helper()
	switch b := os.Getenv("EGRESS_SNAT_IPTABLES"); b {
	case "":
		return base + suffix
	case "legacy", "nft":
		return base + "-" + b + suffix
	default:
		t.Fatalf("EGRESS_SNAT_IPTABLES=%q: want legacy or nft", b)
		return ""
	}
}

// HostAddrAdd adds cidr to dev in H (IPv6 with nodad, so it is usable at
// once). Beware that, as on any Linux host, an IPv6 address added to an
// existing prefix becomes that prefix's default source address, while an
// IPv4 address added to an existing subnet is a secondary.
func (l *Lab) HostAddrAdd(t testing.TB, cidr, dev string) {
	t.Helper()
	args := []string{"-n", l.Host, "addr", "add", cidr, "dev", dev}
	if strings.Contains(cidr, ":") {
		args = append(args, "nodad")
	}
	ip(t, args...)
}

// HostAddrDel removes cidr from dev in H.
func (l *Lab) HostAddrDel(t testing.TB, cidr, dev string) {
	t.Helper()
	ip(t, "-n", l.Host, "addr", "del", cidr, "dev", dev)
}

// ip runs ip(8) in the root namespace (always with -n for lab changes) and
// returns its output, failing the test on error.
func ip(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func sysctl(t testing.TB, ns string, settings ...string) {
	t.Helper()
	if stdout, stderr, code := runIn(ns, "sysctl", append([]string{"-q", "-w"}, settings...)...); code != 0 {
		t.Fatalf("in %s: sysctl %v: exit %d\n%s%s", ns, settings, code, stdout, stderr)
	}
}

// ipBatch runs several ip commands in ns with one process; ip stops at and
// reports the first failing line.
func ipBatch(t testing.TB, ns string, lines []string) {
	t.Helper()
	cmd := exec.Command("ip", "-n", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s -batch: %v\n%s\ninput:\n%s", ns, err, out, strings.Join(lines, "\n"))
	}
}

// waitIPv6Ready waits until IPv6 is really configured on devs in ns.
// A veth reports LOWER_UP at once, but the kernel's IPv6 setup for the
// link (link-local address, the ff00::/8 route without which neighbour
// solicitations are dropped) runs from the deferred carrier event, which
// can lag (see the ifindex note in New). Starting before that costs the
// first IPv6 connection a lost neighbour solicitation and a 1s SYN
// retransmit.
func waitIPv6Ready(t testing.TB, ns string, devs []string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		tentative := ip(t, "-n", ns, "-6", "addr", "show", "tentative")
		mroutes := ip(t, "-n", ns, "-6", "route", "show", "table", "all", "type", "multicast")
		ready := strings.TrimSpace(tentative) == ""
		for _, d := range devs {
			ready = ready && strings.Contains(mroutes, " dev "+d+" ")
		}
		if ready {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("netns %s: IPv6 on %v not ready after 5s\ntentative:\n%s\nmulticast routes:\n%s",
				ns, devs, tentative, mroutes)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Namespace names are "es-<pid>-<random>-h|g|c<n>". The random part keeps labs
// of one process apart; the pid keeps parallel test processes apart and
// lets sweepStale recognise labs whose process died without cleaning up
// (a go test timeout panics without running t.Cleanup).
const prefix = "es-"

var staleName = regexp.MustCompile(`^es-(\d+)-[0-9a-f]+-(?:[hg]|c\d+)$`)

func uniqueName() string {
	var b [4]byte
	rand.Read(b[:])
	return fmt.Sprintf("%s%d-%s", prefix, os.Getpid(), hex.EncodeToString(b[:]))
}

// sweepStale deletes lab namespaces left behind by processes that no longer
// exist. Labs of live processes, including parallel test binaries, are left
// alone. Best effort: errors are ignored.
func sweepStale() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		m := staleName.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			deleteNetns(e.Name())
		}
	}
}
