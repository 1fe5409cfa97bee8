package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/internal/api"
	"github.com/egress-snat/egress-snat/reconcile"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// While `watch` runs, it serves the commands that read and write the rules
// on the network namespace's socket (internal/api, reconcile/api.go): a
// run of one of them sends its command line there and prints what the
// daemon answers, so that it works from the state the daemon keeps instead
// of rebuilding the whole world. Without a daemon (no socket, a stale one,
// none that answers at once) it runs on its own, as before. Either way the
// same code runs, so stdout, --json, stderr, --dry-run and the exit status
// are the same.

// servedCommands are the commands a running watch serves.
var servedCommands = []string{"set", "unset", "apply", "rotate", "clear", "list", "check", "save"}

// noDaemonEnv, set to anything but "" or "0", makes every command run on
// its own even while watch serves: what a run without the daemon does
// (benchmarks, and tests that play another writer).
const noDaemonEnv = "EGRESS_SNAT_NO_DAEMON"

// needsPrivilege is what a run without root or CAP_NET_ADMIN is told, on
// its own or by the daemon.
const needsPrivilege = "this needs root or CAP_NET_ADMIN (it reads and writes iptables rules and routes); run it with sudo"

// viaDaemon makes the served commands of app go through the daemon when
// one serves this namespace: their Before sends the command line, prints
// the answer and ends the run with its status, and the Action does not
// run. Only the binary's main uses it: in-process runs (tests, and the
// daemon itself) run the commands here.
func viaDaemon(app *cli.App) {
	for _, c := range app.Commands {
		if !slices.Contains(servedCommands, c.Name) {
			continue
		}
		before := c.Before
		c.Before = func(c *cli.Context) error {
			if before != nil {
				if err := before(c); err != nil {
					return err
				}
			}
			return sendToDaemon(c)
		}
	}
}

// sendToDaemon sends the command line to the daemon, if one serves this
// namespace and takes it: then it prints the answer and returns the exit
// status as an error that ends the run (exit 0 included). It returns nil
// when the command is to run here: no daemon, one that declined, a command
// line JSON cannot carry as it is, or apply --confirm (its reverter is a
// process of the run's own).
func sendToDaemon(c *cli.Context) error {
	if v := os.Getenv(noDaemonEnv); v != "" && v != "0" {
		return nil
	}
	if c.Command.Name == applyCommand.Name && c.IsSet("confirm") {
		return nil
	}
	req, ok := newRequest(os.Args[1:], c.Duration("lock-timeout"))
	if !ok {
		return nil
	}
	res, err := api.Call(snat.LockDir, req, api.Greeting)
	switch {
	case errors.Is(err, api.ErrNoDaemon) || err == nil && res.Decline != "":
		return nil
	case err != nil:
		return cli.Exit(err.Error(), exitFailure)
	}
	c.App.Writer.Write(res.Stdout)
	c.App.ErrWriter.Write(res.Stderr)
	return quietExit(res.Exit)
}

// newRequest is the request of a command line, args after the program's
// name: with this process's working directory and the environment
// variables that stand for global flags. ok is false when the line cannot
// be sent as it is (no working directory, bytes that are not UTF-8).
func newRequest(args []string, lockTimeout time.Duration) (req api.Request, ok bool) {
	cwd, err := os.Getwd()
	if err != nil {
		return req, false
	}
	req = api.Request{V: api.Version, Args: args, Cwd: cwd, WaitMS: lockTimeout.Milliseconds()}
	for _, k := range api.Env {
		if v, ok := os.LookupEnv(k); ok {
			if req.Env == nil {
				req.Env = map[string]string{}
			}
			req.Env[k] = v
		}
	}
	return req, api.Representable(req)
}

// served is what a command run inside the daemon works with: the
// daemon's env (its router, netlink handle, backend) and its Manager,
// which trusts what the daemon wrote last.
type served struct {
	base *env
	mgr  *snat.Manager
	// cwd is the daemon's working directory, restored after a request
	// ran in the client's.
	cwd string
	// clientEnv is the request's environment (those of api.Env the
	// client sets), read by getenv.
	clientEnv map[string]string
}

// getenv is os.Getenv of the run's environment: for a command run inside
// the daemon, the client's, never the daemon's.
func getenv(c *cli.Context, k string) string {
	if s := servedFrom(c); s != nil {
		return s.clientEnv[k]
	}
	return os.Getenv(k)
}

type servedKey struct{}

// servedFrom returns the served state of a run inside the daemon, nil for
// any other run.
func servedFrom(c *cli.Context) *served {
	if c == nil || c.Context == nil {
		return nil
	}
	s, _ := c.Context.Value(servedKey{}).(*served)
	return s
}

// env is the env of one command run inside the daemon: the daemon's, with
// this run's output, lock timeout and Manager, and fresh selectors for
// the real path and other tools' ip rules (the daemon's resolving one
// keeps its snapshot of the routing tables until the host changes).
func (s *served) env(c *cli.Context) *env {
	e := *s.base
	e.mgr = s.mgr
	e.out = c.App.Writer
	e.lockTimeout = c.Duration("lock-timeout")
	if e.nl != nil {
		e.paths = selector.New(e.nl)
		e.policy = hostPolicy{selector.New(e.nl), routes.System{}}
	}
	return &e
}

// declined is a command the daemon leaves to the client.
type declined struct{ why string }

func (d declined) Error() string { return "declined: " + d.why }

// daemonCommands is serveCommands, set at init: watch's action refers to
// it, and what it runs is the app, which holds watch (an initialization
// cycle otherwise).
var daemonCommands func(base *env) reconcile.Commands

func init() { daemonCommands = serveCommands }

// serveCommands is the daemon's reconcile.Commands: it runs a client's
// command line in this process with base, the env watch built, as main
// would run it, and returns what it printed and its exit status.
func serveCommands(base *env) reconcile.Commands {
	cwd, err := os.Getwd()
	if err != nil {
		cwd = "/"
	}
	return func(ctx context.Context, m *snat.Manager, r api.Request) api.Result {
		return runServed(ctx, &served{base: base, mgr: m, cwd: cwd}, r)
	}
}

// runServed runs r's command line in the client's working directory (its
// relative paths, and the errors that name them, are the client's), with
// its environment's global flags and none of the daemon's.
func runServed(ctx context.Context, s *served, r api.Request) api.Result {
	if err := os.Chdir(r.Cwd); err != nil {
		return api.Result{Decline: fmt.Sprintf("its working directory: %v", err)}
	}
	defer os.Chdir(s.cwd)
	s.clientEnv = r.Env
	app := servedApp()
	args := append(envArgs(r.Env), r.Args...)
	return runApp(context.WithValue(ctx, servedKey{}, s), app, args)
}

// runApp runs app with args (after the program's name) as main does, and
// returns what it printed and its exit status, main's error line on
// stderr: a Decline for a command the daemon leaves to the client.
func runApp(ctx context.Context, app *cli.App, args []string) api.Result {
	var stdout, stderr bytes.Buffer
	app.Writer, app.ErrWriter = &stdout, &stderr
	err := tidyExit(app, app.RunContext(ctx, append([]string{app.Name}, args...)))
	var d declined
	if errors.As(err, &d) {
		return api.Result{Decline: d.why}
	}
	res := api.Result{Stdout: stdout.Bytes()}
	if err != nil {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(&stderr, "egress-snat:", msg)
		}
		res.Exit = exitCode(err)
	}
	res.Stderr = stderr.Bytes()
	return res
}

// servedApp is newApp for a run inside the daemon: flags take no value
// from the daemon's environment (the client's comes as flags, envArgs),
// --netns is the client's to have entered, and only the served commands
// run; apply --confirm and a backend other than the daemon's are left to
// the client.
func servedApp() *cli.App {
	app := newApp()
	for _, f := range app.Flags {
		switch f := f.(type) {
		case *cli.StringFlag:
			f.EnvVars = nil
		case *enumFlag:
			f.EnvVars = nil
		}
	}
	app.Before = func(c *cli.Context) error {
		if c.IsSet("netns") {
			return declined{"--netns"}
		}
		return nil
	}
	for _, cmd := range app.Commands {
		if !slices.Contains(servedCommands, cmd.Name) {
			cmd.Before = func(*cli.Context) error { return declined{"not served"} }
			continue
		}
		before := cmd.Before
		cmd.Before = func(c *cli.Context) error {
			if before != nil {
				if err := before(c); err != nil {
					return err
				}
			}
			if c.Command.Name == applyCommand.Name && c.IsSet("confirm") {
				return declined{"apply --confirm"}
			}
			if s := servedFrom(c); s != nil && !servesBackend(s.base.kind, c.String("backend")) {
				return declined{"--backend " + c.String("backend") + " is not the daemon's " + s.base.kind}
			}
			return nil
		}
	}
	return app
}

// servesBackend reports whether a daemon on backend kind serves a run
// that asks for backend name: auto is the backend holding ours, which is
// the daemon's.
func servesBackend(kind, name string) bool {
	switch name {
	case backendAuto, "":
		return true
	case "nft":
		name = backendIPTablesNFT
	case "legacy":
		name = backendIPTablesLegacy
	}
	return name == kind
}

// envArgs turns the client's environment into the global flags it stands
// for, put first so that a flag the client gave wins, as it would over the
// environment.
func envArgs(env map[string]string) []string {
	var out []string
	if v, ok := env["EGRESS_SNAT_CONFIG"]; ok {
		out = append(out, "--config="+v)
	}
	for _, k := range []string{"EGRESS_SNAT_BACKEND", "EGRESS_SNAT_IPTABLES"} {
		if v, ok := env[k]; ok {
			out = append(out, "--backend="+v)
			break
		}
	}
	return out
}
