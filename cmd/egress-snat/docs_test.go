package main

import (
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
)

// TestDocsUpToDate regenerates the man page and the completions in memory
// and compares them with the committed copies, so a CLI change cannot ship
// with stale docs.
func TestDocsUpToDate(t *testing.T) {
	files, err := renderDocs()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		committed, err := os.ReadFile(filepath.Join("..", "..", name))
		if err != nil {
			t.Errorf("%s: %v: run make docs", name, err)
			continue
		}
		if d := cmp.Diff(string(committed), files[name]); d != "" {
			t.Errorf("%s is out of date with the CLI: run make docs (-committed +generated):\n%s", name, d)
		}
	}
}

// TestDocsDeterministic: two renders are identical, so make docs is
// re-runnable without spurious diffs.
func TestDocsDeterministic(t *testing.T) {
	a, err := renderDocs()
	if err != nil {
		t.Fatal(err)
	}
	b, err := renderDocs()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(a, b); d != "" {
		t.Errorf("two renders differ:\n%s", d)
	}
}

// normalize makes texts comparable however they were wrapped and
// indented: whitespace runs become one space.
func normalize(s string) string { return strings.Join(strings.Fields(s), " ") }

// renderMan renders the committed man page as a reader sees it (man -l),
// and fails on any warning of groff's.
func renderMan(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("man"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("man not found (.ci/run installs man-db)")
		}
		t.Skip("man not found (apt-get install man-db)")
	}
	cmd := exec.Command("man", "--warnings", "-l", filepath.Join("..", "..", "docs", "man", "egress-snat.8"))
	cmd.Env = append(os.Environ(), "MANWIDTH=100", "LC_ALL=C.UTF-8", "MAN_KEEP_FORMATTING=")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("man -l egress-snat.8: %v\n%s", err, stderr.String())
	}
	return regexp.MustCompile(".\b").ReplaceAllString(string(out), "")
}

// helpSections splits a command's --help into its sections (NAME, USAGE,
// DESCRIPTION, OPTIONS), as text.
func helpSections(t *testing.T, args ...string) map[string]string {
	t.Helper()
	app := newApp()
	var out strings.Builder
	app.Writer = &out
	if err := app.Run(append(append([]string{"egress-snat"}, args...), "--help")); err != nil {
		t.Fatal(err)
	}
	sections := map[string]string{}
	name := ""
	for line := range strings.Lines(out.String()) {
		if h, ok := strings.CutSuffix(strings.TrimSpace(line), ":"); ok && line[0] != ' ' {
			name = h
			continue
		}
		sections[name] += line
	}
	return sections
}

// TestManPageMatchesHelp: the man page, as man renders it, says what --help
// says: for the program and for each command its usage, synopsis,
// description with its examples, and every option line; its FILE FORMAT
// section gives every key the file decoder accepts (config.RuleKeys) with
// its type, meaning and example; and groff has no warning about it. So the
// man page cannot drift from --help or from the file format.
func TestManPageMatchesHelp(t *testing.T) {
	man := normalize(renderMan(t))
	has := func(what, text string) {
		t.Helper()
		if n := normalize(text); !strings.Contains(man, n) {
			t.Errorf("the man page lacks %s: %q", what, n)
		}
	}
	app := newApp()
	app.Setup()
	root := helpSections(t)
	has("the description", strings.TrimSuffix(normalize(root["DESCRIPTION"]), normalize(exitStatusHelp)))
	for line := range strings.Lines(root["GLOBAL OPTIONS"]) {
		has("a global option", line)
	}
	var commands int
	var command func(path []string, c *cli.Command)
	command = func(path []string, c *cli.Command) {
		commands++
		name := strings.Join(path, " ")
		help := helpSections(t, path...)
		has(name+"'s usage", c.Usage)
		has(name+"'s synopsis", help["USAGE"])
		has(name+"'s description", help["DESCRIPTION"])
		for line := range strings.Lines(help["OPTIONS"]) {
			has(name+"'s option", line)
		}
		for _, s := range c.Subcommands {
			if !s.Hidden && s.Name != "help" {
				command(append(slices.Clone(path), s.Name), s)
			}
		}
	}
	for _, c := range visibleCommands(app) {
		command([]string{c.Name}, c)
	}
	if commands < 10 {
		t.Errorf("the man page documents %d commands", commands)
	}
	i := strings.Index(man, "FILE FORMAT The desired-state file")
	if i < 0 {
		t.Fatal("the man page has no FILE FORMAT section")
	}
	for _, k := range config.RuleKeys {
		has("the key "+k.Name, k.Name+" ("+k.Type+") "+k.Meaning+" Example: "+k.Example)
		if !strings.Contains(man[i:], normalize(k.Example)) {
			t.Errorf("FILE FORMAT lacks the key %s", k.Name)
		}
	}
	has("the example file", config.ExampleFile)
	has("the exit statuses", strings.TrimPrefix(exitStatusHelp, "EXIT STATUS:"))
}
