package main

// The command line's help for mistakes and for typing: the nearest command
// or flag on a typo, one form for flags of several values, and completion
// of the values of enum flags. In-process and with the built binary; no
// root needed.

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestTypoSuggestions: a mistyped command, flag or enum value is bad input
// (exit 2) whose message suggests the nearest one; a word close to nothing
// gets no guess.
func TestTypoSuggestions(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
		want []string
		not  []string
	}{
		{"command", []string{"sett"}, []string{`unknown command "sett"`, "did you mean set?"}, nil},
		{"command, letters swapped", []string{"lsit"}, []string{"did you mean list?"}, nil},
		{"command, far from any", []string{"xyzzy"}, []string{`unknown command "xyzzy"`}, []string{"did you mean"}},
		{"flag of a command", []string{"set", "--too", "192.0.2.22"}, []string{"-too", "did you mean --to?", "egress-snat set --help"}, nil},
		{"flag of a command, letter missing", []string{"apply", "--dry-rn", "-f", "x.yaml"}, []string{"did you mean --dry-run?"}, nil},
		{"global flag", []string{"--netsn", "x", "list"}, []string{"did you mean --netns?"}, nil},
		{"global flag after the command", []string{"list", "--lock-timeout", "1s"}, []string{"--lock-timeout is a global flag: give it before the command"}, nil},
		{"one letter: no guess", []string{"apply", "-x"}, []string{"-x"}, []string{"did you mean"}},
		{"enum value", []string{"set", "--to", "192.0.2.22", "--method", "rout"}, []string{`--method "rout": want snat, route or auto`, "did you mean route?"}, nil},
		{"global enum value", []string{"--backend", "nftablse", "list"}, []string{`--backend "nftablse": want auto, nftables, iptables-nft or iptables-legacy`, "did you mean nftables?"}, nil},
		{"enum value far from any", []string{"rotate", "--pool", "192.0.2.22", "--order", "sideways"}, []string{"want next or random"}, []string{"did you mean"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, msg := runRefused(t, tt.args...)
			if code != exitUsage {
				t.Errorf("egress-snat %q: exit %d, want %d (%s)", tt.args, code, exitUsage, msg)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("egress-snat %q: %q, want it to say %q", tt.args, msg, w)
				}
			}
			for _, w := range tt.not {
				if strings.Contains(msg, w) {
					t.Errorf("egress-snat %q: %q, want no %q", tt.args, msg, w)
				}
			}
		})
	}
}

func TestNearest(t *testing.T) {
	names := []string{"set", "unset", "list", "clear", "apply", "confirm"}
	for word, want := range map[string]string{
		"sett": "set", "st": "", "un": "unset", "lits": "list", "aply": "apply", "confrim": "confirm",
		"unsett": "unset", "clean": "clear", "zzz": "", "": "",
	} {
		if got := nearest(word, names); got != want {
			t.Errorf("nearest(%q) = %q, want %q", word, got, want)
		}
	}
}

// enumFlags are the enum flags of the app and its commands, by the command
// that has them ("" for the global ones).
func enumFlags() map[string][]*enumFlag {
	app := newApp()
	out := map[string][]*enumFlag{}
	add := func(cmd string, flags []cli.Flag) {
		for _, fl := range flags {
			if e, ok := fl.(*enumFlag); ok {
				out[cmd] = append(out[cmd], e)
			}
		}
	}
	add("", app.Flags)
	for _, c := range app.Commands {
		add(c.Name, c.Flags)
	}
	return out
}

// TestEnumFlags: the flags that take one of a fixed set are enum flags,
// whose usage text names each value and whose default is one of them.
func TestEnumFlags(t *testing.T) {
	var names []string
	for cmd, flags := range enumFlags() {
		for _, e := range flags {
			names = append(names, strings.TrimSpace(cmd+" --"+e.Name))
			for _, v := range e.values {
				if !strings.Contains(e.Usage, v) {
					t.Errorf("%s --%s: its usage %q does not name the value %s", cmd, e.Name, e.Usage, v)
				}
			}
			if e.Value != "" && !slices.Contains(e.values, e.Value) {
				t.Errorf("%s --%s: the default %q is not one of %v", cmd, e.Name, e.Value, e.values)
			}
		}
	}
	slices.Sort(names)
	want := []string{"--backend", "rotate --order", "set --method", "set --sticky", "verify --proto", "watch --log-format"}
	if !slices.Equal(names, want) {
		t.Errorf("enum flags %v, want %v", names, want)
	}
}

// TestSliceFlagsShowOneForm: set --help shows --to in the one form its text
// uses, comma-separated, not urfave/cli's "--to ADDR [ --to ADDR ]".
func TestSliceFlagsShowOneForm(t *testing.T) {
	app := newApp()
	var out strings.Builder
	app.Writer = &out
	if err := app.Run([]string{"egress-snat", "set", "--help"}); err != nil {
		t.Fatal(err)
	}
	help := out.String()
	if !strings.Contains(help, "--to ADDR[,ADDR...]") || strings.Contains(help, "[ --") {
		t.Errorf("set --help: want --to ADDR[,ADDR...] and no \"[ --to ADDR ]\":\n%s", help)
	}
}

// TestCompletion runs the generated bash completion against the built
// binary: commands, flags, the values of every enum flag (in both --flag
// VALUE and --flag=VALUE forms), no candidate after a flag that takes a
// file (so bash completes file names), and a command's flags after a
// command instead of urfave/cli's help subcommand.
func TestCompletion(t *testing.T) {
	needShell(t, "bash")
	dir := binDir(t)
	script, err := filepath.Abs(filepath.Join("..", "..", "contrib", "completion", "egress-snat.bash"))
	if err != nil {
		t.Fatal(err)
	}
	complete := func(words ...string) []string {
		t.Helper()
		quoted := make([]string, len(words))
		for i, w := range words {
			quoted[i] = "'" + w + "'"
		}
		cmd := exec.Command("bash", "--norc", "-c", `source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _egress_snat; printf '%s\n' "${COMPREPLY[@]}"`, "bash", script)
		cmd.Args = append(cmd.Args, words...)
		cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"))
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("completing %v: %v", quoted, err)
		}
		return strings.Fields(string(out))
	}
	want := func(got []string, words []string, want ...string) {
		t.Helper()
		if !slices.Equal(got, want) {
			t.Errorf("completing %q: %q, want %q", words, got, want)
		}
	}
	for _, w := range [][]string{{"egress-snat", "se"}, {"egress-snat", "set", "--meth"}} {
		got := complete(w...)
		want(got, w, map[string]string{"se": "set", "--meth": "--method"}[w[len(w)-1]])
	}
	for cmd, flags := range enumFlags() {
		for _, e := range flags {
			words := []string{"egress-snat"}
			if cmd != "" {
				words = append(words, cmd)
			}
			w := append(slices.Clone(words), "--"+e.Name, "")
			want(complete(w...), w, e.values...)
			w = append(slices.Clone(words), "--"+e.Name, e.values[1][:1])
			want(complete(w...), w, e.values[1])
			w = append(slices.Clone(words), "--"+e.Name+"="+e.values[0][:1])
			want(complete(w...), w, "--"+e.Name+"="+e.values[0])
		}
	}
	for _, w := range [][]string{{"egress-snat", "apply", "-f", ""}, {"egress-snat", "--config", ""}, {"egress-snat", "stats", "--prometheus", ""}} {
		want(complete(w...), w)
	}
	// ha's subcommands, and a subcommand's flags.
	for w, wants := range map[string][]string{"ha ": {"config", "drain", "undrain", "status"}, "ha st": {"status"}, "ha status --w": {"--window"}} {
		words := append([]string{"egress-snat"}, strings.Split(w, " ")...)
		want(complete(words...), words, wants...)
	}
	w := []string{"egress-snat", "set", "--spread", ""}
	if got := complete(w...); !slices.Contains(got, "--to") || slices.Contains(got, "--spread") || slices.Contains(got, "help") {
		t.Errorf("completing %q: %q, want set's flags but --spread, given already", w, got)
	}
}

// TestHelpTopicSuggestion: "help TOPIC" of a mistyped command suggests the
// nearest, exit 2. (With the built binary: running urfave/cli's help
// command in this process would change it for the tests after.)
func TestHelpTopicSuggestion(t *testing.T) {
	out, err := exec.Command(bin, "help", "sett").CombinedOutput()
	if code := exitOf(err); code != exitUsage || !strings.Contains(string(out), "did you mean set?") {
		t.Errorf("egress-snat help sett: exit %d, %q; want exit %d suggesting set", code, out, exitUsage)
	}
}

// exitOf is the exit status of a finished command's error.
func exitOf(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// needShell returns the path of a shell the completion tests run; without
// it they skip, or fail under CI (scripts/lab.sh test-deps installs it).
func needShell(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s not found (scripts/lab.sh test-deps installs it)", name)
		}
		t.Skipf("%s not found (apt-get install %s)", name, name)
	}
	return path
}

// binDir is a directory holding the built binary as egress-snat, for the
// completion scripts to find in PATH.
func binDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Symlink(bin, filepath.Join(dir, "egress-snat")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestZshAndFishCompletion runs the zsh script (with stand-ins for zsh's
// _describe and _files) and the fish script (complete -C) against the built
// binary: enum values offered, file names after -f and only there.
func TestZshAndFishCompletion(t *testing.T) {
	dir := binDir(t)
	env := append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"))
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	t.Run("zsh", func(t *testing.T) {
		zsh := needShell(t, "zsh")
		script := `_describe() { print -r -- "${(j: :)${(P)2}}" }
_files() { print -r -- "(files)" }
compdef() { : }
source contrib/completion/_egress-snat
words=("$@"); CURRENT=$#; _egress-snat`
		for _, c := range []struct {
			words []string
			want  string
		}{
			{[]string{"egress-snat", "set", "--method", ""}, "snat route auto"},
			{[]string{"egress-snat", "--backend", "n"}, "auto nftables iptables-nft iptables-legacy"},
			{[]string{"egress-snat", "watch", "--log-format", ""}, "text json"},
			{[]string{"egress-snat", "apply", "-f", ""}, "(files)"},
		} {
			cmd := exec.Command(zsh, append([]string{"-f", "-c", script, "zsh"}, c.words...)...)
			cmd.Dir, cmd.Env = root, env
			out, err := cmd.Output()
			if got := strings.TrimSpace(string(out)); err != nil || got != c.want {
				t.Errorf("zsh, completing %q: %q (%v), want %q", c.words, got, err, c.want)
			}
		}
	})
	t.Run("fish", func(t *testing.T) {
		fish := needShell(t, "fish")
		complete := func(line string) []string {
			cmd := exec.Command(fish, "--no-config", "-c", "source contrib/completion/egress-snat.fish; complete -C $argv[1]", line)
			cmd.Dir, cmd.Env = root, env
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("fish, completing %q: %v", line, err)
			}
			var words []string
			for l := range strings.Lines(string(out)) {
				words = append(words, strings.SplitN(strings.TrimSpace(l), "\t", 2)[0])
			}
			slices.Sort(words)
			return words
		}
		for line, want := range map[string][]string{
			"egress-snat set --method ":         {"auto", "route", "snat"},
			"egress-snat rotate --order ":       {"next", "random"},
			"egress-snat verify --proto ":       {"tcp", "udp"},
			"egress-snat apply -f " + dir + "/": {dir + "/egress-snat"},
			"egress-snat set --to " + dir + "/": nil,
		} {
			if got := complete(line); !slices.Equal(got, want) {
				t.Errorf("fish, completing %q: %q, want %q", line, got, want)
			}
		}
	})
}

// TestFishCompletion: the fish script (as committed, which TestDocsUpToDate
// keeps generated) offers the values of every enum flag and file names only
// after flags that take a file.
func TestFishCompletion(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "contrib", "completion", "egress-snat.fish"))
	if err != nil {
		t.Fatal(err)
	}
	fish := string(b)
	for cmd, flags := range enumFlags() {
		for _, e := range flags {
			// The flag's line: -l NAME, its long aliases as more -l, then
			// -r and the values.
			name := " -l " + e.Name + " "
			want := " -r -a '" + strings.Join(e.values, " ") + "' "
			if !slices.ContainsFunc(strings.Split(fish, "\n"), func(l string) bool { return strings.Contains(l, name) && strings.Contains(l, want) }) {
				t.Errorf("fish: %s --%s lacks a line with %q and %q", cmd, e.Name, name, want)
			}
		}
	}
	// The flags that take a file, by name, from their definitions.
	app := newApp()
	files := map[string]bool{}
	for _, flags := range append([][]cli.Flag{app.Flags}, func() (out [][]cli.Flag) {
		for _, c := range app.Commands {
			out = append(out, c.Flags)
			for _, s := range c.Subcommands {
				out = append(out, s.Flags)
			}
		}
		return out
	}()...) {
		for _, fl := range flags {
			if sf, ok := fl.(*cli.StringFlag); ok && sf.TakesFile {
				files[sf.Name] = true
			}
		}
	}
	for _, name := range []string{"file", "config", "prometheus", "health-file"} {
		if !files[name] {
			t.Errorf("--%s takes a file but does not say so (TakesFile)", name)
		}
	}
	for line := range strings.Lines(fish) {
		if !strings.Contains(line, " -l ") {
			continue // a command, not a flag
		}
		isFile := files[strings.Fields(line[strings.Index(line, " -l ")+4:])[0]]
		if noFiles := strings.Contains(line, " -f "); isFile == noFiles && strings.Contains(line, " -r ") {
			t.Errorf("fish: %s: want file names after exactly the flags that take a file", strings.TrimSpace(line))
		}
	}
}

// TestOldEnumValuesSurviveCloning: the app's flags are cloned for each run
// (fresh.go); an enum flag's old values (--backend legacy, nft) must come
// along, or every script using them breaks.
func TestOldEnumValuesSurviveCloning(t *testing.T) {
	for _, fl := range newApp().Flags {
		if e, ok := fl.(*enumFlag); ok && e.Name == "backend" {
			if !slices.Equal(e.old, []string{"nft", "legacy"}) {
				t.Errorf("--backend accepts %q besides its values, want nft and legacy", e.old)
			}
			return
		}
	}
	t.Fatal("no --backend enum flag")
}
