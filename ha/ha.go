// Package ha writes the configuration of an egress gateway pair: two hosts
// that share the clients' gateway address and the egress address, so that
// one of them forwards and translates the clients' traffic and the other
// takes over, keeping every established connection, when the first fails.
//
// It drives two proven engines and implements neither:
//
//   - keepalived (VRRPv3) moves the addresses. Both addresses live in VRRP
//     instances of one sync group, so they always move together: a node
//     that holds the clients' gateway but not the egress address would
//     forward traffic it cannot translate.
//   - conntrackd (FTFW over UDP on a dedicated link) replicates the
//     conntrack table, NAT bindings included, into an external cache on the
//     backup. The notify hook commits that cache into the kernel when the
//     backup becomes master, so the new master already knows every
//     connection and the source port each one was translated to.
//
// The package owns the text of keepalived.conf, conntrackd.conf, the notify
// hook and the sysctls a gateway needs, rendered from one Config per node.
// It writes no file and runs nothing: callers (a CLI command, the tests'
// lab) decide where the text goes. Each template is pinned by a golden test
// and checked by the real programs (keepalived -t, a conntrackd started in a
// namespace, sh -n and a run of the hook against recording stand-ins).
package ha

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"time"
)

// Config is everything that differs between pairs and between the two
// nodes of a pair. Zero values of the optional fields take the defaults
// documented on each; Render works on a copy with them filled in.
type Config struct {
	// Node is the node whose files are rendered, Peer the other one. Their
	// priorities must differ, so that the election never depends on
	// addresses: the higher one is master when both are up.
	Node Node `yaml:"node"`
	Peer Node `yaml:"peer"`

	// ClientVIP is the clients' default gateway, with the prefix length of
	// their subnet (10.50.0.1/24), on ClientInterface.
	ClientVIP       netip.Prefix `yaml:"client-vip"`
	ClientInterface string       `yaml:"client-interface"`
	// EgressVIPs are the addresses the clients' traffic leaves with
	// (192.0.2.100/24), on EgressInterface. egress-snat's rules name them
	// in to:.
	EgressVIPs      []netip.Prefix `yaml:"egress-vips"`
	EgressInterface string         `yaml:"egress-interface"`
	// VRRPInterface, if set, carries the adverts of both instances (for
	// example a dedicated link); the addresses stay on their own
	// interfaces, which the instances then track. Empty: each instance
	// advertises on its addresses' interface, so that losing either link
	// moves the whole group.
	VRRPInterface string `yaml:"vrrp-interface"`
	// ClientRouterID and EgressRouterID are the two instances'
	// virtual_router_ids (1..255, distinct, the same on both nodes).
	ClientRouterID int `yaml:"client-router-id"`
	EgressRouterID int `yaml:"egress-router-id"`
	// AdvertInterval is VRRP's advert interval, in steps of 10ms (VRRPv3
	// counts centiseconds). Default 100ms: a master is declared dead after
	// three missed adverts and a skew, about 0.35s.
	AdvertInterval time.Duration `yaml:"advert-interval"`

	// Preempt makes the node with the higher priority take the role back
	// when it returns (failback), PreemptDelay after it has seen the
	// current master. The delay is what gives the returning node time to
	// fetch the peer's connections (conntrackd -n in the hook) before it
	// commits them; default 2s when Preempt is set. The node of lower
	// priority preempts at once: it only finds a master below it when
	// that one is drained. Without Preempt (nopreempt) a returning node
	// stays backup until the master fails or is drained.
	Preempt      bool          `yaml:"preempt"`
	PreemptDelay time.Duration `yaml:"preempt-delay"`

	// Sync is the dedicated link conntrackd replicates over.
	Sync SyncLink `yaml:"sync"`

	// PurgeTimeout is how long after becoming backup a node flushes the
	// connections it still holds in its kernel (conntrackd -t in the
	// hook schedules it; becoming master again cancels it). A stale entry
	// that holds the translated port of a connection the node takes over
	// later makes the commit of that connection fail and the kernel
	// translate it to another port: the far side resets it. So the flush
	// must come before the node can take the role back: with Preempt,
	// PurgeTimeout must be shorter than PreemptDelay. Default 1s, which
	// still leaves the neighbours time to follow the new master's
	// gratuitous ARPs; conntrackd's own default is 60s.
	PurgeTimeout time.Duration `yaml:"purge-timeout"`

	// NoSync lists further addresses or prefixes whose connections
	// conntrackd does not replicate: the nodes' own addresses, whose
	// connections end on the node itself and mean nothing to the peer.
	// Loopback, the virtual addresses and the sync link are always left
	// out.
	NoSync []netip.Prefix `yaml:"no-sync"`

	// Paths are where the rendered files and the daemons' run-time files
	// live on the node.
	Paths Paths `yaml:"paths"`
}

// Node is one gateway of the pair.
type Node struct {
	// Name is keepalived's router_id and names the node in the files'
	// comments and the hook's log: letters, digits, '.', '_' and '-'.
	Name string `yaml:"name"`
	// Priority is the VRRP priority, 1..254 (255 would make the node the
	// address owner, which cannot be preempted or drained).
	Priority int `yaml:"priority"`
	// SyncAddr is the node's address on the dedicated sync link.
	SyncAddr netip.Addr `yaml:"sync-addr"`
}

// SyncLink is conntrackd's dedicated link between the two nodes.
type SyncLink struct {
	// Interface is this node's end of the link.
	Interface string `yaml:"interface"`
	// Port is the UDP port both conntrackds use; default 3780.
	Port int `yaml:"port"`
}

// Paths are the node's file locations. Every path is absolute; the
// defaults are those of the Debian packages of keepalived and conntrackd
// and of egress-snat's own files.
type Paths struct {
	// Keepalived is where keepalived.conf goes
	// (/etc/keepalived/keepalived.conf); it is only named in comments.
	Keepalived string `yaml:"keepalived"`
	// ConntrackdConf is conntrackd.conf (/etc/conntrackd/conntrackd.conf);
	// the hook passes it to every conntrackd call.
	ConntrackdConf string `yaml:"conntrackd-conf"`
	// Conntrackd is the conntrackd program (/usr/sbin/conntrackd).
	Conntrackd string `yaml:"conntrackd"`
	// ConntrackdLock and ConntrackdSocket are conntrackd's LockFile and
	// UNIX socket (/var/lock/conntrack.lock, /var/run/conntrackd.ctl). Two
	// conntrackds on one machine (a lab) need their own.
	ConntrackdLock   string `yaml:"conntrackd-lock"`
	ConntrackdSocket string `yaml:"conntrackd-socket"`
	// Hook is the notify hook keepalived runs
	// (/etc/keepalived/egress-snat-notify.sh).
	Hook string `yaml:"hook"`
	// WatchPIDFile holds the pid of `egress-snat watch` when it does not
	// run under systemd (/run/egress-snat.pid); the hook signals it.
	WatchPIDFile string `yaml:"watch-pid-file"`
	// DrainFile is keepalived's track file: writing 1 into it drains the
	// node, writing 0 returns it (/run/egress-snat-ha.drain). With Preempt
	// the drained node's priority drops to 1 and stays backup; without, it
	// goes to FAULT. Either way the peer takes over when its master-down
	// timer runs out (three adverts and a skew, ~0.35s at 100ms adverts).
	DrainFile string `yaml:"drain-file"`
	// HookLog, if set, is a file the hook appends each step to, with a
	// timestamp; empty: the hook logs to syslog with logger(1).
	HookLog string `yaml:"hook-log"`
	// StateFile is where the hook records the state keepalived gave it
	// last (MASTER, BACKUP, FAULT) and when, replaced whole on each
	// transition (/run/egress-snat-ha.state): keepalived itself tells no
	// one which role the node holds, and `egress-snat ha status` reads
	// it. Under /run, so that a reboot leaves no stale role behind.
	StateFile string `yaml:"state-file"`
}

// Default values of the optional fields.
const (
	DefaultAdvertInterval = 100 * time.Millisecond
	DefaultPreemptDelay   = 2 * time.Second
	DefaultSyncPort       = 3780
	DefaultPurgeTimeout   = time.Second
)

// DefaultPaths are the paths of a node that runs the Debian packages.
var DefaultPaths = Paths{
	Keepalived:       "/etc/keepalived/keepalived.conf",
	ConntrackdConf:   "/etc/conntrackd/conntrackd.conf",
	Conntrackd:       "/usr/sbin/conntrackd",
	ConntrackdLock:   "/var/lock/conntrack.lock",
	ConntrackdSocket: "/var/run/conntrackd.ctl",
	Hook:             "/etc/keepalived/egress-snat-notify.sh",
	WatchPIDFile:     "/run/egress-snat.pid",
	DrainFile:        "/run/egress-snat-ha.drain",
	StateFile:        "/run/egress-snat-ha.state",
}

// withDefaults returns a copy of c with every unset optional field set.
func (c Config) withDefaults() Config {
	if c.AdvertInterval == 0 {
		c.AdvertInterval = DefaultAdvertInterval
	}
	if c.Preempt && c.PreemptDelay == 0 {
		c.PreemptDelay = DefaultPreemptDelay
	}
	if c.Sync.Port == 0 {
		c.Sync.Port = DefaultSyncPort
	}
	if c.PurgeTimeout == 0 {
		c.PurgeTimeout = DefaultPurgeTimeout
	}
	d := DefaultPaths
	set := func(got *string, def string) {
		if *got == "" {
			*got = def
		}
	}
	set(&c.Paths.Keepalived, d.Keepalived)
	set(&c.Paths.ConntrackdConf, d.ConntrackdConf)
	set(&c.Paths.Conntrackd, d.Conntrackd)
	set(&c.Paths.ConntrackdLock, d.ConntrackdLock)
	set(&c.Paths.ConntrackdSocket, d.ConntrackdSocket)
	set(&c.Paths.Hook, d.Hook)
	set(&c.Paths.WatchPIDFile, d.WatchPIDFile)
	set(&c.Paths.DrainFile, d.DrainFile)
	set(&c.Paths.StateFile, d.StateFile)
	return c
}

var (
	nodeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	// Interface names as the kernel takes them (IFNAMSIZ 16 with the NUL),
	// restricted to the characters that need no quoting in either file.
	ifName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@-]{0,14}$`)
	// Paths are written unquoted into conntrackd.conf and quoted into a
	// shell script: no spaces, quotes or shell metacharacters.
	safePath = regexp.MustCompile(`^/[A-Za-z0-9._/+-]*$`)
)

// Validate reports every problem of c (after defaults), each naming the bad
// value, joined; nil if the pair can be rendered.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	for _, n := range []struct {
		role string
		n    Node
	}{{"node", c.Node}, {"peer", c.Peer}} {
		if !nodeName.MatchString(n.n.Name) {
			bad("%s name %q: want 1-63 letters, digits, '.', '_' or '-'", n.role, n.n.Name)
		}
		if n.n.Priority < 1 || n.n.Priority > 254 {
			bad("%s %s priority %d: want 1..254 (255 is the address owner, which can be neither preempted nor drained)", n.role, n.n.Name, n.n.Priority)
		}
		if !n.n.SyncAddr.IsValid() {
			bad("%s %s: no sync link address", n.role, n.n.Name)
		} else if n.n.SyncAddr.Zone() != "" {
			bad("%s %s sync address %s: no zone, please (the link is Sync.Interface)", n.role, n.n.Name, n.n.SyncAddr)
		}
	}
	if c.Node.Name == c.Peer.Name && c.Node.Name != "" {
		bad("node and peer are both named %q", c.Node.Name)
	}
	if c.Node.Priority == c.Peer.Priority {
		bad("node %s and peer %s both have priority %d: the election would fall to their addresses", c.Node.Name, c.Peer.Name, c.Node.Priority)
	}
	if c.Node.SyncAddr.IsValid() && c.Peer.SyncAddr.IsValid() {
		switch {
		case c.Node.SyncAddr == c.Peer.SyncAddr:
			bad("node and peer share the sync address %s", c.Node.SyncAddr)
		case c.Node.SyncAddr.Is4() != c.Peer.SyncAddr.Is4():
			bad("sync addresses %s and %s are of different families", c.Node.SyncAddr, c.Peer.SyncAddr)
		}
	}

	vip := func(what string, p netip.Prefix) {
		switch {
		case !p.IsValid():
			bad("%s: no address", what)
		case !p.Addr().Is4() || p.Addr().Is4In6():
			// VRRPv3 instances are of one family; a second instance pair
			// for IPv6 is future work.
			bad("%s %s: only IPv4 addresses for now", what, p)
		case p.Bits() == 32 && what == "client VIP":
			bad("client VIP %s: give the clients' prefix length (10.50.0.1/24), it makes the subnet's route", p)
		}
	}
	vip("client VIP", c.ClientVIP)
	if len(c.EgressVIPs) == 0 {
		bad("no egress VIP")
	}
	seen := map[netip.Addr]bool{c.ClientVIP.Addr(): true}
	for _, p := range c.EgressVIPs {
		vip("egress VIP", p)
		if seen[p.Addr()] {
			bad("egress VIP %s is named twice (or is the client VIP)", p.Addr())
		}
		seen[p.Addr()] = true
	}
	for _, i := range []struct{ what, name string }{
		{"client interface", c.ClientInterface},
		{"egress interface", c.EgressInterface},
		{"sync interface", c.Sync.Interface},
	} {
		if !ifName.MatchString(i.name) {
			bad("%s %q: not an interface name", i.what, i.name)
		}
	}
	if c.VRRPInterface != "" && !ifName.MatchString(c.VRRPInterface) {
		bad("VRRP interface %q: not an interface name", c.VRRPInterface)
	}
	for _, r := range []struct {
		what string
		id   int
	}{{"client virtual_router_id", c.ClientRouterID}, {"egress virtual_router_id", c.EgressRouterID}} {
		if r.id < 1 || r.id > 255 {
			bad("%s %d: want 1..255", r.what, r.id)
		}
	}
	if c.ClientRouterID == c.EgressRouterID {
		bad("both instances have virtual_router_id %d", c.ClientRouterID)
	}
	if c.AdvertInterval < 10*time.Millisecond || c.AdvertInterval > 40950*time.Millisecond || c.AdvertInterval%(10*time.Millisecond) != 0 {
		bad("advert interval %s: want 10ms..40.95s in steps of 10ms (VRRPv3 counts centiseconds)", c.AdvertInterval)
	}
	if c.PreemptDelay < 0 || c.PreemptDelay > 1000*time.Second || c.PreemptDelay%time.Millisecond != 0 {
		bad("preempt delay %s: want 0..1000s in milliseconds", c.PreemptDelay)
	}
	if !c.Preempt && c.PreemptDelay != 0 {
		bad("preempt delay %s without Preempt: nopreempt never preempts", c.PreemptDelay)
	}
	if c.PurgeTimeout < time.Second || c.PurgeTimeout%time.Second != 0 {
		bad("purge timeout %s: want whole seconds, at least 1s", c.PurgeTimeout)
	} else if c.Preempt && c.PurgeTimeout >= c.PreemptDelay {
		bad("purge timeout %s is not shorter than the preempt delay %s: a returning node would take the role back with its stale connections", c.PurgeTimeout, c.PreemptDelay)
	}
	if c.Sync.Port < 1 || c.Sync.Port > 65535 {
		bad("sync port %d: want 1..65535", c.Sync.Port)
	}
	for _, p := range c.NoSync {
		if !p.IsValid() {
			bad("no-sync entry %s: not a prefix", p)
		} else if p != p.Masked() {
			bad("no-sync entry %s has host bits set; did you mean %s?", p, p.Masked())
		}
	}
	for _, p := range []struct{ what, path string }{
		{"keepalived.conf path", c.Paths.Keepalived},
		{"conntrackd.conf path", c.Paths.ConntrackdConf},
		{"conntrackd path", c.Paths.Conntrackd},
		{"conntrackd lock file", c.Paths.ConntrackdLock},
		{"conntrackd socket", c.Paths.ConntrackdSocket},
		{"hook path", c.Paths.Hook},
		{"watch pid file", c.Paths.WatchPIDFile},
		{"drain file", c.Paths.DrainFile},
		{"state file", c.Paths.StateFile},
		{"hook log", c.Paths.HookLog},
	} {
		if p.path == "" && p.what == "hook log" {
			continue
		}
		if !safePath.MatchString(p.path) || filepath.Clean(p.path) != p.path {
			bad("%s %q: want a clean absolute path of letters, digits and ._/+-", p.what, p.path)
		}
	}
	return errors.Join(errs...)
}
