package main

import (
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
)

// enumFlag is a string flag whose value is one of a fixed list, and values
// is the one definition of that list: checkFlags refuses any other value
// (exit 2, naming them and the nearest), completion offers them (bash and
// zsh ask the binary, the fish script lists them), and a test checks that
// the flag's usage text names each. Renaming a value is a change here and
// in the usage text beside it.
type enumFlag struct {
	*cli.StringFlag
	values []string
	// old are values still accepted but no longer offered: the names of
	// an older release.
	old []string
}

// enum makes f a flag of one of values.
func enum(f *cli.StringFlag, values ...string) *enumFlag {
	return &enumFlag{StringFlag: f, values: values}
}

// accepting makes e also accept the old values, without offering them.
func (e *enumFlag) accepting(old ...string) *enumFlag {
	e.old = old
	return e
}

// checkEnums refuses a value of an enum flag of flags that is not one of
// its values. An empty value is left to the command (it means the default).
func checkEnums(c *cli.Context, flags []cli.Flag) error {
	for _, fl := range flags {
		e, ok := fl.(*enumFlag)
		if !ok {
			continue
		}
		v := c.String(e.Name)
		if v == "" || slices.Contains(e.values, v) || slices.Contains(e.old, v) {
			continue
		}
		msg := fmt.Sprintf("--%s %s: want %s", e.Name, quoteValue(v), orList(e.values))
		if near := nearest(v, e.values); near != "" {
			msg += "; did you mean " + near + "?"
		}
		return usageError("%s", msg)
	}
	return nil
}

// quoteValue quotes a flag's value for a message, on one line.
func quoteValue(v string) string { return fmt.Sprintf("%q", v) }

// orList joins words as "a, b or c".
func orList(words []string) string {
	if len(words) < 2 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " or " + words[len(words)-1]
}

// completeFor is the --generate-bash-completion of cmd (nil: the app). The
// shell scripts pass every word up to the one being completed, that one
// included. When that word follows a flag that takes a value, it prints the
// flag's values if it has a fixed set (an enumFlag), and nothing otherwise,
// so that the shell completes file names. When the word is --flag=PARTIAL
// of an enum flag, it prints --flag=VALUE for each value. Elsewhere it
// leaves the answer to urfave/cli: the commands, or the flags.
func completeFor(cmd *cli.Command) cli.BashCompleteFunc {
	return func(c *cli.Context) {
		flags := c.App.Flags
		if cmd != nil {
			flags = cmd.Flags
		}
		args := os.Args
		if n := len(args); n >= 3 && args[n-1] == "--generate-bash-completion" {
			word, prev := args[n-2], args[n-3]
			if name, _, ok := strings.Cut(word, "="); ok && strings.HasPrefix(word, "-") {
				if e, ok := lookupFlag(flags, name).(*enumFlag); ok {
					for _, v := range e.values {
						fmt.Fprintf(c.App.Writer, "%s=%s\n", name, v)
					}
					return
				}
			}
			if !strings.HasPrefix(word, "-") && strings.HasPrefix(prev, "-") && !strings.Contains(prev, "=") {
				if fl := lookupFlag(flags, prev); fl != nil && takesValue(fl) {
					if e, ok := fl.(*enumFlag); ok {
						for _, v := range e.values {
							fmt.Fprintln(c.App.Writer, v)
						}
					}
					return
				}
			}
			// A command with subcommands (ha) takes one of them.
			if cmd != nil && len(cmd.Subcommands) > 0 && !strings.HasPrefix(word, "-") {
				for _, s := range cmd.Subcommands {
					if !s.Hidden && s.Name != "help" {
						fmt.Fprintln(c.App.Writer, s.Name)
					}
				}
				return
			}
			// A command takes flags and no arguments: offer the flags not
			// given yet (urfave/cli would offer its help subcommand).
			if cmd != nil && !strings.HasPrefix(word, "-") {
				for _, fl := range flags {
					if v, ok := fl.(cli.VisibleFlag); ok && !v.IsVisible() || given(args[:n-2], fl) && !repeatable(fl) {
						continue
					}
					fmt.Fprintln(c.App.Writer, "--"+fl.Names()[0])
				}
				return
			}
		}
		if cmd == nil {
			cli.DefaultAppComplete(c)
			return
		}
		cli.DefaultCompleteWithFlags(cmd)(c)
	}
}

// lookupFlag finds the flag that arg (-f, --file, -file) names in flags.
func lookupFlag(flags []cli.Flag, arg string) cli.Flag {
	name := strings.TrimLeft(arg, "-")
	for _, fl := range flags {
		if slices.Contains(fl.Names(), name) {
			return fl
		}
	}
	return nil
}

// given reports whether args name fl (--name, -n or --name=VALUE).
func given(args []string, fl cli.Flag) bool {
	return slices.ContainsFunc(args, func(a string) bool {
		name, _, _ := strings.Cut(a, "=")
		return strings.HasPrefix(a, "-") && lookupFlag([]cli.Flag{fl}, name) != nil
	})
}

// repeatable reports whether fl may be given more than once.
func repeatable(fl cli.Flag) bool {
	sf, ok := fl.(cli.DocGenerationSliceFlag)
	return ok && sf.IsSliceFlag()
}

// takesValue reports whether fl is followed by a value (not a bool flag).
func takesValue(fl cli.Flag) bool {
	d, ok := fl.(cli.DocGenerationFlag)
	return ok && d.TakesValue()
}

// defaultFlagStringer is urfave/cli's own, which flagString refines.
var defaultFlagStringer = cli.FlagStringer

func init() { cli.FlagStringer = flagString }

// flagString is how --help, the man page and the fish completion show a
// flag. It is urfave/cli's, except that a flag of several values shows the
// one form the usage texts use, comma-separated ("--to ADDR[,ADDR...]"),
// where urfave/cli shows "--to ADDR [ --to ADDR ]". (Repeating the flag
// works as well.)
func flagString(fl cli.Flag) string {
	s := defaultFlagStringer(fl)
	if !repeatable(fl) {
		return s
	}
	i := strings.Index(s, " [ ")
	if i < 0 {
		return s
	}
	names := s[:i]
	if !strings.HasPrefix(s[i:], " [ "+names+" ]") {
		return s
	}
	placeholder := names[strings.LastIndex(names, " ")+1:]
	return names + "[," + placeholder + "...]" + s[i+len(" [ "+names+" ]"):]
}
