package main

// End-to-end tests: the real binary, run inside a lab's host namespace
// (ip netns exec), with real iptables and ipset, judged by what the far side
// of the lab saw as the source of new connections, not only by the rules.

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/selector"
)

// bin is the egress-snat binary built once by TestMain.
var bin string

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	if slices.Contains(os.Args, "-test.fuzzworker") {
		return m.Run() // a FuzzCLI worker: it runs the app in-process
	}
	dir, err := os.MkdirTemp("", "egress-snat-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// The unprivileged run (TestNeedsCapNetAdmin) must be able to reach it.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = "/usr/local/go/bin/go" // where .ci/run and the README put Go
	}
	// No test may read or write the machine's permanent file.
	os.Setenv("EGRESS_SNAT_CONFIG", filepath.Join(dir, "no-permanent-file.yaml"))
	bin = filepath.Join(dir, "egress-snat")
	if out, err := exec.Command(goCmd, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go build: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// result is one run of the binary.
type result struct {
	stdout, stderr string
	code           int
}

// es runs egress-snat inside l's host namespace.
func es(t *testing.T, l *lab.Lab, args ...string) result {
	t.Helper()
	stdout, stderr, code := l.RunErr(bin, args...)
	if code < 0 {
		t.Fatalf("egress-snat %s: could not run: %s", strings.Join(args, " "), stderr)
	}
	return result{stdout, stderr, code}
}

// mustES runs egress-snat inside l's host namespace and fails the test unless
// it exits 0. It returns stdout.
func mustES(t *testing.T, l *lab.Lab, args ...string) string {
	t.Helper()
	r := es(t, l, args...)
	if r.code != 0 {
		t.Fatalf("egress-snat %s: exit %d, want 0\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// wantRefused runs egress-snat in H and checks it is bad input: exit 2,
// with stderr naming each of want. Whether the host changed is the
// caller's to check, with the state it compares.
func wantRefused(t *testing.T, l *lab.Lab, args, want []string) {
	t.Helper()
	r := es(t, l, args...)
	if r.code != exitUsage {
		t.Errorf("egress-snat %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, exitUsage, r.stdout, r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("egress-snat %s: stderr %q, want it to name %q", strings.Join(args, " "), r.stderr, w)
		}
	}
}

// rootES runs egress-snat in this process's (the root) namespace; only
// meant for runs with --netns.
func rootES(t *testing.T, args ...string) result {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return result{o.String(), e.String(), 0}
	case errors.As(err, &ee):
		return result{o.String(), e.String(), ee.ExitCode()}
	}
	t.Fatalf("egress-snat %s: could not run: %v", strings.Join(args, " "), err)
	return result{}
}

// newLab builds a lab with the far-side probe running.
func newLab(t *testing.T, opts ...lab.Option) *lab.Lab {
	t.Helper()
	l := lab.New(t, opts...)
	l.StartProbe(t)
	return l
}

// wantSeen checks the source the far side sees for new connections to each
// destination.
func wantSeen(t *testing.T, l *lab.Lab, want map[string]string) {
	t.Helper()
	for _, dst := range slices.Sorted(maps.Keys(want)) {
		if got := l.SourceSeen(t, dst); got != want[dst] {
			t.Errorf("new connection to %s: far side saw source %q, want %q", dst, got, want[dst])
		}
	}
}

// backend is the backend the binary uses, as list --json names it:
// "nftables" with EGRESS_SNAT_BACKEND=nftables, else the iptables flavour,
// EGRESS_SNAT_IPTABLES or what plain iptables is, as the binary's auto
// detection decides.
func backend(t *testing.T) string {
	t.Helper()
	if os.Getenv("EGRESS_SNAT_BACKEND") == "nftables" {
		return "nftables"
	}
	if b := os.Getenv("EGRESS_SNAT_IPTABLES"); b != "" {
		return b
	}
	out, err := exec.Command("iptables", "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables --version: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "nf_tables") {
		return "nft"
	}
	return "legacy"
}

// iptablesOnly skips t on the nftables backend, which has none of what t
// proves (why): a jump that others displace, ipsets changed in place, the
// xtables lock, iptables-restore's transaction. The nftables backend's own
// tests prove its counterpart, named in why.
func iptablesOnly(t *testing.T, why string) {
	t.Helper()
	if backend(t) == "nftables" {
		t.Skipf("iptables backends only: %s", why)
	}
}

// iptablesCmd returns the command of the backend in use for family 4 or 6, so
// foreign rules land where the binary and lab.Ruleset look.
func iptablesCmd(family int) string {
	cmd := "iptables"
	if family == 6 {
		cmd = "ip6tables"
	}
	if b := os.Getenv("EGRESS_SNAT_IPTABLES"); b != "" {
		cmd += "-" + b
	}
	return cmd
}

// foreign adds a rule the way another tool (Docker, firewalld) would.
func foreign(t *testing.T, l *lab.Lab, family int, args ...string) {
	t.Helper()
	l.Run(t, iptablesCmd(family), append([]string{"-w", "5"}, args...)...)
}

// addForeignRules installs a typical mix of other tools' rules in the nat
// and filter tables of both families.
func addForeignRules(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, r := range []struct {
		family int
		args   string
	}{
		{4, "-t nat -A POSTROUTING -s 10.66.0.0/16 ! -o eth0 -j MASQUERADE"},
		{4, "-t nat -N DOCKER"},
		{4, "-t nat -A DOCKER -i docker0 -j RETURN"},
		{4, "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"},
		{4, "-t nat -A POSTROUTING -d 10.99.0.0/16 -j DOCKER"},
		{4, "-t filter -A INPUT -p tcp --dport 22 -j ACCEPT"},
		{4, "-t filter -A FORWARD -s 10.66.0.0/16 -j ACCEPT"},
		{6, "-t nat -A POSTROUTING -s fd66::/64 ! -o eth0 -j MASQUERADE"},
		{6, "-t filter -A INPUT -p tcp --dport 22 -j ACCEPT"},
	} {
		foreign(t, l, r.family, strings.Fields(r.args)...)
	}
	// A comment with blanks must survive the restore round trip as well.
	foreign(t, l, 4, "-t", "filter", "-A", "FORWARD", "-m", "comment", "--comment", "foreign tool: keep me", "-j", "ACCEPT")
}

// isOurs tells egress-snat's lines of a lab.Ruleset: its chain, jump, rules
// and ipsets all carry the name.
func isOurs(line string) bool {
	return strings.Contains(strings.ToLower(line), "egress-snat")
}

// notOurs returns the lines of a lab.Ruleset that egress-snat does not own
// (its nftables table, which lab.Ruleset lists last, is ours whole).
func notOurs(ruleset string) string {
	var b strings.Builder
	for line := range strings.Lines(ruleset) {
		if strings.HasPrefix(line, "table inet "+nft.TableName+" ") {
			break
		}
		if !isOurs(line) {
			b.WriteString(line)
		}
	}
	return b.String()
}

// ourLines returns the lines of a lab.Ruleset that egress-snat owns.
func ourLines(ruleset string) string {
	var b strings.Builder
	inTable := false
	for line := range strings.Lines(ruleset) {
		inTable = inTable || strings.HasPrefix(line, "table inet "+nft.TableName+" ")
		if inTable || isOurs(line) {
			b.WriteString(line)
		}
	}
	return b.String()
}

const jumpRule = "-A POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT"

// natTable is what a lab.Ruleset says about one family's nat table.
type natTable struct {
	ours             bool   // our chain is declared in it
	firstPostrouting string // its first POSTROUTING rule, "" if none
}

// natTables returns the nat tables of a lab.Ruleset, IPv4's first.
func natTables(ruleset string) []natTable {
	var tables []natTable
	var cur *natTable
	for line := range strings.Lines(ruleset) {
		line = strings.TrimSpace(line)
		switch {
		case line == "*nat":
			tables = append(tables, natTable{})
			cur = &tables[len(tables)-1]
		case strings.HasPrefix(line, "*") || line == "COMMIT":
			cur = nil
		case cur == nil:
		case line == ":EGRESS-SNAT - [0:0]":
			cur.ours = true
		case cur.firstPostrouting == "" && strings.HasPrefix(line, "-A POSTROUTING "):
			cur.firstPostrouting = line
		}
	}
	return tables
}

// wantJumpFirst checks that the given number of nat tables (1 or 2
// families) hold our chain, and that in each our jump is the first
// POSTROUTING rule. On the nftables backend, which has no jump, it checks
// that our table holds rules of that many families.
func wantJumpFirst(t *testing.T, ruleset string, families int) {
	t.Helper()
	if strings.Contains(ruleset, "table inet "+nft.TableName) {
		n := 0
		for _, fam := range []string{" ip ", " ip6 "} {
			if slices.ContainsFunc(chainRules(ruleset), func(r string) bool { return strings.Contains(r, fam) }) {
				n++
			}
		}
		if n != families {
			t.Errorf("our nftables table holds rules of %d families, want %d\nruleset:\n%s", n, families, ruleset)
		}
		return
	}
	n := 0
	for _, nt := range natTables(ruleset) {
		if !nt.ours {
			continue
		}
		n++
		if nt.firstPostrouting != jumpRule {
			t.Errorf("first POSTROUTING rule = %q, want %q\nruleset:\n%s", nt.firstPostrouting, jumpRule, ruleset)
		}
	}
	if n != families {
		t.Errorf("%d nat tables hold the %s chain, want %d\nruleset:\n%s", n, "EGRESS-SNAT", families, ruleset)
	}
}

// emptyNat is what iptables-legacy-save prints for a nat table that has
// been loaded but holds nothing.
const emptyNat = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"

func TestSetArticleCases(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		args []string
		want map[string]string // destination -> source the far side sees
	}{
		{
			name: "same subnet: on-link destination",
			args: []string{"--to", "192.0.2.23", "--dst", "192.0.2.1"},
			want: map[string]string{"192.0.2.1": "192.0.2.23", "198.51.100.4": "192.0.2.250"},
		},
		{
			name: "different subnet: remote host via the gateway",
			args: []string{"--to", "192.0.2.22", "--dst", "198.51.100.4"},
			want: map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.250", "192.0.2.1": "192.0.2.250"},
		},
		{
			name: "remote prefix",
			args: []string{"--to", "192.0.2.22", "--dst", "198.51.100.0/24"},
			want: map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.22", "203.0.113.7": "192.0.2.250"},
		},
		{
			name: "address of another subnet on the same interface",
			args: []string{"--to", "198.18.0.10", "--dst", "198.51.100.4"},
			want: map[string]string{"198.51.100.4": "198.18.0.10", "203.0.113.7": "192.0.2.250"},
		},
		{
			name: "IPv6",
			args: []string{"--to", "2001:db8::22", "--dst", "2001:db8:ffff::4"},
			want: map[string]string{"2001:db8:ffff::4": "2001:db8::22", "2001:db8::1": "2001:db8::250", "198.51.100.4": "192.0.2.250"},
		},
		{
			name: "IPv6 everything",
			args: []string{"--to", "2001:db8::23"},
			want: map[string]string{"2001:db8:ffff::4": "2001:db8::23", "2001:db8::1": "2001:db8::23", "198.51.100.4": "192.0.2.250"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t)
			natural := map[string]string{}
			for dst := range tt.want {
				natural[dst] = "192.0.2.250"
				if strings.Contains(dst, ":") {
					natural[dst] = "2001:db8::250"
				}
			}
			wantSeen(t, l, natural)
			out := mustES(t, l, append([]string{"set"}, tt.args...)...)
			if !strings.HasPrefix(out, "add ") {
				t.Errorf("set %v printed %q, want an \"add\" line", tt.args, out)
			}
			wantSeen(t, l, tt.want)
			wantJumpFirst(t, l.Ruleset(t), 1)
		})
	}
}

// TestMostSpecificWins: "set --to A" for everything and "set --to B --dst D"
// send D from B and the rest from A, whichever was set first.
func TestMostSpecificWins(t *testing.T) {
	t.Parallel()
	everything := []string{"set", "--to", "192.0.2.22"}
	one := []string{"set", "--to", "192.0.2.23", "--dst", "198.51.100.4"}
	for _, tt := range []struct {
		name  string
		order [][]string
	}{
		{"everything first", [][]string{everything, one}},
		{"one destination first", [][]string{one, everything}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t)
			for _, args := range tt.order {
				mustES(t, l, args...)
			}
			wantSeen(t, l, map[string]string{
				"198.51.100.4": "192.0.2.23",
				"198.51.100.5": "192.0.2.22",
				"203.0.113.7":  "192.0.2.22",
			})
			wantJumpFirst(t, l.Ruleset(t), 1)
			mustES(t, l, "unset", "--dst", "198.51.100.4")
			wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.22"})
		})
	}
}

func TestNaturalSource(t *testing.T) {
	t.Parallel()
	t.Run("alone needs no rule", func(t *testing.T) {
		t.Parallel()
		l := newLab(t)
		before := l.Ruleset(t)
		for _, args := range [][]string{
			{"--to", "192.0.2.250", "--dst", "198.51.100.4"},
			{"--to", "192.0.2.250"},
			{"--to", "198.18.0.10", "--dst", "198.18.0.1"},
			{"--to", "2001:db8::250", "--dst", "2001:db8:ffff::4"},
		} {
			out := mustES(t, l, append([]string{"set"}, args...)...)
			if !strings.Contains(out, "no rule needed") {
				t.Errorf("set %v printed %q, want it to say no rule is needed", args, out)
			}
			if after := l.Ruleset(t); after != before {
				t.Errorf("set %v changed the ruleset:\n%s", args, cmp.Diff(before, after))
			}
		}
		if out := mustES(t, l, "list"); !strings.Contains(out, "no egress-snat rules") {
			t.Errorf("list printed %q, want no rules", out)
		}
		wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})
	})
	t.Run("under a broader rule", func(t *testing.T) {
		t.Parallel()
		l := newLab(t)
		mustES(t, l, "set", "--to", "192.0.2.23")
		out := mustES(t, l, "set", "--to", "192.0.2.250", "--dst", "198.51.100.4")
		if strings.Contains(out, "no rule needed") {
			t.Errorf("set of the natural source under a broader rule printed %q, want a rule added", out)
		}
		wantSeen(t, l, map[string]string{
			"198.51.100.4": "192.0.2.250",
			"198.51.100.5": "192.0.2.23",
			"203.0.113.7":  "192.0.2.23",
		})
	})
}

// TestBoundApplicationKeepsItsSource: rules match the natural source only,
// so a socket bound to another address keeps it.
func TestBoundApplicationKeepsItsSource(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.23")
	mustES(t, l, "set", "--to", "2001:db8::23")
	for _, tt := range []struct{ dst, bind, want string }{
		{"198.51.100.4", "192.0.2.22", "192.0.2.22"},
		{"198.51.100.4", "", "192.0.2.23"},
		{"2001:db8:ffff::4", "2001:db8::22", "2001:db8::22"},
		{"2001:db8:ffff::4", "", "2001:db8::23"},
	} {
		if got := l.SourceSeenFrom(t, tt.dst, tt.bind); got != tt.want {
			t.Errorf("connection to %s bound to %q: far side saw %q, want %q", tt.dst, tt.bind, got, tt.want)
		}
	}
}

func TestIdempotent(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	for _, args := range [][]string{
		{"set", "--to", "192.0.2.23", "--dst", "198.51.100.4"},
		{"set", "--to", "192.0.2.22"},
		{"set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::/48"},
	} {
		mustES(t, l, args...)
		first := l.Ruleset(t)
		out := mustES(t, l, args...)
		if !strings.Contains(out, "nothing to change") {
			t.Errorf("repeated %v printed %q, want \"nothing to change\"", args, out)
		}
		if again := l.Ruleset(t); again != first {
			t.Errorf("repeated %v changed the ruleset (-first +again):\n%s", args, cmp.Diff(first, again))
		}
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23", "203.0.113.7": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22"})

	for i := range 2 {
		out := mustES(t, l, "unset", "--dst", "198.51.100.4")
		if i == 1 && !strings.Contains(out, "has no rule") {
			t.Errorf("second unset printed %q, want \"has no rule\"", out)
		}
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})

	// Exact restoration is TestClearRestoresRuleset's; here: clear twice.
	mustES(t, l, "clear")
	cleared := l.Ruleset(t)
	if ours := ourLines(cleared); ours != "" {
		t.Errorf("after clear, the ruleset still has:\n%s", ours)
	}
	if out := mustES(t, l, "clear"); !strings.Contains(out, "nothing to change") {
		t.Errorf("second clear printed %q, want \"nothing to change\"", out)
	}
	if again := l.Ruleset(t); again != cleared {
		t.Errorf("second clear changed the ruleset (-first +second):\n%s", cmp.Diff(cleared, again))
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"})
}

func TestForeignRulesSurvive(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	addForeignRules(t, l)
	foreignBefore := notOurs(l.Ruleset(t))

	mustES(t, l, "set", "--to", "192.0.2.23")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "2001:db8::22")
	rs := l.Ruleset(t)
	if diff := cmp.Diff(foreignBefore, notOurs(rs)); diff != "" {
		t.Errorf("foreign rules changed by set (-before +after):\n%s", diff)
	}
	wantJumpFirst(t, rs, 2)
	seen := map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22"}
	wantSeen(t, l, seen)

	// Another tool now inserts a catch-all MASQUERADE ahead of our jump:
	// it wins, and new connections leave with the interface's address.
	// The nftables backend's chain comes before iptables' nat POSTROUTING
	// whatever its order: ours still win, and nothing needs a repair.
	foreign(t, l, 4, "-t", "nat", "-I", "POSTROUTING", "1", "-o", "eth0", "-j", "MASQUERADE")
	foreign(t, l, 6, "-t", "nat", "-I", "POSTROUTING", "1", "-o", "eth0", "-j", "MASQUERADE")
	nftables := backend(t) == "nftables"
	if nftables {
		wantSeen(t, l, seen)
	} else {
		wantSeen(t, l, map[string]string{"203.0.113.7": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"})
	}
	foreignInserted := notOurs(l.Ruleset(t))

	// The next set, even one that changes no entry, puts our jump first again
	// in both families and leaves the foreign rules as they are.
	out := mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	if repaired := !strings.Contains(out, "nothing to change"); repaired == nftables {
		t.Errorf("set after a foreign insert printed %q: want a repair on iptables, none on nftables", out)
	}
	rs = l.Ruleset(t)
	wantJumpFirst(t, rs, 2)
	if diff := cmp.Diff(foreignInserted, notOurs(rs)); diff != "" {
		t.Errorf("foreign rules changed by the repairing set (-before +after):\n%s", diff)
	}
	wantSeen(t, l, seen)

	mustES(t, l, "unset", "--dst", "198.51.100.4")
	if diff := cmp.Diff(foreignInserted, notOurs(l.Ruleset(t))); diff != "" {
		t.Errorf("foreign rules changed by unset (-before +after):\n%s", diff)
	}
	mustES(t, l, "clear")
	if diff := cmp.Diff(foreignInserted, l.Ruleset(t)); diff != "" {
		t.Errorf("after clear, ruleset differs from the foreign rules alone (-want +got):\n%s", diff)
	}
}

func TestClearRestoresRuleset(t *testing.T) {
	iptablesOnly(t, "it expects an ipset for nine destinations")
	t.Parallel()
	// Nine destinations sharing a source go into an ipset, which clear must
	// destroy too; 203.0.113.7 is one of them.
	var many []string
	for i := 1; i <= 9; i++ {
		many = append(many, "--dst", fmt.Sprintf("203.0.113.%d", i))
	}
	for _, tt := range []struct {
		name    string
		foreign bool
	}{
		{"pristine host", false},
		{"host with foreign rules", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t)
			if tt.foreign {
				addForeignRules(t, l)
			}
			before := l.Ruleset(t)

			mustES(t, l, "set", "--to", "192.0.2.23")
			mustES(t, l, "set", "--to", "192.0.2.250", "--dst", "198.51.100.5")
			mustES(t, l, append([]string{"set", "--to", "192.0.2.22"}, many...)...)
			mustES(t, l, "set", "--to", "2001:db8::22")
			rs := l.Ruleset(t)
			if !strings.Contains(rs, "create egress-snat4-") {
				t.Errorf("9 destinations with one source: want an ipset, ruleset:\n%s", rs)
			}
			wantSeen(t, l, map[string]string{
				"203.0.113.7":      "192.0.2.22",
				"198.51.100.4":     "192.0.2.23",
				"198.51.100.5":     "192.0.2.250",
				"2001:db8:ffff::4": "2001:db8::22",
			})

			out := mustES(t, l, "clear")
			if !strings.Contains(out, "remove ") {
				t.Errorf("clear printed %q, want \"remove\" lines", out)
			}
			want := before
			if backend(t) == "legacy" && before == "" {
				// The legacy backend cannot unload a table from a namespace:
				// the nat tables egress-snat loaded stay, empty.
				want = emptyNat + emptyNat
				t.Logf("legacy backend: clear leaves empty nat tables on a namespace that had none")
			}
			if diff := cmp.Diff(want, l.Ruleset(t)); diff != "" {
				t.Errorf("ruleset after clear (-want +got):\n%s", diff)
			}
			wantSeen(t, l, map[string]string{"203.0.113.7": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"})
		})
	}
}

func TestBadInput(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondNIC())
	addForeignRules(t, l)
	mustES(t, l, "set", "--to", "192.0.2.23")
	mustES(t, l, "set", "--to", "2001:db8::23", "--dst", "2001:db8:ffff::4")
	before := l.Ruleset(t)

	tests := []struct {
		name string
		args []string
		want []string // stderr must name each
	}{
		{"--to not on the host", []string{"set", "--to", "192.0.2.99"}, []string{"192.0.2.99"}},
		{"--to not on the host, one destination", []string{"set", "--to", "192.0.2.99", "--dst", "198.51.100.4"}, []string{"192.0.2.99"}},
		{"--to on another interface", []string{"set", "--to", "203.0.113.130", "--dst", "198.51.100.4"}, []string{"203.0.113.130", "eth1", "eth0"}},
		{"--to of the other family", []string{"set", "--to", "2001:db8::22", "--dst", "198.51.100.4"}, []string{"2001:db8::22", "198.51.100.4"}},
		{"--dst of the other family", []string{"set", "--to", "192.0.2.22", "--dst", "2001:db8:ffff::4"}, []string{"192.0.2.22", "2001:db8:ffff::4"}},
		{"prefix length too long", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.0/33"}, []string{"198.51.100.0/33"}},
		{"--dst not an address", []string{"set", "--to", "192.0.2.22", "--dst", "nonsense"}, []string{"nonsense"}},
		{"--dst host bits set", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.1/24"}, []string{"198.51.100.1/24", "198.51.100.0/24"}},
		{"unknown --out", []string{"set", "--to", "192.0.2.22", "--out", "nope0"}, []string{"nope0"}},
		// The kernel has no route to it by eth1; the message names the
		// destination ("no route") but not eth1 (reported to the lead).
		{"--out not taken by the destination", []string{"set", "--to", "203.0.113.130", "--dst", "198.51.100.4", "--out", "eth1"}, []string{"198.51.100.4"}},
		{"unknown flag", []string{"set", "--to", "192.0.2.22", "--bogus"}, []string{"bogus"}},
		{"several --to without --spread", []string{"set", "--to", "192.0.2.22,192.0.2.23"}, []string{"192.0.2.22", "192.0.2.23", "--spread"}},
		{"repeated --to without --spread", []string{"set", "--to", "192.0.2.22", "--to", "192.0.2.23"}, []string{"192.0.2.22", "192.0.2.23", "--spread"}},
		{"--spread over both families", []string{"set", "--spread", "--to", "192.0.2.22,2001:db8::22"}, []string{"192.0.2.22", "2001:db8::22"}},
		{"--to not an address", []string{"set", "--to", "192.0.2.300"}, []string{"192.0.2.300"}},
		{"--to unspecified", []string{"set", "--to", "0.0.0.0"}, []string{"0.0.0.0"}},
		{"--to missing", []string{"set", "--dst", "198.51.100.4"}, []string{"--to is required"}},
		{"unset invalid prefix", []string{"unset", "--dst", "198.51.100.0/33"}, []string{"198.51.100.0/33"}},
		{"explain not an address", []string{"explain", "--dst", "nonsense"}, []string{"nonsense"}},
		{"explain unknown --out", []string{"explain", "--dst", "198.51.100.4", "--out", "nope0"}, []string{"nope0"}},
		{"unknown command", []string{"frobnicate"}, []string{"frobnicate"}},
		{"unknown global flag", []string{"--bogus", "list"}, []string{"bogus"}},
		{"unknown backend", []string{"--iptables-backend", "bogus", "list"}, []string{"bogus"}},
		{"unknown --netns", []string{"--netns", "nope-ns", "list"}, []string{"nope-ns"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantRefused(t, l, tt.args, tt.want)
			if after := l.Ruleset(t); after != before {
				t.Errorf("egress-snat %s changed the ruleset (-before +after):\n%s", strings.Join(tt.args, " "), cmp.Diff(before, after))
			}
		})
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::23"})
}

// listJSON is the part of `list --json` scripts rely on, spelled out here
// rather than borrowed from list.go so that the wire format is what is tested.
type listJSON struct {
	Backend  string        `json:"backend"`
	Rules    []listJSONRow `json:"rules"`
	Warnings []string      `json:"warnings"`
}

type listJSONRow struct {
	Dst       string   `json:"dst"`
	Out       string   `json:"out"`
	Natural   string   `json:"natural"`
	Family    string   `json:"family"`
	To        []string `json:"to"`
	ToPresent bool     `json:"to_present"`
}

func parseList(t *testing.T, out string) listJSON {
	t.Helper()
	var got listJSON
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("list --json: %v\n%s", err, out)
	}
	return got
}

func TestListJSON(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "192.0.2.250", "--dst", "198.51.100.5")
	mustES(t, l, "set", "--to", "2001:db8::22")

	want := []listJSONRow{
		{"198.51.100.4/32", "eth0", "192.0.2.250", "ipv4", []string{"192.0.2.23"}, true},
		{"198.51.100.5/32", "eth0", "192.0.2.250", "ipv4", nil, true},
		{"0.0.0.0/0", "eth0", "192.0.2.250", "ipv4", []string{"192.0.2.22"}, true},
		{"::/0", "eth0", "2001:db8::250", "ipv6", []string{"2001:db8::22"}, true},
	}
	got := parseList(t, mustES(t, l, "list", "--json"))
	if diff := cmp.Diff(want, got.Rules); diff != "" {
		t.Errorf("list --json rules (-want +got):\n%s", diff)
	}
	if got.Backend != backend(t) {
		t.Errorf("list --json backend = %q, want %q", got.Backend, backend(t))
	}
	if got.Warnings == nil || len(got.Warnings) != 0 {
		t.Errorf("list --json warnings = %#v, want []", got.Warnings)
	}

	// The source address disappears from the host: list must say so.
	l.HostAddrDel(t, "192.0.2.23/24", "eth0")
	want[0].ToPresent = false
	if diff := cmp.Diff(want, parseList(t, mustES(t, l, "list", "--json")).Rules); diff != "" {
		t.Errorf("list --json after removing 192.0.2.23 (-want +got):\n%s", diff)
	}
	text := mustES(t, l, "list")
	for line := range strings.Lines(text) {
		if strings.HasPrefix(line, "198.51.100.4/32") && !strings.Contains(line, "NO") {
			t.Errorf("list row %q: want it to say the source is not on the host", line)
		}
	}
}

// explainJSON is the part of `explain --json` scripts rely on.
type explainJSON struct {
	Dst       string `json:"dst"`
	Probe     string `json:"probe"`
	Route     string `json:"route"`
	Gateway   string `json:"gateway"`
	Interface string `json:"interface"`
	Source    string `json:"source"`
	Reason    string `json:"reason"`
	Why       string `json:"why"`
	Managed   *struct {
		Dst string   `json:"dst"`
		To  []string `json:"to"`
	} `json:"managed"`
	Effective string `json:"effective_source"`
}

func explain(t *testing.T, l *lab.Lab, dst string) explainJSON {
	t.Helper()
	out := mustES(t, l, "explain", "--json", "--dst", dst)
	var got explainJSON
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("explain --json --dst %s: %v\n%s", dst, err, out)
	}
	return got
}

func TestExplain(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	tests := []struct {
		dst    string
		want   []string // lines of the text output
		reason selector.Reason
	}{
		{"198.51.100.4", []string{
			"route          default via 192.0.2.1 dev eth0 table main",
			"natural source 192.0.2.250",
			"why            " + selector.ReasonSameSubnet.Describe(),
			"egress-snat    no rule applies: new connections leave with 192.0.2.250",
		}, selector.ReasonSameSubnet},
		{"192.0.2.1", []string{
			"route          192.0.2.0/24 dev eth0 table main",
			"natural source 192.0.2.250",
			"why            " + selector.ReasonConnected.Describe(),
		}, selector.ReasonConnected},
		{"198.18.0.1", []string{"natural source 198.18.0.10"}, selector.ReasonConnected},
		{"198.51.100.0/24", []string{"looked up as   198.51.100.", "natural source 192.0.2.250"}, selector.ReasonSameSubnet},
		{"2001:db8:ffff::4", []string{
			"route          default via 2001:db8::1 dev eth0 table main",
			"natural source 2001:db8::250",
			"why            " + selector.ReasonIPv6.Describe(),
		}, selector.ReasonIPv6},
	}
	for _, tt := range tests {
		out := mustES(t, l, "explain", "--dst", tt.dst)
		for _, w := range tt.want {
			if !strings.Contains(out, w) {
				t.Errorf("explain --dst %s: want a line with %q, got:\n%s", tt.dst, w, out)
			}
		}
		if got := explain(t, l, tt.dst); got.Reason != string(tt.reason) || got.Why != tt.reason.Describe() {
			t.Errorf("explain --json --dst %s: reason %q why %q, want %q %q", tt.dst, got.Reason, got.Why, tt.reason, tt.reason.Describe())
		}
	}

	got := explain(t, l, "198.51.100.4")
	want := explainJSON{
		Dst: "198.51.100.4/32", Probe: "198.51.100.4", Route: "0.0.0.0/0", Gateway: "192.0.2.1",
		Interface: "eth0", Source: "192.0.2.250", Reason: string(selector.ReasonSameSubnet),
		Why: selector.ReasonSameSubnet.Describe(), Effective: "192.0.2.250",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("explain --json --dst 198.51.100.4 (-want +got):\n%s", diff)
	}

	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.4")
	out := mustES(t, l, "explain", "--dst", "198.51.100.4")
	if w := "egress-snat    rule for 198.51.100.4/32: new connections leave with 192.0.2.23"; !strings.Contains(out, w) {
		t.Errorf("explain after set: want %q, got:\n%s", w, out)
	}
	got = explain(t, l, "198.51.100.4")
	if got.Managed == nil || got.Managed.Dst != "198.51.100.4/32" || !cmp.Equal(got.Managed.To, []string{"192.0.2.23"}) || got.Effective != "192.0.2.23" {
		t.Errorf("explain --json after set: managed %+v effective %q, want rule 198.51.100.4/32 -> 192.0.2.23", got.Managed, got.Effective)
	}
}

// TestExplainPredictsFarSide: explain's effective source is what the far
// side really sees, for every kind of rule.
func TestExplainPredictsFarSide(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22")
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "192.0.2.250", "--dst", "198.51.100.5")
	mustES(t, l, "set", "--to", "2001:db8::23", "--dst", "2001:db8:ffff::/48")
	for _, dst := range []string{"198.51.100.4", "198.51.100.5", "203.0.113.7", "192.0.2.1", "198.18.0.1", "2001:db8:ffff::4", "2001:db8::1"} {
		predicted := explain(t, l, dst).Effective
		if seen := l.SourceSeen(t, dst); seen != predicted {
			t.Errorf("%s: explain predicts source %s, far side saw %q", dst, predicted, seen)
		}
	}
}

// rootSave returns the egress-snat lines of the root namespace's rules. It
// only reads.
func rootSave(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, f := range []int{4, 6} {
		save := iptablesCmd(f) + "-save"
		out, err := exec.Command(save).Output()
		if err != nil {
			t.Fatalf("%s: %v", save, err)
		}
		b.WriteString(ourLines(string(out)))
	}
	return b.String()
}

// TestNetnsFlag runs the binary from the root namespace with --netns.
func TestNetnsFlag(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	rootBefore := rootSave(t)
	gwBefore := gatewayRuleset(t, l)

	r := rootES(t, "--netns", l.Host, "list", "--json")
	if r.code != 0 {
		t.Fatalf("--netns %s list: exit %d\n%s", l.Host, r.code, r.stderr)
	}
	if got := parseList(t, r.stdout); len(got.Rules) != 0 {
		t.Errorf("--netns list in a fresh lab: rules %+v, want none", got.Rules)
	}
	r = rootES(t, "--netns", l.Host, "explain", "--dst", "198.51.100.4")
	if r.code != 0 || !strings.Contains(r.stdout, "natural source 192.0.2.250") || !strings.Contains(r.stdout, "dev eth0") {
		t.Errorf("--netns explain: exit %d, want the lab's route:\n%s%s", r.code, r.stdout, r.stderr)
	}

	r = rootES(t, "--netns="+l.Host, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	if r.code != 0 {
		t.Fatalf("--netns= set: exit %d\n%s", r.code, r.stderr)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.250"})
	if got := parseList(t, mustES(t, l, "list", "--json")); len(got.Rules) != 1 || got.Rules[0].Dst != "198.51.100.4/32" {
		t.Errorf("list inside the lab after --netns set: %+v, want the one rule", got.Rules)
	}
	if got := rootSave(t); got != rootBefore {
		t.Errorf("--netns set changed the root namespace's egress-snat rules:\n%s", cmp.Diff(rootBefore, got))
	}
	if got := gatewayRuleset(t, l); got != gwBefore {
		t.Errorf("--netns set changed the gateway namespace:\n%s", cmp.Diff(gwBefore, got))
	}

	r = rootES(t, "--netns", l.Host, "clear")
	if r.code != 0 {
		t.Fatalf("--netns clear: exit %d\n%s", r.code, r.stderr)
	}
	if ours := ourLines(l.Ruleset(t)); ours != "" {
		t.Errorf("after --netns clear the lab still has:\n%s", ours)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})
}

// gatewayRuleset reads the rules of the lab's gateway namespace.
func gatewayRuleset(t *testing.T, l *lab.Lab) string {
	t.Helper()
	var b strings.Builder
	for _, f := range []int{4, 6} {
		save := iptablesCmd(f) + "-save"
		out, err := exec.Command("ip", "netns", "exec", l.Gateway, save).Output()
		if err != nil {
			t.Fatalf("%s in %s: %v", save, l.Gateway, err)
		}
		for line := range strings.Lines(string(out)) {
			if !strings.HasPrefix(line, "#") {
				b.WriteString(line)
			}
		}
	}
	return b.String()
}

func TestNeedsCapNetAdmin(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.23")
	before := l.Ruleset(t)

	// Each way of dropping the capability turns egress-snat's arguments
	// into a command line run inside the lab's host namespace.
	type dropper struct {
		name string
		argv func(args ...string) []string
	}
	var drops []dropper
	if _, err := exec.LookPath("setpriv"); err == nil {
		drops = []dropper{
			{"nobody", func(args ...string) []string {
				return append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", bin}, args...)
			}},
			{"root without CAP_NET_ADMIN", func(args ...string) []string {
				return append([]string{"setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", bin}, args...)
			}},
		}
	} else if _, err := exec.LookPath("capsh"); err == nil {
		drops = []dropper{
			{"nobody", func(args ...string) []string {
				return []string{"capsh", "--user=nobody", "--", "-c", bin + " " + strings.Join(args, " ")}
			}},
			{"root without CAP_NET_ADMIN", func(args ...string) []string {
				return []string{"capsh", "--drop=cap_net_admin", "--", "-c", bin + " " + strings.Join(args, " ")}
			}},
		}
	} else {
		t.Skip("neither setpriv nor capsh is installed")
	}
	for _, d := range drops {
		for _, cmd := range [][]string{{"list"}, {"set", "--to", "192.0.2.22"}, {"clear"}} {
			argv := d.argv(cmd...)
			stdout, stderr, code := l.RunErr(argv[0], argv[1:]...)
			if code != exitFailure {
				t.Errorf("%s: egress-snat %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", d.name, strings.Join(cmd, " "), code, exitFailure, stdout, stderr)
			}
			if !strings.Contains(stderr, "root or CAP_NET_ADMIN") {
				t.Errorf("%s: egress-snat %s: stderr %q, want it to say it needs root or CAP_NET_ADMIN", d.name, strings.Join(cmd, " "), stderr)
			}
		}
	}
	if after := l.Ruleset(t); after != before {
		t.Errorf("unprivileged runs changed the ruleset:\n%s", cmp.Diff(before, after))
	}
}
