package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/ha"
	"github.com/egress-snat/egress-snat/snat"
)

var keepalivedConfFlag = &cli.StringFlag{Name: "keepalived-conf", Value: ha.DefaultPaths.Keepalived, TakesFile: true, EnvVars: []string{keepalivedConfEnv},
	Usage: "the keepalived.conf that ha config wrote, `FILE`: it names the drain file, the hook, and through the hook conntrackd and the state file"}

// keepalivedConfEnv names the keepalived.conf of a pair whose files are
// not in /etc (check, list and stats, which have no flag for it, read it
// too).
const keepalivedConfEnv = "EGRESS_SNAT_KEEPALIVED_CONF"

var haDrainCommand = haSubcommand(&cli.Command{
	Name:      "drain",
	Usage:     "hand the role to the peer for maintenance, keeping the connections, and stay out of the election until ha undrain",
	UsageText: "egress-snat ha drain [--keepalived-conf FILE] [--timeout 5s | --no-wait]",
	Description: `Writes 1 into the drain file that keepalived.conf tracks. keepalived lowers
the node's priority to 1 (with --preempt; without, it puts the node into
FAULT), and the peer takes over when its master-down timer runs out, about
3.5 adverts (~0.35s) after this node's last advert of higher priority: its
hook commits this node's connections, which therefore survive. This node
stays backup and keeps its conntrackd in sync until ha undrain.

ha drain then waits (--timeout) for the hook to record that this node left
the master role, and exits 1 if it did not: the peer is down, or keepalived
is not running. A drain stays in place across restarts of keepalived, and
is gone after a reboot (the file is under /run).`,
	Flags: []cli.Flag{
		keepalivedConfFlag,
		&cli.DurationFlag{Name: "timeout", Value: 5 * time.Second, Usage: "how long (`DURATION`) to wait for the node to leave the master role"},
		&cli.BoolFlag{Name: "no-wait", Usage: "write the drain file and return"},
	},
	Action: func(c *cli.Context) error { return haDrain(c, true) },
})

var haUndrainCommand = haSubcommand(&cli.Command{
	Name:      "undrain",
	Usage:     "return the node to the election after ha drain",
	UsageText: "egress-snat ha undrain [--keepalived-conf FILE]",
	Description: `Writes 0 into the drain file. keepalived gives the node its priority back:
with --preempt the node of higher priority takes the role back after its
preempt delay (2s; time to fetch the connections made meanwhile), the other
one stays backup while the peer is master; without --preempt the node stays
backup until the peer fails or is drained.`,
	Flags:  []cli.Flag{keepalivedConfFlag},
	Action: func(c *cli.Context) error { return haDrain(c, false) },
})

// haInstalled reads the node's files, saying what to do when they are
// missing.
func haInstalled(c *cli.Context) (ha.Installed, error) {
	path := c.String("keepalived-conf")
	in, err := ha.ReadInstalled(path)
	if errors.Is(err, fs.ErrNotExist) && in.Hook == "" {
		return in, cli.Exit(fmt.Sprintf("%v: this node has no pair configuration yet (egress-snat ha config writes it)", err), exitFailure)
	}
	if err != nil {
		return in, cli.Exit(err.Error(), exitFailure)
	}
	return in, nil
}

func haDrain(c *cli.Context, drain bool) error {
	if c.NArg() > 0 {
		return usageError("ha %s takes no arguments, got %s", c.Command.Name, quoteValue(c.Args().First()))
	}
	in, err := haInstalled(c)
	if err != nil {
		return err
	}
	value := "0"
	if drain {
		value = "1"
	}
	out := c.App.Writer
	old, _ := os.ReadFile(in.DrainFile)
	already := strings.TrimSpace(string(old)) == value
	// keepalived follows the file with inotify: written in place, as it
	// reads it on each change.
	if !already {
		if err := os.WriteFile(in.DrainFile, []byte(value+"\n"), 0o644); err != nil {
			return cli.Exit(fmt.Sprintf("writing the drain file: %v", err), exitFailure)
		}
	}
	running, _ := keepalivedRunning()
	state, stateErr := ha.ReadState(in.StateFile)
	node := in.Node
	if !drain {
		if already {
			fmt.Fprintf(out, "%s is not drained (%s holds 0): nothing to change\n", node, in.DrainFile)
		} else {
			fmt.Fprintf(out, "undrained %s: %s holds 0\n", node, in.DrainFile)
		}
		switch {
		case !running:
			fmt.Fprintln(out, "keepalived is not running here: the node joins the election when it starts")
		case in.PreemptDelay > 0:
			fmt.Fprintf(out, "it has the higher priority: it takes the role back %s after it hears the peer's next advert (preempt delay), keeping the connections\n", in.PreemptDelay)
		case in.Preempt:
			fmt.Fprintln(out, "it has the lower priority: it stays backup while the peer is master")
		default:
			fmt.Fprintln(out, "without preemption it stays backup until the peer fails or is drained")
		}
		return nil
	}

	if already {
		fmt.Fprintf(out, "%s is drained already (%s holds 1)\n", node, in.DrainFile)
	} else {
		fmt.Fprintf(out, "drained %s: %s holds 1\n", node, in.DrainFile)
	}
	if !running {
		fmt.Fprintln(out, "keepalived is not running here: the node will start drained, and stay backup")
		return nil
	}
	if stateErr == nil && state.State != "MASTER" {
		fmt.Fprintf(out, "%s is %s: it will not take the role while drained (ha undrain returns it)\n", node, state.State)
		return nil
	}
	how := "lowers its priority to 1"
	if !in.Preempt {
		how = "puts it into FAULT"
	}
	fmt.Fprintf(out, "keepalived %s; the peer takes over ~%s after this node's last advert and commits its connections\n",
		how, ha.MasterDown(in.AdvertInterval).Round(10*time.Millisecond))
	if c.Bool("no-wait") {
		return nil
	}
	start := haNow()
	limit := c.Duration("timeout")
	for {
		st, err := ha.ReadState(in.StateFile)
		if err == nil && st.State != "MASTER" {
			fmt.Fprintf(out, "%s is %s since %s after the drain; ha undrain returns it to the election\n", node, st.State, st.Since.Sub(start).Round(10*time.Millisecond))
			return nil
		}
		if haNow().Sub(start) >= limit {
			return cli.Exit(fmt.Sprintf("%s is still MASTER %s after the drain: the peer has not taken over. Is it up? (egress-snat ha status on it) "+
				"The drain stays in place; ha undrain removes it", node, limit), exitFailure)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var haStatusCommand = haSubcommand(&cli.Command{
	Name:      "status",
	Usage:     "show this node's VRRP role, its virtual addresses and the health of conntrackd's sync (as root)",
	UsageText: "egress-snat ha status [--keepalived-conf FILE] [--json] [--window 3s]",
	Description: `Reads the role keepalived gave the node last (the notify hook records it),
checks that keepalived runs in this network namespace, that the node holds
the virtual addresses if and only if it is master, and whether it is
drained. Then it samples conntrackd -s (and -s link, -s queue) until a
message from the peer arrives, at most --window: healthy when the sync link
is up, the peer was heard (its conntrackd sends at least one message a
second) and nothing failed to send or arrive. It shows how many of the
peer's connections this node holds (the external cache, committed when it
takes over) and how many of its own it replicates.

It exits 0 when all is well, 1 with the reasons when not. A split brain
(the VRRP path between the nodes cut) shows as MASTER on both nodes; a
master also probes its virtual addresses with ARP (sender 0.0.0.0, which
teaches no neighbour anything) and names the other node that answers for
them: a split brain, said on each node that sees the other answer. check,
list and stats show the role and the sync's health too.`,
	Flags: []cli.Flag{
		keepalivedConfFlag,
		&cli.DurationFlag{Name: "window", Value: 3 * time.Second, Usage: "how long (`DURATION`) to wait for a message from the peer"},
		jsonFlag,
	},
	Action: haStatus,
})

// haStatusReport is ha status --json.
type haStatusReport struct {
	Healthy  bool     `json:"healthy"`
	Problems []string `json:"problems"`
	Notes    []string `json:"notes"`

	Node string `json:"node"`
	// Role is the state the hook recorded last: MASTER, BACKUP, FAULT,
	// or "" when it recorded none.
	Role              string     `json:"role"`
	Since             *time.Time `json:"since,omitempty"`
	Drained           bool       `json:"drained"`
	KeepalivedRunning bool       `json:"keepalived_running"`
	// SplitBrain: this node is master and another answers for its
	// addresses.
	SplitBrain bool          `json:"split_brain"`
	Addresses  []haAddress   `json:"addresses"`
	Sync       haSyncReport  `json:"sync"`
	Files      haStatusFiles `json:"files"`
}

type haAddress struct {
	ha.VIP
	Held bool `json:"held"`
	// AlsoHeldBy are the hardware addresses of other hosts that answered
	// an ARP probe for it (a master probes its addresses).
	AlsoHeldBy []string `json:"also_held_by,omitempty"`
}

type haStatusFiles struct {
	Keepalived     string `json:"keepalived"`
	Hook           string `json:"hook"`
	ConntrackdConf string `json:"conntrackd_conf"`
	StateFile      string `json:"state_file"`
	DrainFile      string `json:"drain_file"`
}

type haSyncReport struct {
	Healthy          bool     `json:"healthy"`
	Problems         []string `json:"problems"`
	Notes            []string `json:"notes"`
	Link             string   `json:"link"`
	LinkStatus       string   `json:"link_status"`
	Peer             string   `json:"peer"`
	ExternalCache    uint64   `json:"external_cache"`
	InternalCache    uint64   `json:"internal_cache"`
	PacketsSent      uint64   `json:"packets_sent"`
	PacketsReceived  uint64   `json:"packets_received"`
	ReceivedInWindow uint64   `json:"received_in_window"`
	Window           string   `json:"window"`
	SendErrors       uint64   `json:"send_errors"`
	ReceiveErrors    uint64   `json:"receive_errors"`
	Lost             uint64   `json:"lost"`
	Malformed        uint64   `json:"malformed"`
	AwaitingAck      uint64   `json:"awaiting_ack"`
}

// The host's side of ha status, which tests replace.
var (
	// keepalivedRunning says whether a keepalived process runs in this
	// process's network namespace.
	keepalivedRunning = procInThisNetns("keepalived")
	// otherHolders probes for other hosts answering for an address.
	otherHolders = ha.OtherHolders
	// holdsAddress says whether interface dev has the address p.
	holdsAddress = func(p netip.Prefix, dev string) (bool, error) {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return false, err
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			return false, err
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				ones, _ := n.Mask.Size()
				if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == p.Addr() && ones == p.Bits() {
					return true, nil
				}
			}
		}
		return false, nil
	}
	// syncStats reaches the node's conntrackd.
	syncStats = ha.ConntrackdStats
)

// procInThisNetns returns a check for a process called comm in the
// network namespace of this process: /proc/PID/comm, and /proc/PID/ns/net
// the same namespace as /proc/self/ns/net. keepalived's pid file is of
// no help: a lab or a second instance keeps its own. Another user's
// process's namespace can only be seen by root: one that cannot be seen is
// an error, not an absence.
func procInThisNetns(comm string) func() (bool, error) {
	return func() (bool, error) {
		self, err := os.Stat("/proc/self/ns/net")
		if err != nil {
			return false, err
		}
		entries, err := os.ReadDir("/proc")
		if err != nil {
			return false, err
		}
		var hidden error
		for _, e := range entries {
			if _, err := strconv.Atoi(e.Name()); err != nil {
				continue
			}
			b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
			if err != nil || strings.TrimSpace(string(b)) != comm {
				continue
			}
			st, err := os.Stat(filepath.Join("/proc", e.Name(), "ns", "net"))
			switch {
			case err == nil && os.SameFile(st, self):
				return true, nil
			case errors.Is(err, fs.ErrPermission):
				hidden = fmt.Errorf("%s runs as pid %s, in a namespace only root may see (run ha status as root)", comm, e.Name())
			}
		}
		return false, hidden
	}
}

func haStatus(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageError("ha status takes no arguments, got %s", quoteValue(c.Args().First()))
	}
	window, err := positiveDuration(c, "window")
	if err != nil {
		return err
	}
	in, err := haInstalled(c)
	if err != nil {
		return err
	}
	r := readHAStatus(c.Context, in, window)

	if c.Bool("json") {
		if err := writeJSON(c.App.Writer, r); err != nil {
			return err
		}
	} else {
		printHAStatus(c.App.Writer, r)
	}
	if !r.Healthy {
		return quietExit(exitFailure)
	}
	return nil
}

func printHAStatus(w io.Writer, r haStatusReport) {
	role := r.Role
	if role == "" {
		role = "role unknown"
	}
	if r.Since != nil {
		role += fmt.Sprintf(" since %s (%s ago)", r.Since.Local().Format("2006-01-02 15:04:05"), haNow().Sub(*r.Since).Round(time.Second))
	}
	fmt.Fprintf(w, "%s: %s\n", r.Node, role)
	var addrs []string
	for _, a := range r.Addresses {
		held := "holds"
		if !a.Held {
			held = "lacks"
		}
		addrs = append(addrs, fmt.Sprintf("%s %s on %s", held, a.Prefix, a.Interface))
	}
	ka := "keepalived running"
	if !r.KeepalivedRunning {
		ka = "keepalived NOT running"
	}
	drained := "not drained"
	if r.Drained {
		drained = "DRAINED (ha undrain returns it)"
	}
	fmt.Fprintf(w, "  %s; %s; %s\n", strings.Join(addrs, ", "), ka, drained)
	s := r.Sync
	health := "healthy"
	if !s.Healthy {
		health = "NOT healthy"
	}
	peer := "the peer"
	if s.Peer != "" {
		peer += " " + s.Peer
	}
	if s.LinkStatus != "" {
		fmt.Fprintf(w, "sync: %s: link %s %s, %s from %s in %s\n", health, s.Link, strings.ToLower(s.LinkStatus),
			plural(s.ReceivedInWindow, "message", "messages"), peer, s.Window)
		fmt.Fprintf(w, "  %s of the peer's ready to commit (external cache), %s of this node's replicated (internal cache)\n",
			plural(s.ExternalCache, "connection", "connections"), plural(s.InternalCache, "connection", "connections"))
		fmt.Fprintf(w, "  %d sent, %d received, %d send and %d receive errors, %d lost, %d awaiting acknowledgement\n",
			s.PacketsSent, s.PacketsReceived, s.SendErrors, s.ReceiveErrors, s.Lost, s.AwaitingAck)
	} else {
		fmt.Fprintf(w, "sync: %s\n", health)
	}
	for _, n := range r.Notes {
		fmt.Fprintln(w, "note:", n)
	}
	if len(r.Problems) > 0 {
		fmt.Fprintln(w, "not healthy:")
		for _, p := range r.Problems {
			fmt.Fprintln(w, "  -", p)
		}
	}
}

// readHAStatus is what ha status reports of the node in: its role, its
// addresses (and, as master, whether another node answers for them: a
// split brain), and conntrackd's sync, sampled for at most window.
func readHAStatus(parent context.Context, in ha.Installed, window time.Duration) haStatusReport {
	var err error
	r := haStatusReport{Node: in.Node, Problems: []string{}, Notes: []string{}, Files: haStatusFiles{
		Keepalived: in.Keepalived, Hook: in.Hook, ConntrackdConf: in.ConntrackdConf, StateFile: in.StateFile, DrainFile: in.DrainFile,
	}}
	problem := func(format string, a ...any) { r.Problems = append(r.Problems, fmt.Sprintf(format, a...)) }

	// The role.
	if b, err := os.ReadFile(in.DrainFile); err == nil {
		r.Drained = strings.TrimSpace(string(b)) == "1"
	}
	if r.KeepalivedRunning, err = keepalivedRunning(); err != nil {
		problem("cannot tell whether keepalived runs: %v", err)
	} else if !r.KeepalivedRunning {
		problem("keepalived is not running in this network namespace: this node cannot take over (systemctl status keepalived)")
	}
	switch {
	case in.StateFile == "":
		problem("%s records no state: it was written by an older egress-snat; run egress-snat ha config again", in.Hook)
	default:
		st, err := ha.ReadState(in.StateFile)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			problem("no role recorded in %s: keepalived has not run the hook since boot", in.StateFile)
		case err != nil:
			problem("reading the role: %v", err)
		default:
			r.Role = st.State
			since := st.Since
			r.Since = &since
		}
	}
	held := 0
	for _, v := range in.VIPs {
		ok, err := holdsAddress(v.Prefix, v.Interface)
		if err != nil {
			problem("%s: %v", v.Interface, err)
		}
		if ok {
			held++
		}
		r.Addresses = append(r.Addresses, haAddress{VIP: v, Held: ok})
	}
	switch {
	case r.Role == "MASTER" && held < len(in.VIPs):
		problem("the hook recorded MASTER, but this node holds %d of its %d virtual addresses", held, len(in.VIPs))
	case r.Role != "MASTER" && r.Role != "" && held > 0:
		problem("the hook recorded %s, but this node holds %d of the virtual addresses (a MASTER that was killed keeps them)", r.Role, held)
	case r.Role == "FAULT" && !r.Drained:
		problem("FAULT: keepalived found a tracked interface down")
	}
	if r.Drained && r.Role == "MASTER" {
		problem("drained, but still MASTER: the peer has not taken over (is it up?)")
	}
	if r.Role == "MASTER" {
		// A master alone answers for its addresses; another that
		// does is the other node, master too.
		for i, a := range r.Addresses {
			if !a.Held || !a.Prefix.Addr().Is4() {
				continue
			}
			others, err := otherHolders(a.Interface, a.Prefix.Addr(), 300*time.Millisecond)
			if err != nil {
				r.Notes = append(r.Notes, fmt.Sprintf("could not probe %s for another holder: %v", a.Prefix.Addr(), err))
				continue
			}
			for _, mac := range others {
				r.Addresses[i].AlsoHeldBy = append(r.Addresses[i].AlsoHeldBy, mac.String())
			}
			if len(others) > 0 {
				r.SplitBrain = true
				problem("split brain: %s on %s is also answered for by %s: the other node is master too (is the VRRP path between them cut?); its neighbours follow the last gratuitous ARP", a.Prefix.Addr(), a.Interface, strings.Join(r.Addresses[i].AlsoHeldBy, ", "))
			}
		}
	}

	// The sync.
	ctx, cancel := context.WithTimeout(parent, window+10*time.Second)
	defer cancel()
	s := haSyncReport{Problems: []string{}, Notes: []string{}, Link: in.SyncInterface, Window: "0s"}
	if in.PeerSyncAddr.IsValid() {
		s.Peer = in.PeerSyncAddr.String()
	}
	h, err := ha.CheckSync(ctx, syncStats(in.Conntrackd, in.ConntrackdConf), 100*time.Millisecond, window)
	if err != nil {
		s.Problems = append(s.Problems, fmt.Sprintf("conntrackd does not answer: %v (systemctl status conntrackd)", err))
	} else {
		s = haSyncReport{
			Healthy: h.Healthy, Problems: h.Problems, Notes: h.Notes, Link: h.Link, LinkStatus: h.LinkStatus, Peer: s.Peer,
			ExternalCache: h.ExternalCache, InternalCache: h.InternalCache, PacketsSent: h.PacketsSent, PacketsReceived: h.PacketsReceived,
			ReceivedInWindow: h.ReceivedInWindow, Window: h.Window.Round(10 * time.Millisecond).String(),
			SendErrors: h.SendErrors, ReceiveErrors: h.ReceiveErrors, Lost: h.Lost, Malformed: h.Malformed, AwaitingAck: h.AwaitingAck,
		}
		if s.Problems == nil {
			s.Problems = []string{}
		}
		if s.Notes == nil {
			s.Notes = []string{}
		}
	}
	r.Sync = s
	for _, p := range s.Problems {
		problem("sync: %s", p)
	}
	for _, n := range s.Notes {
		r.Notes = append(r.Notes, "sync: "+n)
	}
	r.Healthy = len(r.Problems) == 0
	return r
}

// pairWindow is how long check, list and stats wait for a message from
// the peer's conntrackd, which sends at least one a second.
const pairWindow = 1200 * time.Millisecond

// pairStatus is the node's part of a gateway pair for check, list and
// stats: nil when this host has no pair configuration (no keepalived.conf
// that ha config wrote, at EGRESS_SNAT_KEEPALIVED_CONF or the Debian
// path), which is no fault.
func pairStatus(c *cli.Context) *haStatusReport {
	path := getenv(c, keepalivedConfEnv)
	if path == "" {
		path = ha.DefaultPaths.Keepalived
	}
	in, err := ha.ReadInstalled(path)
	if err != nil {
		return nil
	}
	r := readHAStatus(c.Context, in, pairWindow)
	return &r
}

// pairLine says in one line what the node is in its pair.
func pairLine(r *haStatusReport) string {
	role := r.Role
	if role == "" {
		role = "role unknown"
	}
	if r.Since != nil {
		role += " since " + r.Since.Local().Format("15:04:05")
	}
	sync := "sync healthy"
	if !r.Sync.Healthy {
		sync = "sync NOT healthy"
	}
	if r.Sync.LinkStatus != "" {
		sync += fmt.Sprintf(" (%s of the peer's connections ready to commit)", plural(r.Sync.ExternalCache, "connection", "connections"))
	}
	return fmt.Sprintf("pair: %s is %s; %s", r.Node, role, sync)
}

// pairFindings are check's findings of the pair: a split brain, and every
// other problem ha status names.
func pairFindings(r *haStatusReport) []snat.Finding {
	var out []snat.Finding
	for _, p := range r.Problems {
		kind := "ha-unhealthy"
		if strings.HasPrefix(p, "split brain") {
			kind = "ha-split-brain"
		}
		out = append(out, snat.Finding{Kind: kind, Detail: p})
	}
	return out
}
