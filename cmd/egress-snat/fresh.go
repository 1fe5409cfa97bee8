package main

import (
	"reflect"
	"sync"

	"github.com/urfave/cli/v2"
)

// The commands and some flags (--config, --json ...) are package
// variables, and a run of urfave/cli changes what it runs: it appends
// --help to a command's flags, and sets a flag's Value from its
// environment variable (EGRESS_SNAT_CONFIG). So that every app starts from
// the definitions as written (each run, each in-process test, and the man
// page and completions, which must not depend on what ran before or on the
// environment of make docs), newApp works on deep copies of them, taken
// from a snapshot made before anything ran.

var pristine struct {
	once     sync.Once
	commands map[*cli.Command]*cli.Command
}

// freshCommands returns copies of the commands as they were defined.
func freshCommands(commands ...*cli.Command) []*cli.Command {
	pristine.once.Do(func() {
		pristine.commands = map[*cli.Command]*cli.Command{}
		for _, c := range commands {
			pristine.commands[c] = cloneCommand(c)
		}
	})
	out := make([]*cli.Command, len(commands))
	for i, c := range commands {
		p, ok := pristine.commands[c]
		if !ok { // not in the first app: its definition as it is now
			p = c
		}
		out[i] = cloneCommand(p)
	}
	return out
}

func cloneCommand(c *cli.Command) *cli.Command {
	cp := *c
	cp.Flags = cloneFlags(c.Flags)
	cp.Subcommands = nil
	for _, s := range c.Subcommands {
		cp.Subcommands = append(cp.Subcommands, cloneCommand(s))
	}
	return &cp
}

// cloneFlags copies each flag, so that a run's changes to one stay in it.
func cloneFlags(flags []cli.Flag) []cli.Flag {
	out := make([]cli.Flag, len(flags))
	for i, f := range flags {
		out[i] = cloneFlag(f)
	}
	return out
}

func cloneFlag(f cli.Flag) cli.Flag {
	if e, ok := f.(*enumFlag); ok {
		return &enumFlag{StringFlag: cloneFlag(e.StringFlag).(*cli.StringFlag), values: e.values, old: e.old}
	}
	v := reflect.ValueOf(f)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return f
	}
	cp := reflect.New(v.Elem().Type())
	cp.Elem().Set(v.Elem())
	return cp.Interface().(cli.Flag)
}
