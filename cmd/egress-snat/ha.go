package main

import (
	"bytes"
	"crypto/md5"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/ha"
)

// egress-snat ha: the operator's side of a gateway pair (package ha
// renders the files; this writes them, drains the node and reports its
// role and sync). The commands change only files: keepalived and
// conntrackd do the rest, and egress-snat watch follows the addresses.

var haCommand = &cli.Command{
	Name:      "ha",
	Usage:     "run this host as one of two gateways that fail over with keepalived and conntrackd, keeping connections",
	UsageText: "egress-snat ha config|drain|undrain|status [OPTIONS]",
	Description: `Two gateways share the clients' default gateway address and the egress
address. keepalived (VRRPv3) moves both together to the node that is up;
conntrackd (FTFW, on a link of their own) copies every connection, with the
port it was translated to, into the other node, whose notify hook commits
them when it takes over. egress-snat translates on whichever node holds the
egress address. Established connections survive a failover (~0.75s when a
node dies, ~0.2s for a drain), a failback and a drain.

On each node (the other one swaps --node and --peer):
   apt-get install keepalived conntrackd
   egress-snat ha config --node gw-a:150:10.51.0.1 --peer gw-b:100:10.51.0.2 \
     --client-vip 10.50.0.1/24 --client-interface lan --egress-vip 192.0.2.100/24 \
     --egress-interface uplink --sync-interface sync --preempt
   modprobe nf_conntrack && sysctl --system
   # /etc/egress-snat.yaml, the same on both nodes:
   #   rules: [{to: 192.0.2.100, from: [10.50.0.0/24], standby: true}]
   systemctl enable --now egress-snat conntrackd keepalived
   egress-snat ha status              # role, addresses, sync health
   egress-snat ha drain               # before maintenance; ha undrain after

Run ha status on both nodes: two MASTERs is a split brain (the VRRP path
between them is cut); the last to take over gets the traffic.`,
	HideHelpCommand: true,
	Subcommands:     []*cli.Command{haConfigCommand, haDrainCommand, haUndrainCommand, haStatusCommand},
	Action: func(c *cli.Context) error {
		if c.Args().Present() {
			name := c.Args().First()
			var names []string
			for _, s := range c.Command.Subcommands {
				names = append(names, s.Name)
			}
			msg := fmt.Sprintf("unknown command \"ha %s\"", config.OneLine(name))
			if near := nearest(name, names); near != "" {
				msg += "; did you mean ha " + near + "?"
			}
			return usageError("%s (see egress-snat ha --help)", msg)
		}
		_ = cli.ShowSubcommandHelp(c)
		return quietExit(exitUsage)
	},
}

// haSubcommand fills in what newApp gives the top-level commands: flag
// checks, usage errors that exit 2 and name the subcommand, completion.
func haSubcommand(cmd *cli.Command) *cli.Command {
	cmd.Before = checkFlags
	cmd.OnUsageError = func(c *cli.Context, err error, _ bool) error {
		hint := flagHint(err, c.Command.Flags, c.App.Flags, "ha "+c.Command.Name)
		return cli.Exit(fmt.Sprintf("%s%s (see egress-snat ha %s --help)", config.OneLine(err.Error()), hint, c.Command.Name), exitUsage)
	}
	cmd.BashComplete = completeFor(cmd)
	cmd.HideHelpCommand = true
	return cmd
}

// haRequired fails with a usage error naming the first missing flag.
func haRequired(c *cli.Context, names ...string) error {
	for _, n := range names {
		if !c.IsSet(n) {
			return usageError("--%s is required (see egress-snat ha %s --help)", n, c.Command.Name)
		}
	}
	return nil
}

// haPairFlags are the flags that describe the pair; -f FILE gives them
// instead.
var haPairFlags = []string{"node", "peer", "client-vip", "client-interface", "egress-vip", "egress-interface",
	"sync-interface", "sync-port", "vrrp-interface", "router-ids", "advert", "preempt", "preempt-delay", "purge-timeout", "no-sync"}

var haConfigCommand = haSubcommand(&cli.Command{
	Name:  "config",
	Usage: "write this node's keepalived.conf, conntrackd.conf, notify hook and sysctls",
	UsageText: `egress-snat ha config --node NAME:PRIO:SYNCADDR --peer NAME:PRIO:SYNCADDR \
  --client-vip ADDR/LEN --client-interface IFACE --egress-vip ADDR/LEN[,ADDR/LEN...] \
  --egress-interface IFACE --sync-interface IFACE [--vrrp-interface IFACE] \
  [--router-ids N,M] [--advert 100ms] [--preempt [--preempt-delay 2s]] \
  [--root DIR] [--dry-run] [--json] [--force]
egress-snat ha config -f FILE [--root DIR] [--dry-run] [--json] [--force]`,
	Description: `Writes the four files of this node of the pair, generated from the flags
(or from -f FILE, YAML with a key for each setting, as in
/usr/share/doc/egress-snat/examples/ha/gw-a/ha.yaml):
   /etc/keepalived/keepalived.conf        the clients' and the egress instance in
                                          one sync group, VRRPv3, the drain file
   /etc/conntrackd/conntrackd.conf        FTFW over --sync-interface
   /etc/keepalived/egress-snat-notify.sh  the hook: commit the peer's connections
                                          on becoming master, record the role
   /etc/sysctl.d/60-egress-snat-ha.conf   forwarding, conntrack and ARP settings

The node with the higher priority is master while both are up; with
--preempt it takes the role back --preempt-delay after it returns, without
it a returning node stays backup. Both nodes need the same addresses,
interfaces' roles, --router-ids and --advert.

Bad input (a value the pair cannot work with) exits 2, naming it, and writes
nothing. A run that would write what is there already says "nothing to
change". A file that egress-snat did not write is replaced only with --force,
and kept as FILE.orig; Debian's unchanged default conntrackd.conf is
replaced without it. Each file is written aside and renamed into place.
keepalived and conntrackd read their files when they start: after a change,
systemctl reload keepalived and systemctl restart conntrackd.

Examples:
   egress-snat ha config -f /etc/egress-snat-ha.yaml --dry-run
   egress-snat ha config -f gw-a.yaml --root /srv/image-a     # for an image`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "file", Aliases: []string{"f"}, TakesFile: true, Usage: "read the pair from `FILE` (YAML, a key for each setting of the flags below) instead of flags"},
		&cli.StringFlag{Name: "node", Usage: "(required) this node: `NAME:PRIO:SYNCADDR`, its name, VRRP priority (1..254, the higher is master) and address on the sync link"},
		&cli.StringFlag{Name: "peer", Usage: "(required) the other node: `NAME:PRIO:SYNCADDR`"},
		&cli.StringFlag{Name: "client-vip", Usage: "(required) the clients' default gateway, `ADDR/LEN` with their prefix length"},
		&cli.StringFlag{Name: "client-interface", Usage: "(required) the interface `IFACE` to the clients"},
		&cli.StringSliceFlag{Name: "egress-vip", Usage: "(required) the address `ADDR/LEN` the clients' traffic leaves with, which egress-snat's rule names in to: (several, comma-separated)"},
		&cli.StringFlag{Name: "egress-interface", Usage: "(required) the interface `IFACE` the egress address lives on"},
		&cli.StringFlag{Name: "sync-interface", Usage: "(required) conntrackd's own link `IFACE` to the peer"},
		&cli.IntFlag{Name: "sync-port", Value: ha.DefaultSyncPort, Usage: "conntrackd's UDP `PORT` on the sync link"},
		&cli.StringFlag{Name: "vrrp-interface", Usage: "send both instances' adverts on `IFACE` (default: each on its addresses' interface)"},
		&cli.StringFlag{Name: "router-ids", Value: "50,51", Usage: "the clients' and the egress instance's virtual_router_id, `N,M`, the same on both nodes and unlike other VRRP routers' on the links"},
		&cli.DurationFlag{Name: "advert", Value: ha.DefaultAdvertInterval, Usage: "VRRP's advert interval `DURATION`, in steps of 10ms; the peer takes over 3.5 intervals after the master's last advert"},
		&cli.BoolFlag{Name: "preempt", Usage: "failback: the node with the higher priority takes the role back when it returns"},
		&cli.DurationFlag{Name: "preempt-delay", DefaultText: "2s with --preempt", Usage: "with --preempt, how long (`DURATION`) the returning node waits before it takes the role back"},
		&cli.DurationFlag{Name: "purge-timeout", DefaultText: "1s", Usage: "how long (`DURATION`, whole seconds, shorter than --preempt-delay) after becoming backup the node flushes its old connections"},
		&cli.StringSliceFlag{Name: "no-sync", Usage: "further `ADDR|CIDR` whose connections conntrackd leaves out, such as the nodes' own addresses (comma-separated)"},
		&cli.StringFlag{Name: "root", TakesFile: true, Usage: "write the files under `DIR` instead of / (their contents name the paths on the node)"},
		&cli.BoolFlag{Name: "dry-run", Usage: "print every file and write none"},
		&cli.BoolFlag{Name: "force", Usage: "replace files that egress-snat did not write (keeping each as FILE.orig)"},
		&cli.BoolFlag{Name: "json", Usage: "print JSON for scripts instead of text: each file's path, mode, content and change"},
	},
	Action: haConfig,
})

// haConfigFromFlags builds the pair from the flags; each bad value is a
// usage error naming the flag.
func haConfigFromFlags(c *cli.Context) (ha.Config, error) {
	if err := haRequired(c, "node", "peer", "client-vip", "client-interface", "egress-vip", "egress-interface", "sync-interface"); err != nil {
		return ha.Config{}, err
	}
	var cfg ha.Config
	var err error
	if cfg.Node, err = parseHANode("node", c.String("node")); err != nil {
		return cfg, err
	}
	if cfg.Peer, err = parseHANode("peer", c.String("peer")); err != nil {
		return cfg, err
	}
	if cfg.ClientVIP, err = parseVIP("client-vip", c.String("client-vip")); err != nil {
		return cfg, err
	}
	for _, v := range c.StringSlice("egress-vip") {
		p, err := parseVIP("egress-vip", v)
		if err != nil {
			return cfg, err
		}
		cfg.EgressVIPs = append(cfg.EgressVIPs, p)
	}
	cfg.ClientInterface = c.String("client-interface")
	cfg.EgressInterface = c.String("egress-interface")
	cfg.VRRPInterface = c.String("vrrp-interface")
	cfg.Sync = ha.SyncLink{Interface: c.String("sync-interface"), Port: c.Int("sync-port")}
	ids := strings.Split(c.String("router-ids"), ",")
	if len(ids) != 2 {
		return cfg, usageError("--router-ids %s: want the two virtual_router_ids N,M, such as 50,51", quoteValue(c.String("router-ids")))
	}
	for i, s := range ids {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			return cfg, usageError("--router-ids %s: %s is not a number", quoteValue(c.String("router-ids")), quoteValue(s))
		}
		if i == 0 {
			cfg.ClientRouterID = n
		} else {
			cfg.EgressRouterID = n
		}
	}
	cfg.AdvertInterval = c.Duration("advert")
	cfg.Preempt = c.Bool("preempt")
	cfg.PreemptDelay = c.Duration("preempt-delay")
	cfg.PurgeTimeout = c.Duration("purge-timeout")
	for _, v := range c.StringSlice("no-sync") {
		p, err := config.ParseDst(strings.TrimSpace(v))
		if err != nil {
			return cfg, usageError("--no-sync %v", err)
		}
		cfg.NoSync = append(cfg.NoSync, p)
	}
	return cfg, nil
}

// parseHANode reads NAME:PRIO:SYNCADDR.
func parseHANode(flag, v string) (ha.Node, error) {
	parts := strings.SplitN(v, ":", 3)
	if len(parts) != 3 {
		return ha.Node{}, usageError("--%s %s: want NAME:PRIO:SYNCADDR, such as gw-a:150:10.51.0.1", flag, quoteValue(v))
	}
	prio, err := strconv.Atoi(parts[1])
	if err != nil {
		return ha.Node{}, usageError("--%s %s: the priority %s is not a number (want 1..254)", flag, quoteValue(v), quoteValue(parts[1]))
	}
	addr, err := netip.ParseAddr(parts[2])
	if err != nil {
		return ha.Node{}, usageError("--%s %s: the sync address %s is not an IP address", flag, quoteValue(v), quoteValue(parts[2]))
	}
	return ha.Node{Name: parts[0], Priority: prio, SyncAddr: addr}, nil
}

// parseVIP reads a virtual address with its prefix length.
func parseVIP(flag, v string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(v))
	if err != nil {
		return p, usageError("--%s %s: want an address with its prefix length, such as 192.0.2.100/24", flag, quoteValue(v))
	}
	return p, nil
}

// haConfigInput is the pair from -f FILE or from the flags, not both.
func haConfigInput(c *cli.Context) (ha.Config, error) {
	if !c.IsSet("file") {
		return haConfigFromFlags(c)
	}
	for _, n := range haPairFlags {
		if c.IsSet(n) {
			return ha.Config{}, usageError("--%s with -f: give the pair either in the file or in flags", n)
		}
	}
	path := c.String("file")
	f, err := config.OpenBounded(path, 1<<20)
	if err != nil {
		return ha.Config{}, usageError("-f %s: %v", path, err)
	}
	defer f.Close()
	cfg, err := ha.DecodeConfig(f)
	if err != nil {
		return cfg, usageError("%s: %v", path, err)
	}
	return cfg, nil
}

// generatedMark is in every file ha renders: a file with it was written by
// egress-snat and may be replaced.
const generatedMark = "Generated by egress-snat"

// haFile is one file of a run of ha config: what it writes, and what it
// finds there.
type haFile struct {
	ha.File
	// Dest is where it goes: Path under --root.
	Dest string
	// Change is what the run does: "create", "replace", "mode" (the
	// content is right, the permissions not) or "none".
	Change string
	// Foreign: the file there was not written by egress-snat.
	Foreign bool
	// Packaged: it is a Debian package's unchanged default.
	Packaged bool
}

// haFileJSON is a file in ha config --json.
type haFileJSON struct {
	Path    string `json:"path"`
	Dest    string `json:"dest"`
	Mode    string `json:"mode"`
	Change  string `json:"change"`
	Content string `json:"content"`
}

// packagedDefault says whether the file at path, with content, is a
// Debian package's conffile as the package shipped it (dpkg's record of
// its md5 sum): replacing it loses nothing of the operator's. Used only
// for the host's own files, not under --root.
var packagedDefault = func(path string, content []byte) bool {
	out, err := exec.Command("dpkg-query", "-W", "-f", "${Conffiles}\n", "conntrackd", "keepalived").Output()
	if err != nil && len(out) == 0 {
		return false
	}
	sum := fmt.Sprintf("%x", md5.Sum(content))
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == path && f[1] == sum {
			return true
		}
	}
	return false
}

func haConfig(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageError("ha config takes no arguments, got %s (see egress-snat ha config --help)", quoteValue(c.Args().First()))
	}
	cfg, err := haConfigInput(c)
	if err != nil {
		return err
	}
	rendered, err := ha.Files(cfg)
	if err != nil {
		return usageError("%s", haInvalid(err))
	}
	root := c.String("root")
	if c.IsSet("root") {
		if root == "" || !filepath.IsAbs(root) {
			return usageError("--root %s: want an absolute directory", quoteValue(root))
		}
		if st, err := os.Stat(root); err != nil || !st.IsDir() {
			return usageError("--root %s: not a directory", root)
		}
	}
	files := make([]haFile, len(rendered))
	for i, f := range rendered {
		hf := haFile{File: f, Dest: f.Path, Change: "create"}
		if root != "" {
			hf.Dest = filepath.Join(root, f.Path)
		}
		old, err := os.ReadFile(hf.Dest)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return fmt.Errorf("reading %s: %w", hf.Dest, err)
		default:
			st, err := os.Stat(hf.Dest)
			if err != nil {
				return err
			}
			switch {
			case !st.Mode().IsRegular():
				return fmt.Errorf("%s is not a regular file: remove it, or write elsewhere with --root", hf.Dest)
			case bytes.Equal(old, []byte(f.Content)) && st.Mode().Perm() == os.FileMode(f.Mode):
				hf.Change = "none"
			case bytes.Equal(old, []byte(f.Content)):
				hf.Change = "mode"
			default:
				hf.Change = "replace"
				hf.Foreign = !bytes.Contains(old, []byte(generatedMark))
				hf.Packaged = hf.Foreign && root == "" && packagedDefault(f.Path, old)
			}
		}
		files[i] = hf
	}
	if !c.Bool("dry-run") && !c.Bool("force") {
		for _, f := range files {
			if f.Foreign && !f.Packaged {
				return cli.Exit(fmt.Sprintf("%s exists and egress-snat did not write it: nothing written. "+
					"Look at it (--dry-run shows what would replace it); --force replaces it and keeps it as %s.orig", f.Dest, f.Dest), exitFailure)
			}
		}
	}

	changed := slices.ContainsFunc(files, func(f haFile) bool { return f.Change != "none" })
	if !c.Bool("dry-run") && changed {
		if err := writeHAFiles(files, c.Bool("force")); err != nil {
			return err
		}
	}
	out := c.App.Writer
	if c.Bool("json") {
		list := make([]haFileJSON, len(files))
		for i, f := range files {
			list[i] = haFileJSON{Path: f.Path, Dest: f.Dest, Mode: fmt.Sprintf("%04o", f.Mode), Change: f.Change, Content: f.Content}
		}
		return writeJSON(out, struct {
			DryRun  bool         `json:"dry_run"`
			Changed bool         `json:"changed"`
			Files   []haFileJSON `json:"files"`
		}{c.Bool("dry-run"), changed && !c.Bool("dry-run"), list})
	}
	if c.Bool("dry-run") {
		for _, f := range files {
			fmt.Fprintf(out, "# %s (mode %04o): %s\n%s\n", f.Dest, f.Mode, haChangeWords(f, true), f.Content)
		}
		return nil
	}
	if !changed {
		fmt.Fprintln(out, "nothing to change: the files are already these")
		return nil
	}
	for _, f := range files {
		fmt.Fprintf(out, "%s: %s\n", f.Dest, haChangeWords(f, false))
	}
	if root == "" {
		for _, n := range haNextSteps(files) {
			fmt.Fprintln(out, "next:", n)
		}
	}
	return nil
}

// haInvalid words ha.Config.Validate's joined errors as one line each.
func haInvalid(err error) string {
	lines := strings.Split(err.Error(), "\n")
	if len(lines) == 1 {
		return "the pair cannot work: " + lines[0]
	}
	return "the pair cannot work:\n  " + strings.Join(lines, "\n  ")
}

// haChangeWords says what the run does, or would do, to f.
func haChangeWords(f haFile, dryRun bool) string {
	would := func(s string) string {
		if dryRun {
			return "would be " + s
		}
		return s
	}
	switch f.Change {
	case "none":
		return "unchanged"
	case "mode":
		return would(fmt.Sprintf("given mode %04o", f.Mode))
	case "create":
		return would("written")
	}
	switch {
	case f.Packaged:
		return would("replaced (it was the package's default)")
	case f.Foreign && dryRun:
		return "would replace a file egress-snat did not write (only with --force)"
	case f.Foreign:
		return "replaced; the file egress-snat had not written is kept as " + filepath.Base(f.Dest) + ".orig"
	}
	return would("replaced")
}

// haNextSteps tells what makes the daemons use the files that changed.
func haNextSteps(files []haFile) []string {
	var steps []string
	for _, f := range files {
		if f.Change == "none" || f.Change == "mode" {
			continue
		}
		switch f.Path {
		case ha.SysctlPath:
			steps = append(steps, "modprobe nf_conntrack && sysctl -p "+f.Path)
		case ha.DefaultPaths.Keepalived:
			steps = append(steps, "systemctl reload keepalived (systemctl enable --now keepalived the first time)")
		case ha.DefaultPaths.ConntrackdConf:
			steps = append(steps, "systemctl restart conntrackd (systemctl enable --now conntrackd the first time)")
		}
	}
	return steps
}

// writeHAFiles writes the files that change: each into a temporary file
// beside it, and only when all are written, each renamed into place, so
// that a failure to write leaves every file as it was.
func writeHAFiles(files []haFile, force bool) error {
	type pending struct {
		f   haFile
		tmp string
	}
	var todo []pending
	cleanup := func() {
		for _, p := range todo {
			os.Remove(p.tmp)
		}
	}
	for _, f := range files {
		if f.Change == "none" {
			continue
		}
		if f.Change == "mode" {
			todo = append(todo, pending{f, ""})
			continue
		}
		if err := os.MkdirAll(filepath.Dir(f.Dest), 0o755); err != nil {
			cleanup()
			return fmt.Errorf("%w (nothing written)", err)
		}
		tmp, err := os.CreateTemp(filepath.Dir(f.Dest), "."+filepath.Base(f.Dest)+".egress-snat-*")
		if err == nil {
			todo = append(todo, pending{f, tmp.Name()})
			_, err = tmp.WriteString(f.Content)
			if err == nil {
				err = tmp.Chmod(os.FileMode(f.Mode))
			}
			if err == nil {
				err = tmp.Sync()
			}
			if cerr := tmp.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			cleanup()
			return fmt.Errorf("writing %s: %w (nothing written)", f.Dest, err)
		}
	}
	for i, p := range todo {
		var err error
		switch {
		case p.tmp == "":
			err = os.Chmod(p.f.Dest, os.FileMode(p.f.Mode))
		case p.f.Foreign && !p.f.Packaged && force:
			if err = os.Rename(p.f.Dest, p.f.Dest+".orig"); err == nil {
				err = os.Rename(p.tmp, p.f.Dest)
			}
		default:
			err = os.Rename(p.tmp, p.f.Dest)
		}
		if err != nil {
			todo = todo[i:]
			cleanup()
			return fmt.Errorf("%s: %w (the files before it in the list are written)", p.f.Dest, err)
		}
	}
	return nil
}

// haNow is the clock of ha status and ha drain; tests set it.
var haNow = time.Now
