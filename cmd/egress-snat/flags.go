package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// required fails with a usage error naming the first missing flag. Flags
// are not marked Required for urfave/cli: it would exit 1 and print the whole
// help to stdout, where a script reads its output.
func required(c *cli.Context, names ...string) error {
	for _, n := range names {
		if !c.IsSet(n) {
			return usageError("--%s is required (see egress-snat %s --help)", n, c.Command.Name)
		}
	}
	return nil
}

// checkFlags is every command's Before: it refuses flag values that can
// never work before the command looks at the host, so each command need
// not repeat the checks. Every duration flag given, the command's and the
// global ones, must be positive (unless listed in zeroDurationOK), --out must be
// an interface name and every enum flag (--iptables-backend, --method ...)
// one of its values.
func checkFlags(c *cli.Context) error {
	for _, fl := range slices.Concat(c.App.Flags, c.Command.Flags) {
		name := fl.Names()[0]
		switch fl.(type) {
		case *cli.DurationFlag:
			if !c.IsSet(name) {
				continue // its default, such as --confirm's 0 for "off"
			}
			if _, err := positiveDuration(c, name); err != nil {
				return err
			}
		}
	}
	// Bad input whoever runs it: judged before the privilege check.
	if err := checkEnums(c, slices.Concat(c.App.Flags, c.Command.Flags)); err != nil {
		return err
	}
	if c.IsSet("out") {
		if err := config.CheckInterface(c.String("out")); err != nil {
			return usageError("--out %v", err)
		}
	}
	return nil
}

// tidyExit keeps the exit status of a run to 0, 1 or 2: urfave/cli's help
// command exits 3 for an unknown topic, echoing the topic as given, which
// is bad input like any other (and gets the nearest command).
func tidyExit(app *cli.App, err error) error {
	var ec cli.ExitCoder
	if errors.As(err, &ec) && ec.ExitCode() > exitUsage {
		return usageError("%s", helpTopicHint(app, config.OneLine(err.Error())))
	}
	return err
}

// zeroDurationOK names duration flags for which 0 means something (such as
// "never"); for every other one, zero or a negative duration is bad input.
var zeroDurationOK = map[string]bool{
	"settle":       true, // watch applies each event at once, without coalescing
	"verify-every": true, // never
}

// positiveDuration returns the value of the duration flag name, refusing
// zero and negative durations with exitUsage, naming the flag and value.
func positiveDuration(c *cli.Context, name string) (time.Duration, error) {
	d := c.Duration(name)
	switch {
	case d < 0 && zeroDurationOK[name]:
		return d, usageError("--%s %s: want 0 or a positive duration such as 500ms", name, d)
	case d <= 0 && !zeroDurationOK[name]:
		return d, usageError("--%s %s: want a positive duration such as 500ms, 10s or 1m", name, d)
	}
	return d, nil
}

// parseDsts reads --dst values: a prefix, or an address meaning that host.
func parseDsts(vals []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range vals {
		for _, s := range strings.Split(v, ",") {
			s = strings.TrimSpace(s)
			p, err := parseDst(s)
			if err != nil {
				return nil, err
			}
			out = append(out, p)
		}
	}
	return out, nil
}

func parseDst(s string) (netip.Prefix, error) {
	p, err := config.ParseDst(s)
	if err != nil {
		return p, usageError("--dst %v (want an address like 198.51.100.4 or a prefix like 198.51.100.0/24)", err)
	}
	return p, nil
}

// parseAddrs reads a comma-separated address list such as --to or --pool,
// all of one family.
func parseAddrs(flag string, vals []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, v := range vals {
		for _, s := range strings.Split(v, ",") {
			s = strings.TrimSpace(s)
			a, err := netip.ParseAddr(s)
			if err != nil || a.Zone() != "" || a.Is4In6() {
				return nil, usageError("--%s %s is not a valid IP address", flag, config.Excerpt(s))
			}
			if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
				return nil, usageError("--%s %s cannot be a source address", flag, a)
			}
			if len(out) > 0 && a.Is4() != out[0].Is4() {
				return nil, usageError("--%s mixes address families: %s and %s", flag, out[0], a)
			}
			if slices.Contains(out, a) {
				// A pool or spread list walks its members in turn; one
				// named twice would get twice the share, silently.
				return nil, usageError("--%s names %s twice", flag, a)
			}
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, usageError("--%s is required", flag)
	}
	return out, nil
}

// parseTo reads --to: addresses as parseAddrs takes them, each with an
// optional =WEIGHT for --spread (192.0.2.22=3,192.0.2.23=1), in an
// entry's To form (snat.Weigh: a weighted list expanded into turns).
// weighted says a weight was given.
func parseTo(vals []string) (to []netip.Addr, weighted bool, err error) {
	var items []string
	for _, v := range vals {
		for _, s := range strings.Split(v, ",") {
			items = append(items, strings.TrimSpace(s))
		}
	}
	var plain []string
	for _, it := range items {
		a, _, _ := strings.Cut(it, "=")
		plain = append(plain, a)
	}
	// The addresses alone first: their checks and messages are parseAddrs'.
	if _, err := parseAddrs("to", plain); err != nil {
		return nil, false, err
	}
	if to, weighted, err = snat.ParseSpread(items); err != nil {
		return nil, false, usageError("--to %v", err)
	}
	return to, weighted, nil
}

// sameFamily checks every destination against the family of the source.
func sameFamily(src netip.Addr, dsts []netip.Prefix) error {
	for _, d := range dsts {
		if d.Addr().Is4() != src.Is4() {
			return usageError("--dst %s and source %s are of different address families", d, src)
		}
	}
	return nil
}

// everything is the prefix meaning every destination of a's family.
func everything(a netip.Addr) netip.Prefix {
	return everythingOf(snat.FamilyOf(a))
}

// everythingOf is the prefix meaning every destination of f.
func everythingOf(f snat.Family) netip.Prefix {
	if f == snat.IPv4 {
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
}

var jsonFlag = &cli.BoolFlag{Name: "json", Usage: "print JSON for scripts instead of text"}

var dryRunFlag = &cli.BoolFlag{Name: "dry-run", Usage: "print the plan and the exact iptables-restore and ipset payloads, change nothing"}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// maxPlanLines bounds the changes printed by a real run; a 10,000-entry
// apply would otherwise flood the terminal.
const maxPlanLines = 20

// planReport is the JSON form of what a write did, or would do.
type planReport struct {
	DryRun   bool              `json:"dry_run"`
	Changed  bool              `json:"changed"`
	Summary  string            `json:"summary"`
	Changes  []snat.Change     `json:"changes"`
	Notes    []string          `json:"notes"`
	Payloads map[string]string `json:"payloads,omitempty"`
	// Steps is the exact program: what runs, in order, with each undo.
	Steps []snat.Step `json:"steps"`
}

// newPlanReport is the JSON form of p; lists are [] rather than null, so
// that scripts need not tell "none" from "absent".
func newPlanReport(p snat.Plan, notes []string, dryRun bool) planReport {
	r := planReport{DryRun: dryRun, Changed: !p.Empty() && !dryRun, Summary: p.Summary(), Changes: p.Changes, Notes: notes, Steps: p.Steps}
	if r.Steps == nil {
		r.Steps = []snat.Step{}
	}
	if r.Changes == nil {
		r.Changes = []snat.Change{}
	}
	if r.Notes == nil {
		r.Notes = []string{}
	}
	if dryRun {
		r.Payloads = p.Payloads()
	}
	return r
}

// reportPlan tells what a write did, or would do with --dry-run: as text, or
// as JSON with --json. notes are extra lines for the operator.
func reportPlan(c *cli.Context, w io.Writer, p snat.Plan, notes []string) error {
	dryRun := c.Bool("dry-run")
	notes = append(notes, lingerNotes(p)...)
	if c.Bool("json") {
		return writeJSON(w, newPlanReport(p, notes, dryRun))
	}
	printPlan(w, p, dryRun)
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
	return nil
}

// lingerNotes say what p keeps only for live connections.
func lingerNotes(p snat.Plan) []string {
	var notes []string
	for _, l := range p.Lingering() {
		notes = append(notes, "kept until the connections using it end: "+l+" (the next egress-snat run after they end removes it; clear --now removes it at once)")
	}
	return notes
}

// printPlan tells, in words, what a write did or would do.
func printPlan(w io.Writer, p snat.Plan, dryRun bool) {
	if p.Empty() {
		fmt.Fprintln(w, "nothing to change: the kernel already has this state")
		return
	}
	verb := ""
	if dryRun {
		verb = "would "
	}
	for i, c := range p.Changes {
		if i == maxPlanLines && !dryRun {
			fmt.Fprintf(w, "... and %s (--dry-run lists them all)\n", plural(len(p.Changes)-i, "more change", "more changes"))
			break
		}
		fmt.Fprintf(w, "%s%s\n", verb, c)
	}
	fmt.Fprintf(w, "%s\n", p.Summary())
	if len(p.Changes) == 0 {
		// No rule changes: say what the steps do (a repair, or what
		// was kept for connections that have ended).
		for _, st := range p.Steps {
			fmt.Fprintf(w, "%s%s\n", verb, st.Why)
		}
	}
	if !dryRun {
		return
	}
	for i, st := range p.Steps {
		when := ""
		if st.Cleanup {
			when = ", after the commit"
		}
		fmt.Fprintf(w, "\n# step %d%s: %s\n", i+1, when, st.Why)
		if st.Do.Note != "" {
			fmt.Fprintf(w, "# %s\n", st.Do)
		} else {
			fmt.Fprintf(w, "# %s\n%s", st.Do.Tool, st.Do.Input)
		}
		if st.Undo != nil {
			fmt.Fprintf(w, "# undo if a later step fails: %s\n", indentComment(st.Undo.String()))
		}
	}
}

// plural counts n things: "1 flow", "2 flows", "0 flows".
func plural[N ~int | ~uint | ~uint64](n N, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

// indentComment keeps a multi-line text inside a shell comment.
func indentComment(s string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n#   ")
}
