package lab

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/ha"
)

// HA is the lab of an egress gateway pair (issue 22): two gateways that
// share the clients' gateway address and the egress address with keepalived
// (VRRPv3), replicate their conntrack tables with conntrackd (FTFW), and run
// `egress-snat watch` on one desired-state file. Everything runs in
// namespaces of its own, the daemons with the configuration package ha
// generates.
//
//	C (clients) eth0: 10.50.0.10-.14/24, default via 10.50.0.1
//	      |
//	SW    brlan (bridge)                       brup (bridge)
//	      |              |                       |            |          |
//	A lan 10.50.0.2/24   B lan 10.50.0.3/24    A uplink     B uplink    R uplink
//	(VIP 10.50.0.1/24 on the master)           192.0.2.2    192.0.2.3   192.0.2.1/24
//	                                           (VIP 192.0.2.100/24 on the master)
//	A sync 10.51.0.1/24 ---- B sync 10.51.0.2/24   (conntrackd's own veth)
//
//	R (router) far 198.51.100.1/24 ---- F (far side) eth0 198.51.100.10/24,
//	                                        lo 203.0.113.10/32, default via R
//
// The gateways' default route is via R. R has no route to the clients'
// 10.50.0.0/24: a client packet that leaves a gateway untranslated reaches
// F, but F's answer dies at R, as on the Internet. The Sniffer on R's
// uplink records every packet the gateways send towards the far side, with
// the sending gateway's MAC address, so each packet is attributed to A or B
// and each source address counted (Far).
//
// Both bridges live in SW, a namespace of their own, so that cutting the
// VRRP path (SplitBrain) is a rule there and touches neither gateway's
// firewall.
type HA struct {
	// Namespaces (usable with `ip netns exec`).
	Clients, Switch, Router, Far string
	// A and B are the gateways; A has the higher priority and is master
	// after NewHA.
	A, B *Gateway
	// ClientAddrs are the client namespace's addresses, which the load
	// spreads its connections over.
	ClientAddrs []netip.Addr
	// Sniffer records what the gateways send towards the far side; see
	// Far.
	Sniffer *Sniffer
	// File is the desired-state file both watches follow.
	File string

	opts HAOptions
	dir  string // run-time files, under /run
	bin  string // the egress-snat binary
	far  *farServers
}

// Gateway is one node of the pair.
type Gateway struct {
	Name string // "a" or "b"
	NS   string
	// Config is what its files were generated from.
	Config ha.Config
	// UplinkMAC is its uplink's MAC address, how the far side's capture
	// tells the gateways apart.
	UplinkMAC net.HardwareAddr
	// Dir holds its generated files, pid files, the hook's log and the
	// drain file.
	Dir string

	h                          *HA
	keepalived, conntrackd, es *daemon
}

// The lab's addresses.
var (
	HAClientNet = netip.MustParsePrefix("10.50.0.0/24")
	HAClientVIP = netip.MustParsePrefix("10.50.0.1/24")
	HAEgressVIP = netip.MustParsePrefix("192.0.2.100/24")
	HAFar       = netip.MustParseAddr("198.51.100.10")
	HAFar2      = netip.MustParseAddr("203.0.113.10")
)

// Ports of the far side's servers (see haload.go).
const (
	HAEchoPort = 7100 // long-lived TCP connections: echo with a timestamp
	HAUDPPort  = 7101 // UDP echo
	HANewPort  = 7102 // the stream of new connections: one echo, then close
)

// HAOptions tune NewHA.
type HAOptions struct {
	// NoPreempt generates nopreempt instead of a delayed preemption: A does
	// not take the role back when it returns.
	NoPreempt bool
	// PreemptDelay is ha.Config's; 0 takes the package's default.
	PreemptDelay time.Duration
	// AdvertInterval is ha.Config's; 0 takes the package's default.
	AdvertInterval time.Duration
	// Binary is the egress-snat program to run; empty builds
	// ./cmd/egress-snat once per test process (BuildEgressSNAT).
	Binary string

	// LeakGuard changes the gateways' firewall beyond what egress-snat and
	// the ha package do: an instrument, not a part of the product.
	// LeakGuard adds to both gateways an nftables chain at postrouting,
	// just after source NAT (priority srcnat + 1), that counts and drops
	// every packet from the clients that leaves by the uplink with its
	// source untranslated. GuardDrops reads the count.
	LeakGuard bool
}

// RequireHA is Require for the HA lab: it also needs keepalived,
// conntrackd and conntrack (scripts/lab.sh deps installs them).
func RequireHA(t testing.TB) {
	t.Helper()
	Require(t)
	requireCommands(t, "keepalived", "conntrackd", "conntrack", "nft")
}

const haSuffix = "-ha-"

var (
	staleHANS  = regexp.MustCompile(`^es-(\d+)-[0-9a-f]+-ha-[a-z]+$`)
	staleHADir = regexp.MustCompile(`^es-ha-(\d+)-\d+$`)
)

// sweepStaleHA removes what HA labs of test processes that died without
// cleaning up (a go test timeout panics past t.Cleanup) left behind: their
// daemons first, which would otherwise keep the deleted namespaces alive,
// then the namespaces and run-time folders.
func sweepStaleHA() {
	sweepStaleDirs("/run/netns", staleHANS, func(dir string) {
		ns := filepath.Base(dir)
		out, _ := exec.Command("ip", "netns", "pids", ns).Output()
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		deleteNetns(ns)
	})
	sweepStaleDirs("/run", staleHADir, func(dir string) { os.RemoveAll(dir) })
}

// NewHA builds the pair, starts conntrackd, `egress-snat watch -f File` and
// keepalived on both gateways, and returns once A is master with its egress
// rule in place and B is backup. Every daemon is killed and every namespace
// deleted at t's cleanup, even if NewHA fails half-way.
func NewHA(t testing.TB, opts HAOptions) *HA {
	t.Helper()
	RequireHA(t)
	sweepStaleHA()

	base := uniqueName()
	h := &HA{
		Clients: base + haSuffix + "c",
		Switch:  base + haSuffix + "sw",
		Router:  base + haSuffix + "r",
		Far:     base + haSuffix + "f",
		opts:    opts,
	}
	h.A = &Gateway{Name: "a", NS: base + haSuffix + "a", h: h, UplinkMAC: mustMAC("02:00:00:00:0a:02")}
	h.B = &Gateway{Name: "b", NS: base + haSuffix + "b", h: h, UplinkMAC: mustMAC("02:00:00:00:0b:02")}
	namespaces := []string{h.Clients, h.Switch, h.A.NS, h.B.NS, h.Router, h.Far}
	// Registered first, so it runs last: after the daemons are gone.
	t.Cleanup(func() {
		for _, ns := range namespaces {
			if out, err := deleteNetns(ns); err != nil &&
				!strings.Contains(string(out), "No such file") {
				t.Errorf("lab: delete netns %s: %v: %s", ns, err, out)
			}
		}
		if h.dir != "" {
			os.RemoveAll(h.dir)
		}
	})
	// keepalived runs the hook only if no one but root can change it or
	// any directory above it: /tmp (world-writable) will not do.
	dir, err := os.MkdirTemp("/run", fmt.Sprintf("es-ha-%d-", os.Getpid()))
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	h.dir = dir
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatalf("lab: %v", err)
	}
	if opts.Binary != "" {
		h.bin = opts.Binary
	} else {
		h.bin = BuildEgressSNAT(t)
	}

	for _, ns := range namespaces {
		ip(t, "netns", "add", ns)
		// IPv4 only: no router solicitations, MLD or DAD in the captures.
		sysctl(t, ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
		ipBatch(t, ns, []string{"link set lo up"})
	}
	h.wire(t)
	h.startFar(t)
	h.Sniffer = Sniff(t, h.Router, "uplink", func(p *Packet) bool {
		// What goes towards the far side: every client flow, translated
		// or not. VRRP, ARP and the gateways' own chatter stay out.
		return p.Dst == HAFar || p.Dst == HAFar2
	})

	h.File = filepath.Join(dir, "egress-snat.yaml")
	rules := fmt.Sprintf("# Both gateways follow this file; only the master holds %s.\nrules:\n  - to: %s\n    from: [%s]\n    standby: true\n",
		HAEgressVIP.Addr(), HAEgressVIP.Addr(), HAClientNet)
	if err := os.WriteFile(h.File, []byte(rules), 0o644); err != nil {
		t.Fatalf("lab: %v", err)
	}
	for _, g := range []*Gateway{h.A, h.B} {
		g.configure(t)
	}
	// The daemons are killed before the namespaces go (LIFO cleanups).
	t.Cleanup(func() {
		for _, g := range []*Gateway{h.A, h.B} {
			for _, d := range []*daemon{g.keepalived, g.es, g.conntrackd} {
				d.kill()
			}
		}
		if t.Failed() {
			for _, g := range []*Gateway{h.A, h.B} {
				t.Logf("lab: gateway %s logs:\n%s", g.Name, g.Logs())
			}
		}
	})
	for _, g := range []*Gateway{h.A, h.B} {
		if opts.LeakGuard {
			g.nft(t, "add table ip es_leak_guard",
				"add chain ip es_leak_guard post { type filter hook postrouting priority srcnat + 1; policy accept; }",
				"add rule ip es_leak_guard post oifname uplink ip saddr "+HAClientNet.String()+" counter drop")
		}
		g.conntrackd = g.start(t, "conntrackd", "conntrackd", "-C", g.Config.Paths.ConntrackdConf)
	}
	for _, g := range []*Gateway{h.A, h.B} {
		waitFor(t, 10*time.Second, "conntrackd's socket in "+g.NS, func() bool {
			_, err := os.Stat(g.Config.Paths.ConntrackdSocket)
			return err == nil
		}, g.conntrackd)
		g.startWatch(t)
	}
	// A first: it is master from the start instead of preempting B.
	h.A.StartKeepalived(t)
	h.WaitRoles(t, h.A, 10*time.Second)
	h.B.StartKeepalived(t)
	h.WaitRoles(t, h.A, 10*time.Second)
	return h
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// wire creates the links, bridges, addresses and routes of the topology.
// Every veth is created inside a namespace and moved to its peer's, so
// nothing ever appears in the root namespace; each end gets an ifindex of
// its own (see the note in New).
func (h *HA) wire(t testing.TB) {
	t.Helper()
	idx := 100
	veth := func(ns, name, peerNS, peerName string, mac net.HardwareAddr) {
		args := []string{"-n", ns, "link", "add", name, "index", strconv.Itoa(idx)}
		if mac != nil {
			args = append(args, "address", mac.String())
		}
		args = append(args, "type", "veth", "peer", "name", peerName, "index", strconv.Itoa(idx+1), "netns", peerNS)
		ip(t, args...)
		idx += 2
	}
	a, b := h.A, h.B
	veth(h.Clients, "eth0", h.Switch, "c", nil)
	veth(a.NS, "lan", h.Switch, "a-lan", mustMAC("02:00:00:00:0a:01"))
	veth(b.NS, "lan", h.Switch, "b-lan", mustMAC("02:00:00:00:0b:01"))
	veth(a.NS, "uplink", h.Switch, "a-up", a.UplinkMAC)
	veth(b.NS, "uplink", h.Switch, "b-up", b.UplinkMAC)
	veth(h.Router, "uplink", h.Switch, "r-up", nil)
	veth(a.NS, "sync", b.NS, "sync", nil)
	veth(h.Router, "far", h.Far, "eth0", nil)

	// The switch: two plain bridges, no STP delay, multicast (VRRP)
	// flooded. Bridged traffic skips the switch's own netfilter.
	sysctlIfPresent(t, h.Switch, "net.bridge.bridge-nf-call-iptables", "0")
	sw := []string{
		"link add brlan type bridge forward_delay 0 mcast_snooping 0",
		"link add brup type bridge forward_delay 0 mcast_snooping 0",
	}
	for _, p := range []string{"c", "a-lan", "b-lan"} {
		sw = append(sw, "link set "+p+" master brlan", "link set "+p+" up")
	}
	for _, p := range []string{"a-up", "b-up", "r-up"} {
		sw = append(sw, "link set "+p+" master brup", "link set "+p+" up")
	}
	sw = append(sw, "link set brlan up", "link set brup up")
	ipBatch(t, h.Switch, sw)

	clients := []string{"link set eth0 up"}
	for i := 10; i < 15; i++ {
		addr := netip.AddrFrom4([4]byte{10, 50, 0, byte(i)})
		h.ClientAddrs = append(h.ClientAddrs, addr)
		clients = append(clients, fmt.Sprintf("addr add %s/24 dev eth0", addr))
	}
	ipBatch(t, h.Clients, clients)
	ipBatch(t, h.Clients, []string{"route add default via " + HAClientVIP.Addr().String()})

	for i, g := range []*Gateway{a, b} {
		sysctl(t, g.NS, haSysctls()...)
		ipBatch(t, g.NS, []string{
			fmt.Sprintf("addr add 10.50.0.%d/24 dev lan", 2+i),
			fmt.Sprintf("addr add 192.0.2.%d/24 dev uplink", 2+i),
			fmt.Sprintf("addr add 10.51.0.%d/24 dev sync", 1+i),
			"link set lan up", "link set uplink up", "link set sync up",
		})
		ipBatch(t, g.NS, []string{"route add default via 192.0.2.1"})
	}

	sysctl(t, h.Router, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
	ipBatch(t, h.Router, []string{
		"addr add 192.0.2.1/24 dev uplink",
		"addr add 198.51.100.1/24 dev far",
		"link set uplink up", "link set far up",
	})
	ipBatch(t, h.Router, []string{"route add " + HAFar2.String() + "/32 via " + HAFar.String()})
	ipBatch(t, h.Far, []string{
		"addr add " + HAFar.String() + "/24 dev eth0",
		"addr add " + HAFar2.String() + "/32 dev lo",
		"link set eth0 up",
	})
	ipBatch(t, h.Far, []string{"route add default via 198.51.100.1"})
}

// haSysctls are ha.Sysctls as sysctl -w arguments. The net.netfilter keys
// exist in a namespace once nf_conntrack is loaded, which it is on any
// machine that ran iptables' nat table.
func haSysctls() []string {
	var out []string
	for _, s := range ha.Sysctls {
		out = append(out, s.Key+"="+s.Value)
	}
	return out
}

func sysctlIfPresent(t testing.TB, ns, key, value string) {
	t.Helper()
	if _, _, code := runIn(ns, "sysctl", "-n", key); code == 0 {
		sysctl(t, ns, key+"="+value)
	}
}

// configure renders the gateway's files into its directory: the ha
// package's output with the lab's paths, so that the two gateways' daemons
// never share a lock, socket or pid file.
func (g *Gateway) configure(t testing.TB) {
	t.Helper()
	g.Dir = filepath.Join(g.h.dir, g.Name)
	if err := os.Mkdir(g.Dir, 0o755); err != nil {
		t.Fatalf("lab: %v", err)
	}
	self, peer := ha.Node{Name: "gw-a", Priority: 150, SyncAddr: netip.MustParseAddr("10.51.0.1")},
		ha.Node{Name: "gw-b", Priority: 100, SyncAddr: netip.MustParseAddr("10.51.0.2")}
	if g.Name == "b" {
		self, peer = peer, self
	}
	p := func(name string) string { return filepath.Join(g.Dir, name) }
	g.Config = ha.Config{
		Node: self, Peer: peer,
		ClientVIP: HAClientVIP, ClientInterface: "lan",
		EgressVIPs: []netip.Prefix{HAEgressVIP}, EgressInterface: "uplink",
		ClientRouterID: 50, EgressRouterID: 51,
		AdvertInterval: g.h.opts.AdvertInterval,
		Preempt:        !g.h.opts.NoPreempt,
		PreemptDelay:   g.h.opts.PreemptDelay,
		Sync:           ha.SyncLink{Interface: "sync"},
		NoSync: []netip.Prefix{
			netip.MustParsePrefix("10.50.0.2/31"), // the gateways' lan addresses
			netip.MustParsePrefix("192.0.2.2/31"), // and uplink addresses
		},
		Paths: ha.Paths{
			Keepalived:       p("keepalived.conf"),
			ConntrackdConf:   p("conntrackd.conf"),
			ConntrackdLock:   p("conntrackd.lock"),
			ConntrackdSocket: p("conntrackd.ctl"),
			Hook:             p("notify.sh"),
			WatchPIDFile:     p("watch.pid"),
			DrainFile:        p("drain"),
			StateFile:        p("state"),
			HookLog:          p("hook.log"),
		},
	}
	files, err := ha.Files(g.Config)
	if err != nil {
		t.Fatalf("lab: generating gateway %s's files: %v", g.Name, err)
	}
	for _, f := range files {
		if f.Path == ha.SysctlPath {
			continue // set in the namespace by wire, never on the machine
		}
		if err := os.WriteFile(f.Path, []byte(f.Content), os.FileMode(f.Mode)); err != nil {
			t.Fatalf("lab: %v", err)
		}
	}
}

// start runs name in the gateway's namespace, in a process group of its
// own, with its output kept (Logs).
func (g *Gateway) start(t testing.TB, what, name string, args ...string) *daemon {
	t.Helper()
	d := &daemon{name: what, done: make(chan struct{})}
	d.cmd = exec.Command("ip", append([]string{"netns", "exec", g.NS, name}, args...)...)
	// No test may read or write the machine's permanent file.
	d.cmd.Env = append(os.Environ(), "EGRESS_SNAT_CONFIG="+filepath.Join(g.Dir, "no-permanent-file.yaml"))
	d.cmd.Stdout, d.cmd.Stderr = &d.out, &d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("lab: starting %s in %s: %v", what, g.NS, err)
	}
	go func() { d.cmd.Wait(); close(d.done) }()
	return d
}

// kill sends SIGKILL to the daemon's process group (keepalived's VRRP
// child and any hook it runs included) and waits for it.
func (d *daemon) kill() {
	if d == nil || d.exited() {
		return
	}
	syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
	}
}

// startWatch runs `egress-snat watch -f File` and writes its pid where the
// hook looks for it.
func (g *Gateway) startWatch(t testing.TB) {
	t.Helper()
	g.es = g.start(t, "egress-snat watch", g.h.bin, "watch", "-f", g.h.File, "--log-format", "text")
	if err := os.WriteFile(g.Config.Paths.WatchPIDFile, []byte(strconv.Itoa(g.es.cmd.Process.Pid)+"\n"), 0o644); err != nil {
		t.Fatalf("lab: %v", err)
	}
	waitFor(t, 30*time.Second, "egress-snat watch to start in "+g.NS, func() bool {
		return strings.Contains(g.es.out.String(), "watch started")
	}, g.es)
}

// StartKeepalived starts keepalived in the foreground, VRRP only, with pid
// files of its own. A keepalived that is already running is killed first.
func (g *Gateway) StartKeepalived(t testing.TB) {
	t.Helper()
	g.keepalived.kill()
	g.keepalived = g.start(t, "keepalived", "keepalived", "--dont-fork", "--log-console", "--log-detail",
		"--vrrp", "-f", g.Config.Paths.Keepalived,
		"-p", filepath.Join(g.Dir, "keepalived.pid"), "-r", filepath.Join(g.Dir, "vrrp.pid"))
}

// Logs returns the gateway's daemons' output and its hook's log.
func (g *Gateway) Logs() string {
	var b strings.Builder
	for _, d := range []*daemon{g.keepalived, g.conntrackd, g.es} {
		if d != nil {
			fmt.Fprintf(&b, "--- %s:\n%s", d.name, d.out.String())
		}
	}
	hook, _ := os.ReadFile(g.Config.Paths.HookLog)
	fmt.Fprintf(&b, "--- hook log:\n%s", hook)
	return b.String()
}

// WatchLog is what the gateway's `egress-snat watch` has logged so far.
func (g *Gateway) WatchLog() string { return g.es.out.String() }

// HoldsVIPs reports whether the gateway holds both virtual addresses, and
// whether it holds either.
func (g *Gateway) HoldsVIPs(t testing.TB) (both, any bool) {
	t.Helper()
	out := ip(t, "-n", g.NS, "-4", "-o", "addr", "show")
	c := strings.Contains(out, " "+HAClientVIP.String()+" ")
	e := strings.Contains(out, " "+HAEgressVIP.String()+" ")
	return c && e, c || e
}

// HasEgressRule reports whether egress-snat's rule for the egress address
// is in place and active on the gateway (installed and not standing by),
// as egress-snat list --json says, in whichever backend the run uses.
func (g *Gateway) HasEgressRule(t testing.TB) bool {
	t.Helper()
	stdout, stderr, code := runIn(g.NS, g.h.bin, "list", "--json")
	if code != 0 {
		t.Fatalf("lab: egress-snat list in %s: %s", g.NS, stderr)
	}
	var list struct {
		Rules []struct {
			To   []string `json:"to"`
			Hold bool     `json:"hold"`
		} `json:"rules"`
	}
	if err := json.Unmarshal([]byte(stdout), &list); err != nil {
		t.Fatalf("lab: egress-snat list --json in %s: %v\n%s", g.NS, err, stdout)
	}
	for _, r := range list.Rules {
		if slices.Contains(r.To, HAEgressVIP.Addr().String()) && !r.Hold {
			return true
		}
	}
	return false
}

// WaitRoles waits until master holds both virtual addresses and its egress
// rule, and the other gateway holds neither address.
func (h *HA) WaitRoles(t testing.TB, master *Gateway, limit time.Duration) {
	t.Helper()
	h.waitMaster(t, master, true, limit)
}

// WaitMaster waits until master holds both virtual addresses and its
// egress rule, whatever the other gateway holds (a killed gateway keeps
// the addresses keepalived could not remove).
func (h *HA) WaitMaster(t testing.TB, master *Gateway, limit time.Duration) {
	t.Helper()
	h.waitMaster(t, master, false, limit)
}

func (h *HA) waitMaster(t testing.TB, master *Gateway, alone bool, limit time.Duration) {
	t.Helper()
	other := h.Peer(master)
	deadline := time.Now().Add(limit)
	for {
		mb, _ := master.HoldsVIPs(t)
		_, oa := other.HoldsVIPs(t)
		if mb && (!alone || !oa) && master.HasEgressRule(t) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("lab: after %s, %s holds both addresses: %v, its egress rule: %v; %s holds an address: %v\n%s\n%s",
				limit, master.Name, mb, master.HasEgressRule(t), other.Name, oa, master.Logs(), other.Logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Peer returns the other gateway.
func (h *HA) Peer(g *Gateway) *Gateway {
	if g == h.A {
		return h.B
	}
	return h.A
}

// Gateway returns the gateway whose uplink has mac, or nil.
func (h *HA) Gateway(mac [6]byte) *Gateway {
	for _, g := range []*Gateway{h.A, h.B} {
		if bytes.Equal(g.UplinkMAC, mac[:]) {
			return g
		}
	}
	return nil
}

// Kill kills the gateway hard, as a node that dies: kill -9 of keepalived
// (its whole process group, the VRRP child included, so no last advert
// leaves), then its three links down. conntrackd and egress-snat keep
// running, cut off. It returns when the kill was done.
func (g *Gateway) Kill(t testing.TB) time.Time {
	t.Helper()
	g.keepalived.kill()
	at := time.Now()
	ipBatch(t, g.NS, []string{"link set lan down", "link set uplink down", "link set sync down"})
	return at
}

// Revive brings a killed gateway back as after a restart of its network
// and keepalived: the virtual addresses keepalived could not remove when it
// was killed are removed, the links come up, the default route (which the
// kernel removed with the link) is added again, and keepalived starts
// (as backup; with preemption it takes the role back after its delay).
func (g *Gateway) Revive(t testing.TB) time.Time {
	t.Helper()
	out := ip(t, "-n", g.NS, "-4", "-o", "addr", "show")
	var cmds []string
	for _, v := range []struct {
		p   netip.Prefix
		dev string
	}{{HAClientVIP, "lan"}, {HAEgressVIP, "uplink"}} {
		if strings.Contains(out, " "+v.p.String()+" ") {
			cmds = append(cmds, fmt.Sprintf("addr del %s dev %s", v.p, v.dev))
		}
	}
	cmds = append(cmds, "link set lan up", "link set uplink up", "link set sync up")
	ipBatch(t, g.NS, cmds)
	ipBatch(t, g.NS, []string{"route replace default via 192.0.2.1"})
	at := time.Now()
	g.StartKeepalived(t)
	return at
}

// StopKeepalived stops keepalived cleanly (SIGTERM): it sends adverts of
// priority 0, so the peer takes over at once, and removes the addresses.
// Another graceful way out than Drain, which keeps the node in the
// election as backup; StartKeepalived brings it back.
func (g *Gateway) StopKeepalived(t testing.TB) time.Time {
	t.Helper()
	at := time.Now()
	if err := g.keepalived.stop(10 * time.Second); err != nil {
		t.Errorf("lab: %v", err)
	}
	return at
}

// Drain writes 1 into the gateway's drain file: keepalived drops the sync
// group's priority to 1 (with preemption; FAULT without), and the peer
// takes over when its master-down timer runs out.
func (g *Gateway) Drain(t testing.TB) time.Time {
	t.Helper()
	return g.writeDrain(t, "1")
}

// Undrain writes 0 into the drain file: the gateway rejoins the election
// (and, with preemption, takes the role back after its delay).
func (g *Gateway) Undrain(t testing.TB) time.Time {
	t.Helper()
	return g.writeDrain(t, "0")
}

func (g *Gateway) writeDrain(t testing.TB, v string) time.Time {
	t.Helper()
	// keepalived watches the file with inotify; write it in place.
	at := time.Now()
	if err := os.WriteFile(g.Config.Paths.DrainFile, []byte(v+"\n"), 0o644); err != nil {
		t.Fatalf("lab: %v", err)
	}
	return at
}

// SplitBrain cuts the VRRP path: the switch drops VRRP on both bridges, so
// that each gateway stops hearing the other and both become master. The
// data paths and the sync link stay up.
func (h *HA) SplitBrain(t testing.TB) time.Time {
	t.Helper()
	at := time.Now()
	h.nft(t, "add table bridge es_split_brain",
		"add chain bridge es_split_brain forward { type filter hook forward priority 0; policy accept; }",
		"add rule bridge es_split_brain forward ip protocol vrrp drop")
	return at
}

// Heal undoes SplitBrain.
func (h *HA) Heal(t testing.TB) time.Time {
	t.Helper()
	at := time.Now()
	h.nft(t, "delete table bridge es_split_brain")
	return at
}

func (h *HA) nft(t testing.TB, cmds ...string) {
	t.Helper()
	nftIn(t, h.Switch, cmds...)
}

func (g *Gateway) nft(t testing.TB, cmds ...string) {
	t.Helper()
	nftIn(t, g.NS, cmds...)
}

func nftIn(t testing.TB, ns string, cmds ...string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("lab: nft in %s: %v\n%s", ns, err, out)
	}
}

// run runs name in the gateway's namespace, failing t if it fails.
func (g *Gateway) run(t testing.TB, name string, args ...string) string {
	t.Helper()
	stdout, stderr, code := runIn(g.NS, name, args...)
	if code != 0 {
		t.Fatalf("lab: in %s: %s %s: exit %d\n%s%s", g.NS, name, strings.Join(args, " "), code, stdout, stderr)
	}
	return stdout
}

var guardCounter = regexp.MustCompile(`counter packets (\d+)`)

// GuardDrops returns how many packets the leak guard (HAOptions.LeakGuard)
// of each gateway has dropped so far, by gateway name; nil without it.
func (h *HA) GuardDrops(t testing.TB) map[string]int {
	t.Helper()
	if !h.opts.LeakGuard {
		return nil
	}
	out := map[string]int{}
	for _, g := range []*Gateway{h.A, h.B} {
		m := guardCounter.FindStringSubmatch(g.run(t, "nft", "list", "table", "ip", "es_leak_guard"))
		if m == nil {
			t.Fatalf("lab: no counter in %s's leak guard", g.Name)
		}
		out[g.Name], _ = strconv.Atoi(m[1])
	}
	return out
}

// Event is one timestamped line of a gateway's hook log or of its
// egress-snat's log.
type Event struct {
	At   time.Time
	Node string
	What string
}

// Events returns the gateway's hook steps and egress-snat's reconciles, in
// time order (the hook logs nanoseconds, egress-snat milliseconds).
func (g *Gateway) Events() []Event {
	var ev []Event
	if f, err := os.Open(g.Config.Paths.HookLog); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// 1765040143.123456789 gw-a conntrackd -c ok
			ts, rest, ok := strings.Cut(sc.Text(), " ")
			if !ok {
				continue
			}
			sec, err := strconv.ParseFloat(ts, 64)
			if err != nil {
				continue
			}
			whole := int64(sec)
			nsec := int64(0)
			if _, frac, ok := strings.Cut(ts, "."); ok {
				nsec, _ = strconv.ParseInt((frac + "000000000")[:9], 10, 64)
			}
			_, what, _ := strings.Cut(rest, " ")
			ev = append(ev, Event{At: time.Unix(whole, nsec), Node: g.Name, What: "hook: " + what})
		}
		f.Close()
	}
	for line := range strings.Lines(g.WatchLog()) {
		if !strings.Contains(line, "msg=converged") && !strings.Contains(line, "msg=\"deleted conntrack") &&
			!strings.Contains(line, "left out") && !strings.Contains(line, "is back") {
			continue
		}
		ts, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil {
			continue
		}
		ev = append(ev, Event{At: at, Node: g.Name, What: "egress-snat: " + strings.TrimSpace(line[strings.Index(line, "msg="):])})
	}
	slices.SortStableFunc(ev, func(a, b Event) int { return a.At.Compare(b.At) })
	return ev
}

var haBuild struct {
	once sync.Once
	path string
	err  error
}

const haBinDirPrefix = "es-bin-"

var staleHABinDir = regexp.MustCompile(`^` + haBinDirPrefix + `(\d+)-\d+$`)

// BuildEgressSNAT builds ./cmd/egress-snat once per test process, as
// cmd/egress-snat's own end-to-end tests do, into a temporary directory
// removed by a later process once this one is gone.
func BuildEgressSNAT(t testing.TB) string {
	t.Helper()
	haBuild.once.Do(func() {
		sweepStaleDirs(os.TempDir(), staleHABinDir, func(dir string) { os.RemoveAll(dir) })
		dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", haBinDirPrefix, os.Getpid()))
		if err != nil {
			haBuild.err = err
			return
		}
		goCmd, err := exec.LookPath("go")
		if err != nil {
			goCmd = "/usr/local/go/bin/go" // where .ci/run and the README put Go
		}
		bin := filepath.Join(dir, "egress-snat")
		if out, err := exec.Command(goCmd, "build", "-o", bin, "github.com/egress-snat/egress-snat/cmd/egress-snat").CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			haBuild.err = fmt.Errorf("building cmd/egress-snat: %v\n%s", err, out)
			return
		}
		haBuild.path = bin
	})
	if haBuild.err != nil {
		t.Fatalf("lab: %v", haBuild.err)
	}
	return haBuild.path
}

// CTEvents is a running `conntrack -E` in a gateway: every change of its
// conntrack table, with the kernel's timestamp.
type CTEvents struct {
	g *Gateway
	d *daemon
}

// WatchConntrack starts recording the gateway's conntrack events; Stop
// returns them. The recorder is killed at t's cleanup too.
func (g *Gateway) WatchConntrack(t testing.TB) *CTEvents {
	t.Helper()
	d := g.start(t, "conntrack -E", "conntrack", "-E", "-o", "timestamp")
	t.Cleanup(d.kill)
	return &CTEvents{g: g, d: d}
}

// Stop ends the recording and returns the events, each What being
// conntrack's line without its timestamp ("[NEW] udp 17 30 src=...").
func (c *CTEvents) Stop() []Event {
	time.Sleep(50 * time.Millisecond) // let the last events out
	c.d.kill()
	var ev []Event
	for line := range strings.Lines(c.d.out.String()) {
		// [1796576458.448896]	    [NEW] udp      17 30 src=...
		rest, ok := strings.CutPrefix(line, "[")
		if !ok {
			continue
		}
		ts, what, ok := strings.Cut(rest, "]")
		if !ok {
			continue
		}
		sec, frac, _ := strings.Cut(ts, ".")
		s, err1 := strconv.ParseInt(sec, 10, 64)
		ns, err2 := strconv.ParseInt((frac + "000000000")[:9], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		ev = append(ev, Event{At: time.Unix(s, ns), Node: c.g.Name, What: "ct " + strings.Join(strings.Fields(what), " ")})
	}
	return ev
}
