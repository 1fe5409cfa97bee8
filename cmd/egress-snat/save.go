package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/permanent"
)

var saveCommand = &cli.Command{
	Name:      "save",
	Usage:     "write the installed rules to the permanent file, so that they survive a reboot",
	UsageText: "egress-snat [--config PATH] save [--dry-run]",
	Description: `Writes the rules egress-snat has installed now as the permanent desired-state
file (--config, default ` + defaultConfig + `), in the format of apply -f:
"apply -f" of the saved file, or "watch" at boot, reproduces exactly these
rules. It is iptables-save for egress-snat's rules: the way to make what
set, unset and rotate did by hand permanent.

The file's rules are replaced; its other comments stay. The file is written
atomically (a temporary file, synced, renamed), keeping its mode. A file
that exists but cannot be read as a desired-state file is not overwritten:
save fails with exit 2 and changes nothing. --dry-run prints the file
instead of writing it.`,
	// Its own --dry-run: save plans no kernel change, it writes a file.
	Flags: []cli.Flag{&cli.BoolFlag{Name: "dry-run", Usage: "print the file that would be written, change nothing"}},
	Action: func(c *cli.Context) error {
		e, err := envFor(c)
		if err != nil {
			return err
		}
		path := configPath(c)
		b, n, unsaved, err := permanent.Save(e.mgr, path, e.lockTimeout, c.Bool("dry-run"))
		for _, en := range unsaved {
			fmt.Fprintf(c.App.ErrWriter, "warning: %s keeps the source of forwarded traffic; the file cannot state that, so it is not saved\n", en.Match)
		}
		if err != nil {
			return err
		}
		if c.Bool("dry-run") {
			_, err := e.out.Write(b)
			return err
		}
		fmt.Fprintf(e.out, "saved %s to %s\n", plural(n, "destination", "destinations"), path)
		return nil
	},
}
