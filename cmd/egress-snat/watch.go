package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/reconcile"
)

var watchCommand = &cli.Command{
	Name:      "watch",
	Usage:     "keep the host converged on a desired-state file (run by systemd)",
	UsageText: "egress-snat [--config PATH] watch [-f FILE] [--resync 500ms] [--settle 100ms] [--log-format text|json] [--health-file FILE] [--activate-after 2s]",
	Description: `Applies FILE (default: the permanent file, --config) at start, then keeps
the host converged:

   - on netlink address, link and route events (subscribed, not polled):
     routes and natural sources are looked up again;
   - every --resync, a canary that costs no process: the nftables
     generation (iptables-nft) or the nat table's shape (iptables-legacy),
     the element counts of its ipsets (their headers, over netlink) and
     egress-snat's ip rules. When they moved, and every 10 seconds in
     any case, it reads the nat chain, the jump and the sets' entry counts
     and re-applies when they differ (a firewalld reload or Docker restart
     that flushed POSTROUTING, a deleted chain, a rule inserted ahead of
     ours, a deleted ip rule);
   - every --full-resync, a full read, set members included (a member
     deleted or swapped by hand);
   - when FILE changes (its directory is watched with inotify, so an
     editor's or Ansible's rename and a Kubernetes ConfigMap's ..data
     symlink swap are seen), or on SIGHUP, FILE is read again (a bad file
     is logged and the old one kept). Each reconcile also looks, under
     the lock, whether the file was replaced, so a --permanent run that
     changed the kernel and the file is never undone with the old file.

Bursts of events are coalesced (--settle) into one apply. When a rule's
source address leaves the host, its rule is taken out (or moved to the next
address of its failover list) and the conntrack entries bound to the old
address are deleted, so no traffic keeps leaving from an address the host no
longer has; when the address returns, the rule is restored.

A rule marked standby: (a gateway pair's address, see egress-snat ha) is
not taken out: while the peer holds its address the rule stands by, its
SNAT rule installed and its clients' new connections dropped. When the
address arrives the rule stays held until SIGHUP (the pair's hook sends it
once conntrackd has committed the peer's connections) or, failing that,
--activate-after; its flows are never deleted when the address leaves (they
went to the peer).

A rule with spill: (set --spill) and a list of addresses is looked at every
second: when an address it gives holds 80% of its source ports toward one
destination, port and protocol (counted from conntrack), watch installs a
rule of its own for that destination port ahead of it, to the list's other
addresses, and removes it below 50%, logging "spill started" and "spill
ended". The spill rule is part of what watch keeps; a watch that starts
again finds it again from conntrack and the rules installed.

Logs go to stderr (the journal) with log/slog. SIGTERM or SIGINT stops it
cleanly and leaves the rules in place. scripts/egress-snat.service runs it
at boot, so the desired state survives reboots.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "file", Aliases: []string{"f"}, TakesFile: true, Usage: "desired-state YAML `FILE` (default: the permanent file, --config)"},
		&cli.DurationFlag{Name: "resync", Value: 500 * time.Millisecond, Usage: "how often the canary looks (it costs no process; half a second keeps a repair under a second)"},
		&cli.DurationFlag{Name: "settle", Value: 100 * time.Millisecond, Usage: "how long to wait for a burst of events to end before applying"},
		&cli.DurationFlag{Name: "full-resync", Value: 5 * time.Minute, Usage: "how often to compare everything, set members included"},
		enum(&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json; durations are Go duration strings in both (\"took\":\"12ms\")"}, "text", "json"),
		verifyEveryFlag,
		probeFlag,
		healthFileFlag,
		&cli.DurationFlag{Name: "activate-after", Value: 2 * time.Second, Usage: "how long a standby rule whose address arrived stays held when no SIGHUP activates it sooner (0: at once)"},
	},
	Action: func(c *cli.Context) error {
		path, err := watchPath(c)
		if err != nil {
			return err
		}
		handler, err := newLogHandler(c.App.ErrWriter, c.String("log-format"))
		if err != nil {
			return err
		}
		if c.Duration("resync") <= 0 || c.Duration("settle") < 0 || c.Duration("full-resync") <= 0 || c.Duration("activate-after") < 0 {
			return usageError("--resync and --full-resync must be positive, --settle and --activate-after not negative")
		}
		debug.SetGCPercent(100) // long-running: the default suits it
		file, _, err := config.LoadIntents(path)
		if err != nil {
			return err
		}
		probes, err := parseProbes(c)
		if err != nil {
			return err
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		// The daemon runs the commands it serves in their clients'
		// working directories (served.go): its own paths are absolute.
		if path, err = filepath.Abs(path); err != nil {
			return err
		}
		health := c.String("health-file")
		if health != "" {
			if health, err = filepath.Abs(health); err != nil {
				return err
			}
		}
		d, err := reconcile.New(reconcile.Config{
			Path: path, File: file,
			Manager: e.mgr, Router: e.sel, Conntrack: conntrack.Netlink{Handle: e.nl}, Flows: conntrack.Netlink{Handle: e.nl}, LockTimeout: e.lockTimeout,
			Log: slog.New(handler), Backend: e.backendName(),
			Resync: c.Duration("resync"), FullResync: c.Duration("full-resync"), Settle: c.Duration("settle"),
			VerifyEvery: c.Duration("verify-every"), Verify: verifyHost(e), Probes: probes,
			HealthFile: health, ActivateAfter: c.Duration("activate-after"),
			Commands: daemonCommands(e), Refusal: needsPrivilege,
		})
		if err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		// SIGHUP reads the file again (systemctl reload egress-snat) and
		// activates the standby rules whose address is here.
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		go func() {
			for {
				select {
				case sig := <-hup:
					d.Reload(ctx, sig.String()) // the daemon logs the outcome
				case <-ctx.Done():
					return
				}
			}
		}()
		return d.Run(ctx)
	},
}

var verifyEveryFlag = &cli.DurationFlag{Name: "verify-every", Usage: "every `DURATION`, also start a real flow per rule (as verify does) and log a mismatch as an error; 0 never"}
