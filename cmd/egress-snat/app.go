package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/internal/caps"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// Exit statuses. check has its own: 0 in sync, 1 drift, 2 error.
const (
	exitOK      = 0
	exitFailure = 1 // the host refused or failed: iptables, netlink, lock, permissions
	exitUsage   = 2 // bad input: flags, addresses, prefixes, interfaces, files
)

var version = "dev"

const exitStatusHelp = `EXIT STATUS:
   0  success (including "nothing to do")
   1  runtime failure: not root, iptables or netlink failed, lock timeout;
      the host is left as it was
   2  bad input: a flag, address, prefix, interface or file that cannot work;
      nothing was changed
   check uses 0 in sync, 1 drift, 2 error.`

func newApp() *cli.App {
	commands := freshCommands(
		explainCommand,
		setCommand,
		unsetCommand,
		listCommand,
		clearCommand,
		applyCommand,
		rotateCommand,
		checkCommand,
		watchCommand,
		saveCommand,
		verifyCommand,
		verifyFlowCommand,
		confirmCommand,
		revertCommand,
		statsCommand,
		healthCommand,
		haCommand,
		genDocsCommand, // hidden: make docs
	)
	for _, c := range commands {
		c.OnUsageError = commandUsageError
		c.Before = checkFlags
		c.BashComplete = completeFor(c)
		// A command has no subcommands, so no "help" subcommand either
		// (egress-snat help set, and set --help, remain).
		c.HideHelpCommand = true
	}
	return &cli.App{
		Name:    "egress-snat",
		Version: version,
		Usage:   "choose the source address outgoing connections leave with",
		// The bash and zsh completions ask the binary (contrib/completion).
		EnableBashCompletion: true,
		BashComplete:         completeFor(nil),
		Description: `A host with several addresses picks the source of an outgoing connection
itself: the address the application bound, else the matching route's src
attribute, else an address of the outgoing interface (on the gateway's or
destination's subnet if there is one, else the primary address; IPv6 has its
own selection rules). egress-snat shows that choice and overrides it with
SNAT rules in its own nat chain (EGRESS-SNAT, jumped to first from
POSTROUTING), for IPv4 and IPv6. Rules match the natural source, so
applications that bind another address keep it. The kernel's rules are the
runtime state ("egress-snat clear" removes every trace); --permanent and
"save" also write the permanent file (--config), which "watch" brings back
at boot.

` + exitStatusHelp,
		Flags: cloneFlags([]cli.Flag{
			&cli.StringFlag{Name: "netns", Usage: "run inside the network namespace `NAME` (as ip netns exec NAME would)"},
			enum(&cli.StringFlag{Name: "backend", Aliases: []string{"iptables-backend"}, Value: "auto", EnvVars: []string{"EGRESS_SNAT_BACKEND", "EGRESS_SNAT_IPTABLES"},
				Usage: "where the rules live, `BACKEND`: auto (the backend holding ours, else the one the host's iptables uses), nftables (a table of our own), iptables-nft or iptables-legacy (nft and legacy, their older names, still work)"},
				backendNames...).accepting("nft", "legacy"),
			configFlag,
			&cli.DurationFlag{Name: "lock-timeout", Value: 10 * time.Second, Usage: "how long (`DURATION`) to wait for another egress-snat run, and for the xtables lock, before giving up with nothing changed"},
		}),
		Before: enterNetns,
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return unknownCommand(c.App, c.Args().First())
			}
			_ = cli.ShowAppHelp(c)
			return quietExit(exitUsage)
		},
		Commands: commands,
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return cli.Exit(fmt.Sprintf("%s%s (see egress-snat --help)", config.OneLine(err.Error()), flagHint(err, c.App.Flags, nil, "")), exitUsage)
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main prints and exits
	}
}

// run is main's run of the app: the served commands go through the
// daemon when one serves this namespace (served.go).
func run(args []string) error {
	app := newApp()
	viaDaemon(app)
	return tidyExit(app, app.Run(args))
}

// commandUsageError makes a flag error of a command exit with exitUsage
// and point at that command's help, with the nearest flag of an unknown
// one.
func commandUsageError(c *cli.Context, err error, _ bool) error {
	hint := flagHint(err, c.Command.Flags, c.App.Flags, c.Command.Name)
	return cli.Exit(fmt.Sprintf("%s%s (see egress-snat %s --help)", config.OneLine(err.Error()), hint, c.Command.Name), exitUsage)
}

func exitCode(err error) int {
	var ec cli.ExitCoder
	var inv *snat.InvalidError
	switch {
	case errors.As(err, &ec):
		return ec.ExitCode()
	case errors.As(err, &inv):
		return exitUsage
	}
	return exitFailure
}

// quietExit ends with a status and no message; the command has already
// said what it had to.
func quietExit(code int) error { return cli.Exit("", code) }

// usageError is bad input found by the CLI itself.
func usageError(format string, args ...any) error {
	return cli.Exit(fmt.Sprintf(format, args...), exitUsage)
}

// enterNetns re-executes the program inside the named namespace. Setting the
// namespace of one locked thread and then exec'ing from it moves the whole
// new process, netlink sockets and iptables children alike; switching a
// thread in a running Go program would not cover the others.
func enterNetns(c *cli.Context) error {
	name := c.String("netns")
	if name == "" {
		return nil
	}
	ns, err := netns.GetFromName(name)
	if err != nil {
		return usageError("--netns %q: %v", name, err)
	}
	runtime.LockOSThread()
	if err := netns.Set(ns); err != nil {
		return fmt.Errorf("entering network namespace %q: %w", name, err)
	}
	var args []string
	skip := false
	for _, a := range os.Args {
		switch {
		case skip:
			skip = false
			continue
		case a == "--netns" || a == "-netns":
			skip = true
			continue
		case strings.HasPrefix(a, "--netns=") || strings.HasPrefix(a, "-netns="):
			continue
		}
		args = append(args, a)
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	return syscall.Exec(exe, args, os.Environ())
}

// router is what commands ask of the host's routing: the kernel's route
// choice and natural source, which interface holds an address, and the
// full explanation. *selector.Selector is the real one.
type router interface {
	snat.Router
	// Forget drops cached links and addresses after the host changed.
	Forget()
	// Deprecated reports whether an address of the host is deprecated: it
	// works as a chosen source, but the kernel no longer picks it itself.
	Deprecated(a netip.Addr) bool
}

// explainer tells the path packets really take, egress-snat's own routes
// included, and why the kernel chose its source.
type explainer interface {
	Lookup(dst netip.Prefix, out string) (*selector.Choice, error)
}

// env is what commands need from the host, built once per run.
type env struct {
	// sel resolves: it answers as the host routes without egress-snat's
	// own routes, so they never decide where a destination "naturally"
	// goes (see routes.LookupMark).
	sel   router
	paths explainer
	// policy looks up the path packets really take and lists other
	// tools' ip rules, for finding a foreign rule ahead of ours; nil in
	// tests with fakes.
	policy snat.PathLooker
	// nl is the netlink handle for conntrack; nil in tests with fakes.
	nl  *netlink.Handle
	mgr *snat.Manager
	// kind names the backend in use ("nftables", "iptables-nft",
	// "iptables-legacy"); flavour is the iptables flavour, ipt the iptables
	// backend and nft the nftables one, the one in use not nil (both nil
	// in tests with fakes).
	kind        string
	flavour     iptables.Flavour
	ipt         *iptables.Backend
	nft         *nft.Backend
	lockTimeout time.Duration
	out         io.Writer
}

// hostPolicy is the host's snat.PathLooker: the kernel's real path from
// the selector, other tools' ip rules from routes.
type hostPolicy struct {
	*selector.Selector
	routes.System
}

// hostFlows reads what the host's live connections hold (snat.Flows).
type hostFlows struct{ h *netlink.Handle }

func (f hostFlows) Live() (snat.Liveness, error) {
	u, err := conntrack.ReadUsage(f.h)
	return snat.Liveness{Translated: u.Translated, Sources: u.Sources}, err
}

// envFor builds the env of a command. Tests replace it to run commands
// against fakes; everything else uses hostEnv.
var envFor = hostEnv

// hostEnv builds the env; it checks privileges first so that an unprivileged
// run says exactly what it lacks instead of an iptables error. A command
// run inside the daemon gets the daemon's (served.go).
func hostEnv(c *cli.Context) (*env, error) {
	if s := servedFrom(c); s != nil {
		return s.env(c), nil
	}
	if !caps.NetAdmin(0) {
		return nil, errors.New(needsPrivilege)
	}
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	wait := c.Duration("lock-timeout")
	b, err := openBackend(c.String("backend"), wait)
	if err != nil {
		return nil, err
	}
	return &env{
		sel:         selector.Excluding(h, routes.LookupMark, routes.Ours),
		paths:       selector.New(h),
		policy:      hostPolicy{selector.New(h), routes.System{}},
		nl:          h,
		mgr:         &snat.Manager{Backend: b.backend(), Routing: routes.System{}, Flows: hostFlows{h}},
		kind:        b.kind,
		flavour:     b.flavour,
		ipt:         b.ipt,
		nft:         b.nft,
		lockTimeout: wait,
		out:         c.App.Writer,
	}, nil
}
