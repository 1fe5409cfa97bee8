package main

// The flag matrix (issue 16): --dry-run and --json on every command that
// has them, and the global --netns with apply, check, rotate and watch, on
// the wire in a lab. Which commands have which flag is read from newApp()
// itself, so a command that gains --dry-run or --json without a case here
// fails TestFlagMatrixCoversEveryCommand.

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/snat"
)

// appFlags is, for every command of the app (hidden ones and subcommands
// included, a subcommand as "ha config"), the names of its flags.
func appFlags() map[string]map[string]bool {
	out := map[string]map[string]bool{}
	// The commands are package variables: a run of the app in this
	// process (TestDocsUpToDate, the fuzzer) gives them urfave/cli's help
	// subcommand, which lists itself.
	seen := map[*cli.Command]bool{}
	var walk func(cmds []*cli.Command, prefix string)
	walk = func(cmds []*cli.Command, prefix string) {
		for _, c := range cmds {
			if seen[c] {
				continue
			}
			seen[c] = true
			names := map[string]bool{}
			for _, f := range c.Flags {
				for _, n := range f.Names() {
					names[n] = true
				}
			}
			out[prefix+c.Name] = names
			walk(c.Subcommands, prefix+c.Name+" ")
		}
	}
	walk(newApp().Commands, "")
	return out
}

// TestFlagMatrixCoversEveryCommand: every command with --dry-run has a case
// in dryRunCases, every command with --json one in jsonCases, and no case
// names a command without the flag. Neither flag is global: a global one
// would need a case for every command.
func TestFlagMatrixCoversEveryCommand(t *testing.T) {
	for _, f := range newApp().Flags {
		for _, n := range f.Names() {
			if n == "dry-run" || n == "json" {
				t.Errorf("--%s is a global flag: the matrix has cases per command only", n)
			}
		}
	}
	dry, js := map[string]bool{}, map[string]bool{}
	for _, c := range dryRunCases {
		dry[c.cmd] = true
	}
	for _, c := range jsonCases {
		js[c.cmd] = true
	}
	flags := appFlags()
	for name := range flagMatrixElsewhere {
		if flags[name] == nil {
			t.Errorf("flagMatrixElsewhere names %q, which is no command", name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(flags)) {
		if _, ok := flagMatrixElsewhere[name]; ok {
			continue
		}
		if flags[name]["dry-run"] && !dry[name] {
			t.Errorf("%s has --dry-run but no case in dryRunCases", name)
		}
		if flags[name]["json"] && !js[name] {
			t.Errorf("%s has --json but no case in jsonCases", name)
		}
	}
	for name := range dry {
		if !flags[name]["dry-run"] {
			t.Errorf("dryRunCases has %s, which has no --dry-run", name)
		}
	}
	for name := range js {
		if !flags[name]["json"] {
			t.Errorf("jsonCases has %s, which has no --json", name)
		}
	}
}

// matrixBase is the state every case starts from, on top of other tools'
// rules (addForeignRules): a set of 9 destinations, a plain rule and an
// IPv6 rule.
var matrixBase = "rules:\n" +
	"  - to: 192.0.2.22\n    dst: " + yamlList(append([]string{"198.51.100.4"}, tenNets(snat.SetThreshold)...)...) + "\n" +
	"  - to: 192.0.2.23\n    dst: [203.0.113.7]\n" +
	"  - to: 2001:db8::22\n    dst: [2001:db8:ffff::/48]\n"

// matrixOther is another desired state: the set loses a member and gains
// one (so it is rebuilt), 203.0.113.7 goes, 198.51.100.5 comes, the IPv6
// chain goes.
var matrixOther = "rules:\n" +
	"  - to: 192.0.2.22\n    dst: " + yamlList(append([]string{"198.51.100.4", "198.51.100.77"}, tenNets(snat.SetThreshold)[1:]...)...) + "\n" +
	"  - to: 192.0.2.23\n    dst: [198.51.100.5]\n"

// matrixLab is a lab holding matrixBase, with a permanent file (--config)
// holding it too, in a directory of its own.
type matrixLab struct {
	*lab.Lab
	dir    string // for the case's files
	cfgDir string // the permanent file's directory, watched for stray files
	cfg    string
}

// newMatrixLab builds it; bare leaves out other tools' rules.
func newMatrixLab(t *testing.T, bare bool, opts ...lab.Option) *matrixLab {
	t.Helper()
	m := &matrixLab{Lab: newLab(t, opts...), dir: t.TempDir(), cfgDir: t.TempDir()}
	if !bare {
		addForeignRules(t, m.Lab)
	}
	applyOK(t, m.Lab, writeConfig(t, m.dir, "base.yaml", matrixBase))
	m.cfg = writeConfig(t, m.cfgDir, "permanent.yaml", matrixBase)
	return m
}

// run runs the binary in the lab with the permanent file of m.
func (m *matrixLab) run(t *testing.T, args ...string) result {
	t.Helper()
	return es(t, m.Lab, append([]string{"--config", m.cfg}, args...)...)
}

// files is every file of m.cfgDir with its mode, modification time and
// content, so that a run that wrote, replaced or left a temporary file
// there shows.
func (m *matrixLab) files(t *testing.T) string {
	t.Helper()
	ents, err := os.ReadDir(m.cfgDir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		p := filepath.Join(m.cfgDir, e.Name())
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		body, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s %s %d %s %x\n", e.Name(), fi.Mode(), fi.Size(), fi.ModTime().Format(time.RFC3339Nano), sha256.Sum256(body))
	}
	return b.String()
}

// dryRunCase is a command run with --dry-run, then for real, then with
// --dry-run again, in a matrixLab.
type dryRunCase struct {
	name string
	cmd  string
	args func(m *matrixLab) []string // after the command's name
	// cycles: a real run changes what the next one plans (rotate over two
	// addresses), so the second dry run must plan the next move rather
	// than nothing.
	cycles bool
	opts   []lab.Option // the lab's topology
	bare   bool         // no other tools' rules in the lab
	// setup changes the lab after matrixBase, before the first dry run.
	setup func(t *testing.T, m *matrixLab)
	// moreDry are further flags to run with --dry-run (and with --json,
	// when the command has it) that must change nothing either.
	moreDry [][]string
}

// nicRules installs a rule for another NIC (routes, ip rules) and one of
// method route (a route with src).
func nicRules(t *testing.T, m *matrixLab) {
	mustES(t, m.Lab, "set", "--to", "203.0.113.131", "--dst", "198.51.100.5")
	mustES(t, m.Lab, "set", "--to", "192.0.2.23", "--dst", "198.51.100.9", "--method", "route")
}

var dryRunCases = []dryRunCase{
	{name: "apply", cmd: "apply", moreDry: [][]string{{"--confirm", "60s"}}, args: func(m *matrixLab) []string {
		return []string{"-f", filepath.Join(m.dir, "other.yaml")}
	}},
	{name: "set another NIC", cmd: "set", opts: []lab.Option{lab.WithSecondUplink()}, args: func(*matrixLab) []string {
		return []string{"--to", "203.0.113.131", "--dst", "198.51.100.5"}
	}},
	{name: "set another NIC for a sender", cmd: "set", opts: []lab.Option{lab.WithSecondUplink()}, args: func(*matrixLab) []string {
		return []string{"--to", "203.0.113.131", "--from", "10.77.0.0/24", "--dst", "198.51.100.5"}
	}},
	{name: "set method route", cmd: "set", args: func(*matrixLab) []string {
		return []string{"--to", "192.0.2.22", "--dst", "198.51.100.5", "--method", "route"}
	}},
	{name: "unset routes", cmd: "unset", opts: []lab.Option{lab.WithSecondUplink()}, setup: nicRules, args: func(*matrixLab) []string {
		return []string{"--dst", "198.51.100.5", "--dst", "198.51.100.9"}
	}},
	{name: "clear routes", cmd: "clear", opts: []lab.Option{lab.WithSecondUplink()}, setup: nicRules, args: func(*matrixLab) []string { return nil }},
	{name: "clear alone", cmd: "clear", bare: true, args: func(*matrixLab) []string { return nil }},
	{name: "set joins a set", cmd: "set", args: func(*matrixLab) []string {
		return []string{"--to", "192.0.2.22", "--dst", "198.51.100.77"}
	}},
	{name: "set ipv6", cmd: "set", args: func(*matrixLab) []string {
		return []string{"--to", "2001:db8::23", "--dst", "2001:db8:ffff::4"}
	}},
	{name: "set uid", cmd: "set", args: func(*matrixLab) []string {
		return []string{"--to", "192.0.2.23", "--uid", "65534", "--dst", "198.51.100.4"}
	}},
	{name: "unset", cmd: "unset", args: func(*matrixLab) []string {
		return []string{"--dst", "203.0.113.7"}
	}},
	{name: "clear", cmd: "clear", args: func(*matrixLab) []string { return nil }},
	{name: "rotate", cmd: "rotate", args: func(*matrixLab) []string {
		return []string{"--pool", "192.0.2.22", "--dst", "203.0.113.7"}
	}},
	{name: "rotate two", cmd: "rotate", cycles: true, args: func(*matrixLab) []string {
		return []string{"--pool", "192.0.2.22,192.0.2.23", "--dst", "203.0.113.7"}
	}},
	{name: "save", cmd: "save", args: func(*matrixLab) []string { return nil }},
}

// planJSON is the --json of a write: the plan (apply, set, unset, clear,
// rotate) and rotate's moves.
type planJSON struct {
	DryRun   bool              `json:"dry_run"`
	Changed  bool              `json:"changed"`
	Summary  string            `json:"summary"`
	Changes  []any             `json:"changes"`
	Notes    []string          `json:"notes"`
	Payloads map[string]string `json:"payloads"`
	Steps    []stepJSON        `json:"steps"`
	Moves    []moveJSON        `json:"moves"`
}

type stepJSON struct {
	Why     string       `json:"why"`
	Do      commandJSON  `json:"do"`
	Undo    *commandJSON `json:"undo"`
	Cleanup bool         `json:"cleanup"`
}

type commandJSON struct {
	Tool   string `json:"tool"`
	Family int    `json:"family"`
	Input  string `json:"input"`
}

type moveJSON struct {
	Dst  string `json:"dst"`
	From string `json:"from"`
	To   string `json:"to"`
}

// planFields are the top-level fields of every write's --json; rotate adds
// moves, a dry run payloads.
var planFields = []string{"dry_run", "changed", "summary", "changes", "notes", "steps"}

// decodeJSON checks that out is exactly one JSON object holding each of
// fields (as a key, whatever its value), decodes it into v and returns its
// members.
func decodeJSON(t *testing.T, what, out string, v any, fields ...string) map[string]json.RawMessage {
	t.Helper()
	var top map[string]json.RawMessage
	dec := json.NewDecoder(strings.NewReader(out))
	if err := dec.Decode(&top); err != nil {
		t.Fatalf("%s: stdout is not a JSON object: %v\n%s", what, err, out)
	}
	if _, err := dec.Token(); err != io.EOF {
		t.Fatalf("%s: stdout holds more than one JSON value:\n%s", what, out)
	}
	for _, f := range fields {
		if _, ok := top[f]; !ok {
			t.Errorf("%s: JSON has no %q:\n%s", what, f, out)
		}
	}
	var all any
	if err := json.Unmarshal([]byte(out), &all); err != nil {
		t.Fatal(err)
	}
	if path := nullIn(all, ""); path != "" {
		t.Errorf("%s: %s is null; a list with nothing in it is [], and a field with no value is left out:\n%s", what, path, out)
	}
	if v != nil {
		if err := json.Unmarshal([]byte(out), v); err != nil {
			t.Fatalf("%s: %v\n%s", what, err, out)
		}
	}
	return top
}

// nullIn is the path of the first null in v, or "".
func nullIn(v any, path string) string {
	switch v := v.(type) {
	case nil:
		return "." + strings.TrimPrefix(path, ".")
	case map[string]any:
		for _, k := range slices.Sorted(maps.Keys(v)) {
			if p := nullIn(v[k], path+"."+k); p != "" {
				return p
			}
		}
	case []any:
		for i, e := range v {
			if p := nullIn(e, fmt.Sprintf("%s[%d]", path, i)); p != "" {
				return p
			}
		}
	}
	return ""
}

// payloadsOf is what a plan's payloads must be: each tool's inputs, in the
// order of the steps (snat.Plan.Payloads).
func payloadsOf(steps []stepJSON) map[string]string {
	out := map[string]string{}
	for _, s := range steps {
		if s.Do.Tool == string(iptables.ToolDropTable) {
			continue
		}
		name := strings.Fields(s.Do.Tool)[0]
		if s.Do.Tool == string(snat.ToolIP4Batch) || s.Do.Tool == string(snat.ToolIP6Batch) {
			name = s.Do.Tool
		}
		out[name] += s.Do.Input
	}
	return out
}

// dryVariants are the ways a case runs with --dry-run: plain, --json,
// --permanent (the file is edited and checked, not written) and both, as
// far as the command has them.
func dryVariants(flags map[string]bool) [][]string {
	out := [][]string{{"--dry-run"}}
	if flags["json"] {
		out = append(out, []string{"--dry-run", "--json"})
	}
	if flags["permanent"] {
		out = append(out, []string{"--dry-run", "--permanent"})
		if flags["json"] {
			out = append(out, []string{"--dry-run", "--permanent", "--json"})
		}
	}
	return out
}

// TestFlagMatrixDryRun: for every command with --dry-run, in a lab with
// rules, foreign rules and a permanent file: each dry run (text, --json,
// --permanent) exits 0 and leaves the host (rules of both families, every
// set with its members, ip rules, routes) and the permanent file's
// directory byte for byte as they were; the JSON plan's steps, played on a
// model of the kernel as iptables-restore --noflush and ipset restore
// would, give exactly the kernel the real run leaves, and the real run
// reports the same steps and changes; a second dry run plans nothing.
func TestFlagMatrixDryRun(t *testing.T) {
	iptablesOnly(t, "its model of the kernel plays iptables-restore, ipset and ip -batch payloads")
	t.Parallel()
	flags := appFlags()
	for _, tc := range dryRunCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := newMatrixLab(t, tc.bare, tc.opts...)
			writeConfig(t, m.dir, "other.yaml", matrixOther)
			if tc.setup != nil {
				tc.setup(t, m)
				// The permanent file says what the host has.
				if r := m.run(t, "save"); r.code != 0 {
					t.Fatalf("save: exit %d\n%s", r.code, r.stderr)
				}
			}
			fl := flags[tc.cmd]
			args := append([]string{tc.cmd}, tc.args(m)...)
			if tc.cmd == "save" {
				dryRunSave(t, m, args)
				return
			}

			before, files, kernel := m.HostState(t), m.files(t), readKernel(t, m.Lab)
			var plan *planJSON
			texts := map[string]string{}
			variants := dryVariants(fl)
			for _, more := range tc.moreDry {
				variants = append(variants, append([]string{"--dry-run"}, more...))
				if fl["json"] {
					variants = append(variants, append([]string{"--dry-run", "--json"}, more...))
				}
			}
			for _, v := range variants {
				run := append(slices.Clone(args), v...)
				what := strings.Join(run, " ")
				r := m.run(t, run...)
				if r.code != 0 {
					t.Fatalf("%s: exit %d, want 0\n%s%s", what, r.code, r.stdout, r.stderr)
				}
				if diff := cmp.Diff(before, m.HostState(t)); diff != "" {
					t.Errorf("%s changed the host (-before +after):\n%s", what, diff)
				}
				if got := m.files(t); got != files {
					t.Errorf("%s changed the permanent file's directory:\nbefore:\n%s\nafter:\n%s", what, files, got)
				}
				if !slices.Contains(v, "--json") {
					texts[what] = r.stdout
					continue
				}
				var p planJSON
				fields := append([]string{"payloads"}, planFields...)
				if tc.cmd == "rotate" {
					fields = append(fields, "moves")
				}
				decodeJSON(t, what, r.stdout, &p, fields...)
				if !p.DryRun || p.Changed || len(p.Steps) == 0 || len(p.Changes) == 0 {
					t.Errorf("%s: dry_run %v, changed %v, %d steps, %d changes; want a dry run that changed nothing and plans steps and changes",
						what, p.DryRun, p.Changed, len(p.Steps), len(p.Changes))
				}
				if diff := cmp.Diff(payloadsOf(p.Steps), p.Payloads); diff != "" {
					t.Errorf("%s: payloads are not the steps' inputs (-steps +payloads):\n%s", what, diff)
				}
				if plan == nil {
					plan = &p
				} else if diff := cmp.Diff(plan.Steps, p.Steps); diff != "" {
					t.Errorf("%s plans other steps than %s --dry-run --json (-first +this):\n%s", what, tc.cmd, diff)
				}
			}
			if plan == nil {
				t.Fatalf("%s has no --json: the matrix needs it to know the plan", tc.cmd)
			}
			if fl["confirm"] {
				// A dry run with --confirm left no revert pending.
				if out := mustES(t, m.Lab, "confirm"); !strings.Contains(out, "nothing pending") {
					t.Errorf("confirm after the dry runs with --confirm printed %q, want \"nothing pending\"", out)
				}
			}
			// The text says the same program.
			for what, text := range texts {
				if !strings.Contains(text, plan.Summary) {
					t.Errorf("%s printed:\n%s\nwant the summary %q", what, text, plan.Summary)
				}
				for _, s := range plan.Steps {
					if !strings.Contains(text, s.Why) || !strings.Contains(text, s.Do.Input) {
						t.Errorf("%s printed:\n%s\nwant the step %q with its input:\n%s", what, text, s.Why, s.Do.Input)
					}
				}
			}

			// The real run does what the dry run printed.
			run := append(slices.Clone(args), "--json")
			if fl["permanent"] {
				run = append(run, "--permanent")
			}
			what := strings.Join(run, " ")
			r := m.run(t, run...)
			if r.code != 0 {
				t.Fatalf("%s: exit %d, want 0\n%s%s", what, r.code, r.stdout, r.stderr)
			}
			var done planJSON
			decodeJSON(t, what, r.stdout, &done, planFields...)
			if done.DryRun || !done.Changed {
				t.Errorf("%s: dry_run %v, changed %v; want a run that changed the host", what, done.DryRun, done.Changed)
			}
			if diff := cmp.Diff(plan.Steps, done.Steps); diff != "" {
				t.Errorf("%s ran other steps than its dry run printed (-dry +real):\n%s", what, diff)
			}
			if diff := cmp.Diff(plan.Changes, done.Changes); diff != "" {
				t.Errorf("%s made other changes than its dry run printed (-dry +real):\n%s", what, diff)
			}
			if diff := cmp.Diff(plan.Moves, done.Moves); diff != "" {
				t.Errorf("%s made other moves than its dry run printed (-dry +real):\n%s", what, diff)
			}
			after := m.HostState(t)
			if after == before {
				t.Errorf("%s left the host as it was", what)
			}
			want := kernel.play(t, plan.Steps)
			if diff := cmp.Diff(want.String(), readKernel(t, m.Lab).String()); diff != "" {
				t.Errorf("%s: the kernel is not what the dry run's steps make of it (-steps +kernel):\n%s", what, diff)
			}
			if fl["permanent"] {
				if m.files(t) == files {
					t.Errorf("%s left the permanent file as it was", what)
				}
				// File and kernel agree.
				if r := m.run(t, "check"); r.code != checkInSync {
					t.Errorf("check after %s: exit %d, want in sync\n%s%s", what, r.code, r.stdout, r.stderr)
				}
			}

			// Now there is nothing left to do (or, for a rotation over
			// two addresses, the next move).
			files = m.files(t)
			for _, v := range dryVariants(fl) {
				run := append(slices.Clone(args), v...)
				what := strings.Join(run, " ") + " (again)"
				r := m.run(t, run...)
				if r.code != 0 {
					t.Fatalf("%s: exit %d, want 0\n%s%s", what, r.code, r.stdout, r.stderr)
				}
				if diff := cmp.Diff(after, m.HostState(t)); diff != "" {
					t.Errorf("%s changed the host (-before +after):\n%s", what, diff)
				}
				if got := m.files(t); got != files {
					t.Errorf("%s changed the permanent file's directory:\nbefore:\n%s\nafter:\n%s", what, files, got)
				}
				if !slices.Contains(v, "--json") {
					if again := strings.Contains(r.stdout, "nothing to change"); again == tc.cycles {
						t.Errorf("%s printed:\n%s\nwant \"nothing to change\": %v", what, r.stdout, !tc.cycles)
					}
					continue
				}
				var p planJSON
				decodeJSON(t, what, r.stdout, &p, planFields...)
				switch {
				case tc.cycles:
					if len(p.Steps) == 0 || len(p.Moves) != len(done.Moves) || len(p.Moves) == 0 || p.Moves[0].From != done.Moves[0].To {
						t.Errorf("%s: moves %+v after moves %+v; want the next move planned", what, p.Moves, done.Moves)
					}
				case len(p.Steps) != 0 || len(p.Changes) != 0 || p.Changed:
					t.Errorf("%s: %d steps, %d changes, changed %v; want an empty plan\n%s", what, len(p.Steps), len(p.Changes), p.Changed, r.stdout)
				}
			}
		})
	}
}

// dryRunSave: save --dry-run prints the file a real save then writes, byte
// for byte, and changes nothing; the kernel is never written.
func dryRunSave(t *testing.T, m *matrixLab, args []string) {
	before, files := m.HostState(t), m.files(t)
	dry := append(slices.Clone(args), "--dry-run")
	r := m.run(t, dry...)
	if r.code != 0 {
		t.Fatalf("save --dry-run: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if got := m.files(t); got != files {
		t.Errorf("save --dry-run changed the permanent file's directory:\nbefore:\n%s\nafter:\n%s", files, got)
	}
	printed := r.stdout
	if r := m.run(t, args...); r.code != 0 {
		t.Fatalf("save: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	body, err := os.ReadFile(m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if string(body) != printed {
		t.Errorf("save wrote another file than its dry run printed (-dry +file):\n%s", cmp.Diff(printed, string(body)))
	}
	if m.files(t) == files {
		t.Errorf("save left the permanent file as it was")
	}
	files = m.files(t)
	if r := m.run(t, dry...); r.code != 0 || r.stdout != string(body) {
		t.Errorf("save --dry-run (again): exit %d, printed:\n%s\nwant the file as it is:\n%s", r.code, r.stdout, body)
	}
	if got := m.files(t); got != files {
		t.Errorf("save --dry-run (again) changed the permanent file's directory")
	}
	if diff := cmp.Diff(before, m.HostState(t)); diff != "" {
		t.Errorf("save changed the host (-before +after):\n%s", diff)
	}
	if r := m.run(t, "check"); r.code != checkInSync {
		t.Errorf("check after save: exit %d, want in sync\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// kernelModel is the part of the kernel a plan writes: the iptables tables
// of both families, the ipsets, and egress-snat's routes and ip rules,
// parsed from iptables-save, ipset save and ip's listings so that a plan's
// steps can be played on it as the tools would.
type kernelModel struct {
	tables map[int]map[string]map[string]*modelChain // family, table, chain
	sets   map[string]*modelSet
	// routes and rules are egress-snat's (proto 83), each in a canonical
	// form that the payload's lines and ip's listing both reduce to:
	// "4 table 7420 198.51.100.4 via 192.0.2.1 dev eth0 src 192.0.2.22",
	// "4 pref 7420 from 0.0.0.0 lookup 7420".
	routes, rules []string
}

type modelChain struct {
	user  bool
	rules []string // each as iptables-save prints it, without "-A CHAIN "
}

type modelSet struct {
	kind    string // type and family, "hash:net inet"; not the sizes
	members []string
}

var builtinChains = map[string][]string{
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	"mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
	"raw":    {"PREROUTING", "OUTPUT"},
}

func readKernel(t *testing.T, l *lab.Lab) *kernelModel {
	t.Helper()
	k := &kernelModel{tables: map[int]map[string]map[string]*modelChain{}, sets: map[string]*modelSet{}}
	for _, f := range []int{4, 6} {
		k.tables[f] = map[string]map[string]*modelChain{}
		table := ""
		for line := range strings.Lines(l.Run(t, iptablesCmd(f)+"-save")) {
			line = strings.TrimSuffix(line, "\n")
			switch {
			case line == "" || strings.HasPrefix(line, "#") || line == "COMMIT":
			case strings.HasPrefix(line, "*"):
				table = line[1:]
				k.tables[f][table] = map[string]*modelChain{}
			case strings.HasPrefix(line, ":"):
				fs := strings.Fields(line[1:])
				k.tables[f][table][fs[0]] = &modelChain{user: fs[1] == "-"}
			case strings.HasPrefix(line, "-A "):
				fs := strings.SplitN(line, " ", 3)
				c := k.tables[f][table][fs[1]]
				c.rules = append(c.rules, fs[2])
			default:
				t.Fatalf("%s-save: cannot read %q", iptablesCmd(f), line)
			}
		}
	}
	if err := k.playIPSet(l.Run(t, "ipset", "save")); err != nil {
		t.Fatalf("ipset save: %v", err)
	}
	for _, f := range []int{4, 6} {
		fam := "-" + strconv.Itoa(f)
		for line := range strings.Lines(l.Run(t, "ip", fam, "route", "show", "table", "all", "proto", "83")) {
			k.routes = append(k.routes, canonRoute(f, strings.Fields(line)))
		}
		for line := range strings.Lines(l.Run(t, "ip", fam, "rule", "show")) {
			fs := strings.Fields(line)
			if len(fs) < 2 || fs[len(fs)-2] != "proto" || fs[len(fs)-1] != "83" {
				continue
			}
			k.rules = append(k.rules, canonRule(f, strings.TrimSuffix(fs[0], ":"), fs[1:]))
		}
	}
	return k
}

// canonHost drops the /32 or /128 of a host, as ip prints it.
func canonHost(a string) string {
	return strings.TrimSuffix(strings.TrimSuffix(a, "/32"), "/128")
}

// canonRoute reduces a route, as ip route lists it or a batch line gives it
// (after "route add|replace|del"), to its table, destination, gateway,
// device and source.
func canonRoute(f int, fs []string) string {
	attrs := map[string]string{"table": "main"}
	for i := 1; i+1 < len(fs); i++ {
		switch fs[i] {
		case "via", "dev", "src", "table":
			attrs[fs[i]] = fs[i+1]
			i++
		}
	}
	out := fmt.Sprintf("%d table %s %s", f, attrs["table"], canonHost(fs[0]))
	for _, k := range []string{"via", "dev", "src"} {
		if v, ok := attrs[k]; ok {
			out += " " + k + " " + v
		}
	}
	return out
}

// tableNames are the routing tables ip rule lists by name.
var tableNames = map[string]string{"253": "default", "254": "main", "255": "local"}

// canonRule reduces an ip rule, as ip rule lists it (after "PREF:") or a
// batch line gives it (after "rule add|del pref PREF"), to its selectors
// and action.
func canonRule(f int, pref string, fs []string) string {
	attrs := map[string]string{"from": "all"}
	var action string
	for i := 0; i < len(fs); i++ {
		switch k := fs[i]; k {
		case "from", "fwmark", "suppress_prefixlength":
			if i+1 < len(fs) {
				attrs[k] = fs[i+1]
				i++
			}
		case "lookup", "goto":
			if i+1 < len(fs) {
				v := fs[i+1]
				if name, ok := tableNames[v]; ok {
					v = name
				}
				action = k + " " + v
				i++
			}
		case "nop":
			action = "nop"
		case "proto", "protocol":
			i++
		}
	}
	attrs["from"] = canonHost(attrs["from"])
	if attrs["from"] == "0.0.0.0/0" || attrs["from"] == "::/0" {
		attrs["from"] = "all"
	}
	attrs["fwmark"] = strings.TrimSuffix(attrs["fwmark"], "/0xffffffff")
	out := fmt.Sprintf("%d pref %s from %s", f, pref, attrs["from"])
	if attrs["fwmark"] != "" {
		out += " fwmark " + attrs["fwmark"]
	}
	out += " " + action
	if v, ok := attrs["suppress_prefixlength"]; ok {
		out += " suppress_prefixlength " + v
	}
	return out
}

// playIPBatch plays an ip -batch input of routes and rules.
func (k *kernelModel) playIPBatch(f int, input string) error {
	for line := range strings.Lines(input) {
		fs := strings.Fields(line)
		switch {
		case len(fs) == 0:
		case len(fs) >= 3 && fs[0] == "route":
			r := canonRoute(f, fs[2:])
			// A route is one per table and destination.
			key := strings.Join(strings.Fields(r)[:4], " ")
			i := slices.IndexFunc(k.routes, func(s string) bool { return strings.Join(strings.Fields(s)[:4], " ") == key })
			switch fs[1] {
			case "replace":
				if i >= 0 {
					k.routes = slices.Delete(k.routes, i, i+1)
				}
				k.routes = append(k.routes, r)
			case "add":
				if i >= 0 {
					return fmt.Errorf("%q: route exists", line)
				}
				k.routes = append(k.routes, r)
			case "del":
				if i < 0 {
					return fmt.Errorf("%q: no such route", line)
				}
				k.routes = slices.Delete(k.routes, i, i+1)
			default:
				return fmt.Errorf("%q: the model does not know this command", line)
			}
		case len(fs) >= 4 && fs[0] == "rule" && fs[2] == "pref":
			r := canonRule(f, fs[3], fs[4:])
			i := slices.Index(k.rules, r)
			switch fs[1] {
			case "add":
				k.rules = append(k.rules, r)
			case "del":
				if i < 0 {
					return fmt.Errorf("%q: no such rule", line)
				}
				k.rules = slices.Delete(k.rules, i, i+1)
			default:
				return fmt.Errorf("%q: the model does not know this command", line)
			}
		default:
			return fmt.Errorf("%q: the model does not know this command", line)
		}
	}
	return nil
}

func (k *kernelModel) clone() *kernelModel {
	c := &kernelModel{tables: map[int]map[string]map[string]*modelChain{}, sets: map[string]*modelSet{}}
	for f, ts := range k.tables {
		c.tables[f] = map[string]map[string]*modelChain{}
		for tn, chains := range ts {
			c.tables[f][tn] = map[string]*modelChain{}
			for cn, ch := range chains {
				c.tables[f][tn][cn] = &modelChain{user: ch.user, rules: slices.Clone(ch.rules)}
			}
		}
	}
	for n, s := range k.sets {
		c.sets[n] = &modelSet{kind: s.kind, members: slices.Clone(s.members)}
	}
	c.routes, c.rules = slices.Clone(k.routes), slices.Clone(k.rules)
	return c
}

// String is the model in a fixed order: tables, chains and sets by name,
// rules in their order, members sorted.
func (k *kernelModel) String() string {
	var b strings.Builder
	for _, f := range []int{4, 6} {
		for _, tn := range slices.Sorted(maps.Keys(k.tables[f])) {
			fmt.Fprintf(&b, "ipv%d *%s\n", f, tn)
			for _, cn := range slices.Sorted(maps.Keys(k.tables[f][tn])) {
				c := k.tables[f][tn][cn]
				fmt.Fprintf(&b, "  :%s user=%v\n", cn, c.user)
				for _, r := range c.rules {
					fmt.Fprintf(&b, "  -A %s %s\n", cn, r)
				}
			}
		}
	}
	for _, n := range slices.Sorted(maps.Keys(k.sets)) {
		s := k.sets[n]
		fmt.Fprintf(&b, "set %s %s\n", n, s.kind)
		for _, m := range slices.Sorted(slices.Values(s.members)) {
			fmt.Fprintf(&b, "  %s\n", m)
		}
	}
	for _, r := range slices.Sorted(slices.Values(k.routes)) {
		fmt.Fprintf(&b, "route %s\n", r)
	}
	for _, r := range slices.Sorted(slices.Values(k.rules)) {
		fmt.Fprintf(&b, "rule %s\n", r)
	}
	return b.String()
}

// play returns the kernel after steps, all of which succeed (undos do not
// run; cleanup steps do).
func (k *kernelModel) play(t *testing.T, steps []stepJSON) *kernelModel {
	t.Helper()
	k = k.clone()
	for i, s := range steps {
		var err error
		switch s.Do.Tool {
		case string(iptables.ToolIPTables):
			err = k.playRestore(4, s.Do.Input)
		case string(iptables.ToolIP6Tables):
			err = k.playRestore(6, s.Do.Input)
		case string(iptables.ToolIPSet):
			err = k.playIPSet(s.Do.Input)
		case string(iptables.ToolDropTable):
			table := s.Do.Input
			if table == "" {
				table = "nat"
			}
			k.dropIfEmpty(s.Do.Family, table)
		case string(snat.ToolIP4Batch):
			err = k.playIPBatch(4, s.Do.Input)
		case string(snat.ToolIP6Batch):
			err = k.playIPBatch(6, s.Do.Input)
		default:
			// A tool the model does not know needs the model extended,
			// not a silent pass.
			t.Fatalf("step %d (%s): the model cannot play %q", i+1, s.Why, s.Do.Tool)
		}
		if err != nil {
			t.Fatalf("step %d (%s): %v\ninput:\n%s", i+1, s.Why, err, s.Do.Input)
		}
	}
	return k
}

// playRestore plays an iptables-restore --noflush input: a user chain
// declared is created or flushed, -A appends, -I inserts, -D deletes the
// one identical rule (failing as the tool would when there is none), -X
// deletes a chain, -F flushes one.
func (k *kernelModel) playRestore(f int, input string) error {
	var chains map[string]*modelChain
	chain := func(name string) (*modelChain, error) {
		c := chains[name]
		if c == nil {
			return nil, fmt.Errorf("no chain %s", name)
		}
		return c, nil
	}
	for line := range strings.Lines(input) {
		line = strings.TrimSuffix(line, "\n")
		fs := strings.Fields(line)
		switch {
		case line == "" || line == "COMMIT" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			tn := line[1:]
			if k.tables[f][tn] == nil {
				k.tables[f][tn] = map[string]*modelChain{}
				for _, b := range builtinChains[tn] {
					k.tables[f][tn][b] = &modelChain{}
				}
			}
			chains = k.tables[f][tn]
		case strings.HasPrefix(line, ":"):
			name, policy := fs[0][1:], fs[1]
			if policy == "-" {
				chains[name] = &modelChain{user: true}
			}
		case fs[0] == "-A" || fs[0] == "-D":
			c, err := chain(fs[1])
			if err != nil {
				return err
			}
			rule := strings.SplitN(line, " ", 3)[2]
			if fs[0] == "-A" {
				c.rules = append(c.rules, rule)
				continue
			}
			i := slices.Index(c.rules, rule)
			if i < 0 {
				return fmt.Errorf("%q: no such rule in %s", line, fs[1])
			}
			c.rules = slices.Delete(c.rules, i, i+1)
		case fs[0] == "-I":
			c, err := chain(fs[1])
			if err != nil {
				return err
			}
			pos, rest := 1, strings.SplitN(line, " ", 3)[2]
			if n, err := strconv.Atoi(fs[2]); err == nil {
				pos, rest = n, strings.SplitN(line, " ", 4)[3]
			}
			if pos < 1 || pos > len(c.rules)+1 {
				return fmt.Errorf("%q: position %d of %d rules", line, pos, len(c.rules))
			}
			c.rules = slices.Insert(c.rules, pos-1, rest)
		case fs[0] == "-F":
			c, err := chain(fs[1])
			if err != nil {
				return err
			}
			c.rules = nil
		case fs[0] == "-X":
			c, err := chain(fs[1])
			if err != nil {
				return err
			}
			if len(c.rules) > 0 || !c.user {
				return fmt.Errorf("%q: chain not empty or built in", line)
			}
			delete(chains, fs[1])
		default:
			return fmt.Errorf("%q: the model does not know this command", line)
		}
	}
	return nil
}

// playIPSet plays an ipset restore input, or reads ipset save's.
func (k *kernelModel) playIPSet(input string) error {
	for line := range strings.Lines(input) {
		fs := strings.Fields(line)
		if len(fs) == 0 {
			continue
		}
		need := func(n int) error {
			if len(fs) < n {
				return fmt.Errorf("%q: too short", line)
			}
			if fs[0] != "create" && k.sets[fs[1]] == nil {
				return fmt.Errorf("%q: no set %s", line, fs[1])
			}
			return nil
		}
		switch fs[0] {
		case "create":
			if err := need(3); err != nil {
				return err
			}
			if k.sets[fs[1]] != nil {
				return fmt.Errorf("%q: set %s exists", line, fs[1])
			}
			kind := fs[2]
			if i := slices.Index(fs, "family"); i > 0 && i+1 < len(fs) {
				kind += " " + fs[i+1]
			}
			k.sets[fs[1]] = &modelSet{kind: kind}
		case "add", "del":
			if err := need(3); err != nil {
				return err
			}
			s := k.sets[fs[1]]
			// ipset save prints a host entry without its /32 or /128.
			m := strings.Join(append([]string{strings.TrimSuffix(strings.TrimSuffix(fs[2], "/32"), "/128")}, fs[3:]...), " ")
			i := slices.Index(s.members, m)
			switch {
			case fs[0] == "add" && i >= 0:
				return fmt.Errorf("%q: already a member", line)
			case fs[0] == "add":
				s.members = append(s.members, m)
			case i < 0:
				return fmt.Errorf("%q: not a member", line)
			default:
				s.members = slices.Delete(s.members, i, i+1)
			}
		case "flush":
			if err := need(2); err != nil {
				return err
			}
			k.sets[fs[1]].members = nil
		case "destroy":
			if err := need(2); err != nil {
				return err
			}
			delete(k.sets, fs[1])
		case "swap":
			if err := need(3); err != nil {
				return err
			}
			if k.sets[fs[2]] == nil {
				return fmt.Errorf("%q: no set %s", line, fs[2])
			}
			k.sets[fs[1]], k.sets[fs[2]] = k.sets[fs[2]], k.sets[fs[1]]
		case "rename":
			if err := need(3); err != nil {
				return err
			}
			k.sets[fs[2]] = k.sets[fs[1]]
			delete(k.sets, fs[1])
		default:
			return fmt.Errorf("%q: the model does not know this command", line)
		}
	}
	return nil
}

// dropIfEmpty deletes a table holding no user chain and no rule, as the
// plan's "nft delete table" step does ("only if it is still empty").
func (k *kernelModel) dropIfEmpty(f int, table string) {
	for _, c := range k.tables[f][table] {
		if c.user || len(c.rules) > 0 {
			return
		}
	}
	delete(k.tables[f], table)
}

// jsonCase is one run of a command with --json in a lab of its own
// (matrixLab unless fresh), after setup.
type jsonCase struct {
	name  string
	cmd   string
	fresh bool // a lab without rules
	setup func(t *testing.T, m *matrixLab)
	args  func(m *matrixLab) []string // after the command's name, without --json
	code  int
	// check looks at the decoded JSON; nil for a failure, whose stdout
	// must be empty (the reason is on stderr).
	check func(t *testing.T, m *matrixLab, out string)
}

// jsonFields are the documented top-level fields of each command's --json
// on success and on a reported failure (check's drift, verify's mismatch).
var jsonFields = map[string][]string{
	"apply":   planFields,
	"set":     planFields,
	"unset":   planFields,
	"clear":   planFields,
	"rotate":  append(slices.Clone(planFields), "moves"),
	"list":    {"backend", "rules", "warnings"},
	"check":   {"in_sync", "findings"},
	"explain": {"dst", "probe", "table", "route", "interface", "source", "reason", "addresses", "why", "sender", "effective_source"},
	"stats":   {"addresses", "pools"},
	"verify":  {"agree", "results"},
}

func argv(a ...string) func(*matrixLab) []string { return func(*matrixLab) []string { return a } }

// wantPlan checks a write's report: whether it changed the host, and the
// notes it must carry.
func wantPlan(changed bool, notes ...string) func(t *testing.T, m *matrixLab, out string) {
	return func(t *testing.T, m *matrixLab, out string) {
		var p planJSON
		decodeJSON(t, "plan", out, &p)
		if p.DryRun || p.Changed != changed || (len(p.Steps) > 0) != changed || p.Changes == nil || p.Notes == nil || p.Steps == nil {
			t.Errorf("dry_run %v, changed %v, %d steps, changes %v, notes %v; want changed %v, and lists rather than null", p.DryRun, p.Changed, len(p.Steps), p.Changes, p.Notes, changed)
		}
		for _, n := range notes {
			if !slices.ContainsFunc(p.Notes, func(s string) bool { return strings.Contains(s, n) }) {
				t.Errorf("notes %q, want one with %q", p.Notes, n)
			}
		}
	}
}

var jsonCases = []jsonCase{
	{name: "apply changes", cmd: "apply", args: func(m *matrixLab) []string { return []string{"-f", filepath.Join(m.dir, "other.yaml")} },
		check: wantPlan(true)},
	{name: "apply no change", cmd: "apply", args: func(m *matrixLab) []string { return []string{"-f", filepath.Join(m.dir, "base.yaml")} },
		check: wantPlan(false)},
	{name: "apply bad file", cmd: "apply", args: func(m *matrixLab) []string { return []string{"-f", filepath.Join(m.dir, "bad.yaml")} }, code: exitUsage},
	{name: "set changes", cmd: "set", args: argv("--to", "192.0.2.22", "--dst", "198.51.100.77"), check: wantPlan(true)},
	{name: "set no change", cmd: "set", args: argv("--to", "192.0.2.23", "--dst", "203.0.113.7"), check: wantPlan(false)},
	{name: "set the natural source", cmd: "set", args: argv("--to", "192.0.2.250", "--dst", "198.51.100.99"), check: wantPlan(false, "no rule needed")},
	{name: "set address not on the host", cmd: "set", args: argv("--to", "192.0.2.99", "--dst", "198.51.100.99"), code: exitUsage},
	{name: "unset changes", cmd: "unset", args: argv("--dst", "203.0.113.7"), check: wantPlan(true)},
	{name: "unset no rule", cmd: "unset", args: argv("--dst", "198.51.100.99"), check: wantPlan(false, "has no rule")},
	{name: "unset bad destination", cmd: "unset", args: argv("--dst", "198.51.100.999"), code: exitUsage},
	{name: "clear changes", cmd: "clear", args: argv(), check: wantPlan(true)},
	{name: "clear nothing", cmd: "clear", fresh: true, args: argv(), check: wantPlan(false)},
	{name: "clear permanent file unreadable", cmd: "clear",
		setup: func(t *testing.T, m *matrixLab) { writeConfig(t, m.cfgDir, "permanent.yaml", "rules: [\n") },
		args:  argv("--permanent"), code: exitUsage},
	{name: "rotate moves", cmd: "rotate", args: argv("--pool", "192.0.2.22,192.0.2.23", "--dst", "203.0.113.7"),
		check: func(t *testing.T, m *matrixLab, out string) {
			wantPlan(true)(t, m, out)
			var p planJSON
			decodeJSON(t, "rotate", out, &p)
			if len(p.Moves) != 1 || p.Moves[0] != (moveJSON{"203.0.113.7/32", "192.0.2.23", "192.0.2.22"}) {
				t.Errorf("moves %+v, want 203.0.113.7/32 from 192.0.2.23 to 192.0.2.22", p.Moves)
			}
		}},
	{name: "rotate stays", cmd: "rotate", args: argv("--pool", "192.0.2.23", "--dst", "203.0.113.7"), check: wantPlan(false)},
	{name: "rotate pool not on the host", cmd: "rotate", args: argv("--pool", "192.0.2.98,192.0.2.99", "--dst", "203.0.113.7"), code: exitUsage},
	{name: "list rules", cmd: "list", args: argv(), check: func(t *testing.T, m *matrixLab, out string) {
		var l struct {
			Backend string                       `json:"backend"`
			Rules   []map[string]json.RawMessage `json:"rules"`
		}
		decodeJSON(t, "list", out, &l)
		if l.Backend != backend(t) || len(l.Rules) != snat.SetThreshold+3 {
			t.Errorf("backend %q, %d rules; want %s and %d rules:\n%s", l.Backend, len(l.Rules), backend(t), snat.SetThreshold+3, out)
		}
		for _, r := range l.Rules {
			for _, f := range []string{"sender", "dst", "out", "to", "family", "spread", "to_present"} {
				if _, ok := r[f]; !ok {
					t.Errorf("list --json rule without %q: %v", f, r)
				}
			}
		}
	}},
	{name: "list none", cmd: "list", fresh: true, args: argv(), check: func(t *testing.T, m *matrixLab, out string) {
		top := decodeJSON(t, "list", out, nil)
		if string(top["rules"]) != "[]" || string(top["warnings"]) != "[]" {
			t.Errorf("list --json without rules: rules %s, warnings %s; want [] and []", top["rules"], top["warnings"])
		}
	}},
	{name: "check in sync", cmd: "check", args: func(m *matrixLab) []string { return []string{"-f", filepath.Join(m.dir, "base.yaml")} },
		check: wantCheck(true)},
	{name: "check drift", cmd: "check", code: checkDrift,
		setup: func(t *testing.T, m *matrixLab) { relRestore(t, m.Lab, 4, "-F EGRESS-SNAT\n") },
		args:  func(m *matrixLab) []string { return []string{"-f", filepath.Join(m.dir, "base.yaml")} }, check: wantCheck(false)},
	{name: "check drift without a file", cmd: "check", code: checkDrift,
		setup: func(t *testing.T, m *matrixLab) {
			relRestore(t, m.Lab, 6, "-D POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT\n")
		},
		args: argv(), check: wantCheck(false, "jump-missing")},
	{name: "check bad file", cmd: "check", code: checkError, args: func(m *matrixLab) []string { return []string{"-f", filepath.Join(m.dir, "bad.yaml")} }},
	{name: "explain managed", cmd: "explain", args: argv("--dst", "203.0.113.7"), check: wantExplain("192.0.2.23", true)},
	{name: "explain unmanaged", cmd: "explain", args: argv("--dst", "198.51.100.5"), check: wantExplain("192.0.2.250", false)},
	{name: "explain bad destination", cmd: "explain", args: argv("--dst", "198.51.100.0/33"), code: exitUsage},
	{name: "stats", cmd: "stats", args: argv(), check: func(t *testing.T, m *matrixLab, out string) {
		var s struct {
			Addresses []map[string]json.RawMessage `json:"addresses"`
		}
		decodeJSON(t, "stats", out, &s)
		var addrs []string
		for _, a := range s.Addresses {
			var ad string
			json.Unmarshal(a["address"], &ad)
			addrs = append(addrs, ad)
			for _, f := range []string{"address", "flows", "total_flows", "top_destinations", "port_range", "port_range_size", "ports_in_use", "port_use_ratio", "rule_packets", "rule_bytes", "managed"} {
				if _, ok := a[f]; !ok {
					t.Errorf("stats --json address without %q: %v", f, a)
				}
			}
		}
		slices.Sort(addrs)
		if want := []string{"192.0.2.22", "192.0.2.23", "2001:db8::22"}; !slices.Equal(addrs, want) {
			t.Errorf("stats --json addresses %q, want %q", addrs, want)
		}
	}},
	{name: "stats none", cmd: "stats", fresh: true, args: argv(), check: func(t *testing.T, m *matrixLab, out string) {
		if top := decodeJSON(t, "stats", out, nil); string(top["addresses"]) != "[]" || string(top["pools"]) != "[]" {
			t.Errorf("stats --json without rules: addresses %s, pools %s, want [] and []", top["addresses"], top["pools"])
		}
	}},
	// A textfile in a missing directory is a path that cannot work: bad
	// input, told before anything is read.
	{name: "stats textfile in a missing directory", cmd: "stats", code: exitUsage,
		args: func(m *matrixLab) []string {
			return []string{"--prometheus", filepath.Join(m.dir, "missing", "x.prom")}
		}},
	{name: "verify agrees", cmd: "verify", args: argv("--dst", "203.0.113.7"), check: wantVerify(true, "192.0.2.23")},
	{name: "verify differs", cmd: "verify", code: exitFailure,
		setup: func(t *testing.T, m *matrixLab) {
			foreign(t, m.Lab, 4, "-t", "nat", "-I", "POSTROUTING", "-d", "203.0.113.7", "-j", "SNAT", "--to-source", "192.0.2.22")
		},
		args: argv("--dst", "203.0.113.7"), check: wantVerify(false, "192.0.2.22")},
	{name: "verify no rules", cmd: "verify", fresh: true, args: argv(), check: func(t *testing.T, m *matrixLab, out string) {
		if top := decodeJSON(t, "verify", out, nil); string(top["results"]) != "[]" || string(top["agree"]) != "true" {
			t.Errorf("verify --json without rules: agree %s, results %s; want true and []", top["agree"], top["results"])
		}
	}},
	{name: "verify bad destination", cmd: "verify", args: argv("--dst", "bogus"), code: exitUsage},
}

func wantCheck(inSync bool, kinds ...string) func(t *testing.T, m *matrixLab, out string) {
	return func(t *testing.T, m *matrixLab, out string) {
		var c struct {
			InSync   bool                         `json:"in_sync"`
			Findings []map[string]json.RawMessage `json:"findings"`
		}
		decodeJSON(t, "check", out, &c)
		if c.InSync != inSync || (len(c.Findings) == 0) != inSync || c.Findings == nil {
			t.Errorf("in_sync %v, %d findings; want in_sync %v and findings to match (a list, not null):\n%s", c.InSync, len(c.Findings), inSync, out)
		}
		var got []string
		for _, f := range c.Findings {
			var k string
			json.Unmarshal(f["kind"], &k)
			got = append(got, k)
			if _, ok := f["detail"]; !ok || k == "" {
				t.Errorf("finding without kind or detail: %v", f)
			}
		}
		for _, k := range kinds {
			if !slices.Contains(got, k) {
				t.Errorf("kinds %q, want %q among them", got, k)
			}
		}
	}
}

func wantExplain(effective string, managed bool) func(t *testing.T, m *matrixLab, out string) {
	return func(t *testing.T, m *matrixLab, out string) {
		var e struct {
			Interface string          `json:"interface"`
			Source    string          `json:"source"`
			Effective string          `json:"effective_source"`
			Managed   json.RawMessage `json:"managed"`
		}
		decodeJSON(t, "explain", out, &e)
		if e.Interface != "eth0" || e.Source != "192.0.2.250" || e.Effective != effective || (e.Managed != nil) != managed {
			t.Errorf("interface %q, source %q, effective %q, managed %s; want eth0, 192.0.2.250, %s, a rule: %v", e.Interface, e.Source, e.Effective, e.Managed, effective, managed)
		}
	}
}

func wantVerify(agree bool, leftWith string) func(t *testing.T, m *matrixLab, out string) {
	return func(t *testing.T, m *matrixLab, out string) {
		var v verifyJSON
		decodeJSON(t, "verify", out, &v)
		if v.Agree != agree || len(v.Results) != 1 || v.Results[0].Agree != agree || v.Results[0].Got != leftWith ||
			!slices.Equal(v.Results[0].Promised, []string{"192.0.2.23"}) || (v.Results[0].Cause != "") == agree {
			t.Errorf("verify --json: %+v; want agree %v, left with %s, promised 192.0.2.23, a cause when they differ", v, agree, leftWith)
		}
	}
}

// TestFlagMatrixJSON: every command with --json prints exactly one JSON
// object with its documented fields, on success and when it reports a
// failure (check's drift, verify's mismatch: exit 1); on bad input or a
// runtime error it prints nothing on stdout (the reason is on stderr) and
// changes nothing.
func TestFlagMatrixJSON(t *testing.T) {
	iptablesOnly(t, "its cases steal a destination with an iptables rule ahead of the jump")
	t.Parallel()
	for _, tc := range jsonCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var m *matrixLab
			if tc.fresh {
				m = &matrixLab{Lab: newLab(t), dir: t.TempDir(), cfgDir: t.TempDir()}
				m.cfg = filepath.Join(m.cfgDir, "permanent.yaml")
			} else {
				m = newMatrixLab(t, false)
			}
			writeConfig(t, m.dir, "other.yaml", matrixOther)
			writeConfig(t, m.dir, "bad.yaml", "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\nremove-others: false\n")
			if tc.setup != nil {
				tc.setup(t, m)
			}
			before := m.HostState(t)
			run := append(append([]string{tc.cmd}, tc.args(m)...), "--json")
			what := strings.Join(run, " ")
			r := m.run(t, run...)
			if r.code != tc.code {
				t.Fatalf("%s: exit %d, want %d\n%s%s", what, r.code, tc.code, r.stdout, r.stderr)
			}
			if tc.check == nil {
				runs := []result{r}
				if appFlags()[tc.cmd]["dry-run"] {
					// A dry run fails alike.
					dry := m.run(t, append(run, "--dry-run")...)
					if dry.code != tc.code {
						t.Errorf("%s --dry-run: exit %d, want %d\n%s%s", what, dry.code, tc.code, dry.stdout, dry.stderr)
					}
					runs = append(runs, dry)
				}
				for _, r := range runs {
					if r.stdout != "" || r.stderr == "" {
						t.Errorf("%s failed (exit %d) with stdout:\n%s\nstderr:\n%s\nwant nothing on stdout and the reason on stderr", what, r.code, r.stdout, r.stderr)
					}
				}
				if diff := cmp.Diff(before, m.HostState(t)); diff != "" {
					t.Errorf("%s failed and changed the host (-before +after):\n%s", what, diff)
				}
				return
			}
			decodeJSON(t, what, r.stdout, nil, jsonFields[tc.cmd]...)
			tc.check(t, m, r.stdout)
		})
	}
}

var zeroCounters = regexp.MustCompile(`\[\d+:\d+\]`)

// rootNetnsState is what of the root namespace egress-snat could change:
// the rules of both families in the backend in use (counters zeroed), the
// names of its ipsets, its ip rules and the routes of egress-snat's
// protocol. Reading them is all the test does there.
func rootNetnsState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range [][]string{
		{iptablesCmd(4) + "-save"}, {iptablesCmd(6) + "-save"},
		{"ipset", "list", "-n"},
		{"ip", "-4", "rule"}, {"ip", "-6", "rule"},
		{"ip", "-4", "route", "show", "table", "all", "proto", "83"},
		{"ip", "-6", "route", "show", "table", "all", "proto", "83"},
	} {
		out, err := exec.Command(cmd[0], cmd[1:]...).Output()
		if err != nil {
			t.Fatalf("%s in the root namespace: %v", strings.Join(cmd, " "), err)
		}
		fmt.Fprintf(&b, "# %s\n", strings.Join(cmd, " "))
		for line := range strings.Lines(string(out)) {
			if !strings.HasPrefix(line, "#") {
				b.WriteString(zeroCounters.ReplaceAllString(line, "[0:0]"))
			}
		}
	}
	return b.String()
}

// TestFlagMatrixNetns: apply, check, rotate and watch run from the root
// namespace with --netns (and --dry-run, --json) act in the lab's host
// namespace exactly as inside it, and leave the root namespace and the
// lab's gateway byte for byte as they were.
func TestFlagMatrixNetns(t *testing.T) {
	iptablesOnly(t, "its model of the kernel plays iptables-restore, ipset and ip -batch payloads")
	t.Parallel()
	l := newLab(t)
	dir := t.TempDir()
	file := writeConfig(t, dir, "rules.yaml", matrixBase)
	other := writeConfig(t, dir, "other.yaml", matrixOther)
	root, gw := rootNetnsState(t), gatewayRuleset(t, l)
	ns := func(args ...string) result {
		t.Helper()
		return rootES(t, append([]string{"--netns", l.Host}, args...)...)
	}
	must := func(args ...string) string {
		t.Helper()
		r := ns(args...)
		if r.code != 0 {
			t.Fatalf("--netns %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
		}
		return r.stdout
	}

	// A namespace that does not exist is bad input, named, and nothing
	// runs (check, which only reads, in case it did); --netns after the command's name is refused (it is global),
	// checked inside the lab so that a parser accepting it could only ever
	// write there.
	if r := rootES(t, "--netns", "egress-snat-no-such-ns", "check", "--json"); r.code != exitUsage || r.stdout != "" || !strings.Contains(r.stderr, "egress-snat-no-such-ns") {
		t.Errorf("--netns of no namespace: exit %d, stdout %q, stderr %q; want %d, nothing on stdout, the name on stderr", r.code, r.stdout, r.stderr, exitUsage)
	}
	if r := es(t, l, "apply", "--netns", l.Host, "-f", file); r.code != exitUsage || !strings.Contains(r.stderr, "netns") {
		t.Errorf("apply --netns NAME (after the command): exit %d, stderr %q; want %d naming the flag", r.code, r.stderr, exitUsage)
	}
	if ours := ourLines(l.Ruleset(t)); ours != "" {
		t.Fatalf("refused runs installed:\n%s", ours)
	}

	// apply: a dry run changes nothing there, the real run plans as it did.
	before := l.HostState(t)
	var dry, done planJSON
	decodeJSON(t, "--netns apply --dry-run --json", must("apply", "-f", file, "--dry-run", "--json"), &dry, planFields...)
	if diff := cmp.Diff(before, l.HostState(t)); diff != "" {
		t.Errorf("--netns apply --dry-run changed the lab (-before +after):\n%s", diff)
	}
	if !strings.Contains(must("apply", "-f", file, "--dry-run"), "would add    198.51.100.4/32") {
		t.Errorf("--netns apply --dry-run does not plan the rules")
	}
	kernel := readKernel(t, l)
	decodeJSON(t, "--netns apply --json", must("apply", "-f", file, "--json"), &done, planFields...)
	if diff := cmp.Diff(dry.Steps, done.Steps); diff != "" || !done.Changed {
		t.Errorf("--netns apply --json: changed %v, steps other than the dry run's (-dry +real):\n%s", done.Changed, diff)
	}
	if diff := cmp.Diff(kernel.play(t, dry.Steps).String(), readKernel(t, l).String()); diff != "" {
		t.Errorf("--netns apply: the lab's kernel is not what the steps make of it (-steps +kernel):\n%s", diff)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.23", "198.51.100.5": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::22"})

	// check: in sync, then drift (the other file), still JSON.
	var c struct {
		InSync   bool `json:"in_sync"`
		Findings []struct {
			Kind string `json:"kind"`
		} `json:"findings"`
	}
	decodeJSON(t, "--netns check --json", must("check", "-f", file, "--json"), &c, jsonFields["check"]...)
	if !c.InSync {
		t.Errorf("--netns check -f after apply: %+v, want in sync", c)
	}
	r := ns("check", "-f", other, "--json")
	decodeJSON(t, "--netns check --json (drift)", r.stdout, &c, jsonFields["check"]...)
	if r.code != checkDrift || c.InSync || len(c.Findings) == 0 {
		t.Errorf("--netns check -f OTHER: exit %d, %+v; want %d and findings", r.code, c, checkDrift)
	}

	// rotate: a dry run changes nothing, the real one moves.
	before = l.HostState(t)
	decodeJSON(t, "--netns rotate --dry-run --json", must("rotate", "--pool", "192.0.2.22,192.0.2.23", "--dst", "203.0.113.7", "--dry-run", "--json"), &dry, "moves")
	if diff := cmp.Diff(before, l.HostState(t)); diff != "" {
		t.Errorf("--netns rotate --dry-run changed the lab (-before +after):\n%s", diff)
	}
	decodeJSON(t, "--netns rotate --json", must("rotate", "--pool", "192.0.2.22,192.0.2.23", "--dst", "203.0.113.7", "--json"), &done, "moves")
	if want := []moveJSON{{"203.0.113.7/32", "192.0.2.23", "192.0.2.22"}}; !slices.Equal(dry.Moves, want) || !slices.Equal(done.Moves, want) {
		t.Errorf("--netns rotate: dry run moves %+v, real %+v; want %+v", dry.Moves, done.Moves, want)
	}
	wantSeen(t, l, map[string]string{"203.0.113.7": "192.0.2.22"})

	// watch, started from the root namespace with a short resync: it brings
	// the file back, then repairs a flushed chain.
	w := &relProc{done: make(chan struct{})}
	w.cmd = exec.Command(bin, "--netns", l.Host, "watch", "-f", file, "--resync", "100ms", "--log-format", "json")
	w.cmd.Stdout, w.cmd.Stderr = &w.stdout, &w.stderr
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.err = w.cmd.Wait(); close(w.done) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		w.cmd.Process.Signal(syscall.SIGTERM)
		if code, ok := w.wait(10 * time.Second); !ok || code != 0 {
			t.Errorf("--netns watch after SIGTERM: exit %d (ended %v)\n%s", code, ok, w.stderr.String())
		}
	}
	defer stop()
	inSync := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			r := ns("check", "-f", file)
			if r.code == checkInSync {
				break
			}
			if time.Now().After(deadline) || w.exited() {
				t.Fatalf("--netns watch: not in sync %s within 10s:\n%s%s\nwatch:\n%s", what, r.stdout, r.stderr, w.stderr.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	inSync("after the rotation")
	wantSeen(t, l, map[string]string{"203.0.113.7": "192.0.2.23"})
	synced := l.HostState(t)
	relRestore(t, l, 4, "-F EGRESS-SNAT\n")
	inSync("after the chain was flushed")
	if diff := cmp.Diff(synced, l.HostState(t)); diff != "" {
		t.Errorf("--netns watch repaired the flushed chain into another state (-before +after):\n%s", diff)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.23"})
	stop()
	if !bytes.Contains([]byte(w.stderr.String()), []byte(`"msg":"converged"`)) {
		t.Errorf("--netns watch --log-format json logged no convergence:\n%s", w.stderr.String())
	}
	for line := range strings.Lines(w.stderr.String()) {
		if !json.Valid([]byte(line)) {
			t.Errorf("--netns watch --log-format json: a line is not JSON: %q", line)
		}
	}

	if got := rootNetnsState(t); got != root {
		t.Errorf("--netns runs changed the root namespace (-before +after):\n%s", cmp.Diff(root, got))
	}
	if got := gatewayRuleset(t, l); got != gw {
		t.Errorf("--netns runs changed the lab's gateway (-before +after):\n%s", cmp.Diff(gw, got))
	}
}
