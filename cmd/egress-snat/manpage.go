package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// manPage renders egress-snat(8) from the CLI's definitions: each command's
// usage, synopsis, description (with its examples) and options as --help
// shows them (flags through flagString, the same as --help), the desired-
// state file's keys from config.RuleKeys (the list the decoder accepts),
// the environment from the flags' variables, and the exit statuses.
// TestManPageMatchesHelp renders it with man and finds --help's text in it.
func manPage(app *cli.App) (string, error) {
	var m roff
	m.line(manHeader[:len(manHeader)-1])
	m.line(`.TH EGRESS\-SNAT 8 "" "egress\-snat" "System Administration"`)
	m.line(".nh") // no hyphenation: option names must not break
	m.line(".ad l")

	m.section("NAME")
	m.line("egress\\-snat \\- " + esc(app.Usage))

	m.section("SYNOPSIS")
	m.line(`\fBegress\-snat\fR [\fIGLOBAL OPTIONS\fR] \fICOMMAND\fR [\fIOPTIONS\fR]`)

	m.section("DESCRIPTION")
	m.description(strings.TrimSuffix(strings.TrimSpace(app.Description), exitStatusHelp))
	var names []string
	for _, c := range visibleCommands(app) {
		names = append(names, c.Name)
	}
	m.paragraph("The commands are " + strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1] +
		"; each is described under COMMANDS, and egress-snat COMMAND --help prints the same. FILE FORMAT " +
		"describes the desired-state file of apply, check and watch, which is also the permanent file.")
	m.paragraph("A flag of several values, such as --to ADDR[,ADDR...], takes them comma-separated, or repeated. " +
		"A mistyped command, flag or value is bad input (exit 2), and the message suggests the nearest one " +
		"(egress-snat sett: did you mean set?). The bash, zsh and fish completions complete commands, flags " +
		"and the values of the flags that take one of a fixed set (--method, --order, --proto, --log-format, " +
		"--iptables-backend), and file names after the flags that take a file.")

	m.section("GLOBAL OPTIONS")
	m.flags(app.VisibleFlags())

	m.section("COMMANDS")
	// A command with subcommands (ha) is followed by each of them, as
	// "ha config".
	var command func(name string, c *cli.Command)
	command = func(name string, c *cli.Command) {
		m.line(".SS " + esc(name))
		m.paragraph(c.Usage + ".")
		if c.UsageText != "" {
			var lines []string
			for l := range strings.Lines(c.UsageText) {
				lines = append(lines, strings.TrimSpace(l))
			}
			m.pre(strings.Join(lines, "\n"))
		}
		m.description(c.Description)
		if flags := c.VisibleFlags(); len(flags) > 0 {
			m.line(".PP")
			m.line("Options of " + esc(name) + ":")
			m.flags(flags)
		}
		for _, s := range c.VisibleCommands() {
			if s.Name != "help" {
				command(name+" "+s.Name, s)
			}
		}
	}
	for _, c := range visibleCommands(app) {
		command(c.Name, c)
	}

	m.section("FILE FORMAT")
	m.paragraph(fmt.Sprintf("The desired-state file (apply -f, check -f, watch -f, and the permanent file, "+
		"--config, default %s) is YAML: a mapping with one key, rules, a list of rules. It is the whole truth: "+
		"applying it removes every rule egress-snat manages that it does not name, and rules: [] removes them all. "+
		"It is decoded strictly: an unknown key, a bad address or prefix, mixed address families are errors naming "+
		"the line, a syntax error (such as a key indented one space off) names the line of the mistake, and a "+
		"file with an error changes nothing. The file and its dst-files must be regular files, "+
		"of at most %d MiB and %d MiB. For example:", defaultConfig, config.MaxFileSize>>20, config.MaxDstFileSize>>20))
	m.pre(strings.TrimRight(config.ExampleFile, "\n"))
	m.paragraph("A rule without from, uid or cgroup is about the host's own traffic, by destination. The keys of a rule:")
	for _, k := range config.RuleKeys {
		m.line(".TP")
		m.line(`\fB` + esc(k.Name) + `\fR (` + esc(k.Type) + ")")
		m.line(esc(k.Meaning))
		m.line(".br")
		m.line(`Example: \fB` + esc(k.Example) + `\fR`)
	}

	m.section("FILES")
	for _, f := range []struct{ path, what string }{
		{defaultConfig, "The permanent desired-state file (--config): what --permanent and save write, and what watch, egress-snat.service, brings back at boot."},
		{snat.LockDir + "/", "Volatile, root only. netns-INODE.lock serializes the runs in one network namespace; " +
			"pending-INODE.json is the record of an apply --confirm waiting for confirm, under pending-INODE.lock. " +
			"A run removes the files of network namespaces that no longer exist."},
	} {
		m.line(".TP")
		m.line(`\fI` + esc(f.path) + `\fR`)
		m.line(esc(f.what))
	}

	m.section("ENVIRONMENT")
	for _, fl := range app.VisibleFlags() {
		d, ok := fl.(cli.DocGenerationFlag)
		if !ok {
			continue
		}
		for _, v := range d.GetEnvVars() {
			m.line(".TP")
			m.line(`\fB` + esc(v) + `\fR`)
			m.line("The value of --" + esc(fl.Names()[0]) + " when it is not given.")
		}
	}

	m.section("EXIT STATUS")
	m.pre(dedent(strings.Split(strings.TrimPrefix(exitStatusHelp, "EXIT STATUS:\n"), "\n")))

	m.section("SEE ALSO")
	m.line(`\fBiptables\fR(8), \fBip6tables\fR(8), \fBiptables\-restore\fR(8), \fBipset\fR(8), \fBip\-rule\fR(8), \fBip\-route\fR(8), \fBconntrack\fR(8)`)
	return m.String(), nil
}

// visibleCommands are the commands an operator runs: not hidden, not help.
func visibleCommands(app *cli.App) []*cli.Command {
	var out []*cli.Command
	for _, c := range app.Commands {
		if !c.Hidden && c.Name != "help" {
			out = append(out, c)
		}
	}
	return out
}

// roff builds a man page.
type roff struct{ strings.Builder }

func (m *roff) line(s string) { m.WriteString(s + "\n") }

func (m *roff) section(name string) { m.line(".SH " + esc(name)) }

// paragraph is filled text.
func (m *roff) paragraph(text string) {
	m.line(".PP")
	for l := range strings.Lines(text) {
		m.line(escLine(strings.TrimSpace(l)))
	}
}

// pre is text shown as it is, indented.
func (m *roff) pre(text string) {
	m.line(".PP")
	m.line(".RS 4")
	m.line(".nf")
	for l := range strings.Lines(text) {
		m.line(escLine(strings.TrimRight(l, "\n")))
	}
	m.line(".fi")
	m.line(".RE")
}

// description renders a command's Description as --help shows it: blank
// lines part paragraphs, which are filled; indented lines (lists, a file,
// examples) are shown as they are.
func (m *roff) description(text string) {
	for _, block := range strings.Split(strings.TrimSpace(text), "\n\n") {
		var run []string
		indented := false
		flush := func() {
			if len(run) == 0 {
				return
			}
			if indented {
				m.pre(dedent(run))
			} else {
				m.paragraph(strings.Join(run, "\n"))
			}
			run = nil
		}
		for _, l := range strings.Split(block, "\n") {
			if in := strings.HasPrefix(l, " "); in != indented {
				flush()
				indented = in
			}
			run = append(run, l)
		}
		flush()
	}
}

// flags lists flags as --help does (flagString): the names and value, then
// the usage with its default.
func (m *roff) flags(flags []cli.Flag) {
	for _, fl := range flags {
		names, usage, _ := strings.Cut(cli.FlagStringer(fl), "\t")
		var tag []string
		for _, w := range strings.Fields(names) {
			comma := ""
			if strings.HasSuffix(w, ",") {
				w, comma = strings.TrimSuffix(w, ","), ","
			}
			if strings.HasPrefix(w, "-") {
				tag = append(tag, `\fB`+esc(w)+`\fR`+comma)
			} else {
				tag = append(tag, `\fI`+esc(w)+`\fR`+comma)
			}
		}
		m.line(".TP")
		m.line(strings.Join(tag, " "))
		m.line(escLine(usage))
	}
}

// dedent removes the indentation the lines share.
func dedent(lines []string) string {
	common := -1
	for _, l := range lines {
		if strings.TrimSpace(l) == "" {
			continue
		}
		if n := len(l) - len(strings.TrimLeft(l, " ")); common < 0 || n < common {
			common = n
		}
	}
	out := make([]string, len(lines))
	for i, l := range lines {
		if len(l) >= common && common > 0 {
			l = l[common:]
		}
		out[i] = l
	}
	return strings.Join(out, "\n")
}

// esc escapes text for roff: a backslash, and the characters groff would
// print as typographic ones (a hyphen for -, curly quotes for ' and `), so
// that what a reader copies from the page (--dst) works in a shell.
func esc(s string) string {
	return strings.NewReplacer(`\`, `\e`, "-", `\-`, "'", `\(aq`, "`", `\(ga`).Replace(s)
}

// escLine is esc of a line of text, which must not start with a control
// character.
func escLine(s string) string {
	s = esc(s)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, `\(aq`) {
		s = `\&` + s
	}
	return s
}
