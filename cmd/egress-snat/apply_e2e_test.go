package main

// End-to-end tests of `apply -f FILE`: the desired-state file is the whole
// truth. Each test builds its own lab and judges the result twice: by the
// ruleset's shape (rules in EGRESS-SNAT, ipsets in the host namespace) and
// by the source the far side sees.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/snat"
)

// writeConfig writes files (name -> content) into a fresh directory and
// returns the path of the first name given in order, the config file.
func writeConfig(t *testing.T, dir string, files ...string) string {
	t.Helper()
	if len(files)%2 != 0 {
		t.Fatalf("writeConfig: want name, content pairs, got %d strings", len(files))
	}
	for i := 0; i < len(files); i += 2 {
		if err := os.WriteFile(filepath.Join(dir, files[i]), []byte(files[i+1]), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, files[0])
}

// chainRules returns the rules of our chain in a lab.Ruleset, both
// families: the EGRESS-SNAT chain's, or the nftables backend's nat chain's
// but for the keeper, which every such chain ends with.
func chainRules(ruleset string) []string {
	var out []string
	chain := ""
	for line := range strings.Lines(ruleset) {
		trim := strings.TrimSpace(line)
		if strings.HasPrefix(line, "-A "+iptables.ChainName+" ") {
			out = append(out, trim)
		}
		if name, ok := strings.CutPrefix(trim, "chain "); ok {
			chain = strings.TrimSuffix(name, " {")
			continue
		}
		if chain == nft.ChainNAT && (strings.Contains(trim, " snat ") || strings.HasSuffix(trim, " accept") || strings.Contains(trim, " accept comment")) {
			out = append(out, trim)
		}
	}
	return out
}

// ourSets returns the names of our ipsets, or of the nftables backend's
// destination sets, in a lab.Ruleset.
func ourSets(ruleset string) []string {
	var out []string
	for _, name := range lab.SetNames(ruleset) {
		if strings.HasPrefix(name, iptables.SetPrefix) {
			out = append(out, name)
		}
	}
	for line := range strings.Lines(ruleset) {
		if name, ok := strings.CutPrefix(strings.TrimSpace(line), "set d"); ok {
			out = append(out, "d"+strings.TrimSuffix(name, " {"))
		}
	}
	return out
}

// setRules counts the chain rules that match an ipset.
func setRules(rules []string) int {
	n := 0
	for _, r := range rules {
		if strings.Contains(r, "--match-set") || strings.Contains(r, " @d") {
			n++
		}
	}
	return n
}

// setContent returns the members of an ipset in the lab's host namespace,
// as `ipset save` prints them ("198.51.100.4", "203.0.113.7 nomatch", ...).
func setContent(t *testing.T, l *lab.Lab, name string) []string {
	t.Helper()
	var out []string
	for line := range strings.Lines(l.Run(t, "ipset", "save", name)) {
		if m, ok := strings.CutPrefix(strings.TrimSpace(line), "add "+name+" "); ok {
			out = append(out, m)
		}
	}
	return out
}

// gwAddrAdd adds a far host (a /32 or /128 on the gateway's lo), which the
// host reaches through its default route.
func gwAddrAdd(t *testing.T, l *lab.Lab, cidrs ...string) {
	t.Helper()
	for _, c := range cidrs {
		args := []string{"-n", l.Gateway, "addr", "add", c, "dev", "lo"}
		if strings.Contains(c, ":") {
			args = append(args, "nodad")
		}
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// wantShape checks the number of chain rules and ipsets in a lab.Ruleset.
func wantShape(t *testing.T, what, ruleset string, rules, setRuleCount, sets int) {
	t.Helper()
	got := chainRules(ruleset)
	if len(got) != rules || setRules(got) != setRuleCount || len(ourSets(ruleset)) != sets {
		t.Errorf("%s: %d chain rules (%d matching a set) and ipsets %q; want %d rules (%d matching a set) and %d ipsets\nruleset:\n%s",
			what, len(got), setRules(got), ourSets(ruleset), rules, setRuleCount, sets, ruleset)
	}
}

// applyOK runs apply -f path and returns stdout, failing unless it exits 0.
func applyOK(t *testing.T, l *lab.Lab, path string, extra ...string) string {
	t.Helper()
	return mustES(t, l, append([]string{"apply", "-f", path}, extra...)...)
}

// list of prefixes in YAML flow style.
func yamlList(items ...string) string { return "[" + strings.Join(items, ", ") + "]" }

// tenNets returns n /24s in 10.9.0.0/16: destinations nobody answers on,
// used to push a group of destinations over snat.SetThreshold.
func tenNets(n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("10.9.%d.0/24", i))
	}
	return out
}

// TestApplyConverges walks one lab through apply, a no-op re-apply, shrink,
// grow, and the switch between single rules and an ipset in both
// directions, checking the ruleset's shape and the wire after each step.
func TestApplyConverges(t *testing.T) {
	iptablesOnly(t, "it counts iptables rules and ipsets (backend/nft's tests count sets per prefix length)")
	t.Parallel()
	l := newLab(t)
	dir := t.TempDir()
	natural := map[string]string{"198.51.100.4": "192.0.2.250", "198.51.100.5": "192.0.2.250", "203.0.113.7": "192.0.2.250"}
	wantSeen(t, l, natural)

	rule23 := "  - to: 192.0.2.23\n    dst: 198.51.100.5\n"
	file := func(dsts22 ...string) string {
		return "rules:\n  - to: 192.0.2.22\n    dst: " + yamlList(dsts22...) + "\n" + rule23
	}
	// SetThreshold destinations of .22 go into one set; one fewer are
	// single rules.
	atThreshold := append([]string{"198.51.100.4", "203.0.113.7"}, tenNets(snat.SetThreshold-2)...)
	aboveThreshold := append(slices.Clone(atThreshold), "10.9.200.0/24")
	belowThreshold := atThreshold[:snat.SetThreshold-1]
	if len(aboveThreshold) != snat.SetThreshold+1 || len(belowThreshold) != snat.SetThreshold-1 {
		t.Fatalf("test bug: %d and %d destinations", len(aboveThreshold), len(belowThreshold))
	}
	both := map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.23", "203.0.113.7": "192.0.2.22"}

	steps := []struct {
		name           string
		yaml           string
		rules, setRule int // chain rules, of which match a set
		sets           int
		noop           bool
		out            []string // stdout must contain each
		seen           map[string]string
	}{
		{"apply", file("198.51.100.4", "203.0.113.7"), 3, 0, 0, false,
			[]string{"add    198.51.100.4/32", "add    203.0.113.7/32", "add    198.51.100.5/32", "3 added, 0 changed, 0 removed"}, both},
		{"re-apply", file("198.51.100.4", "203.0.113.7"), 3, 0, 0, true, nil, both},
		{"shrink", file("198.51.100.4"), 2, 0, 0, false,
			[]string{"remove 203.0.113.7/32", "0 added, 0 changed, 1 removed"},
			map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.23", "203.0.113.7": "192.0.2.250"}},
		{"grow to the set threshold", file(atThreshold...), 2, 1, 1, false,
			[]string{"add    203.0.113.7/32", fmt.Sprintf("%d added, 0 changed, 0 removed", snat.SetThreshold-1), fmt.Sprintf(" %d destinations", snat.SetThreshold)}, both},
		{"re-apply with a set", file(atThreshold...), 2, 1, 1, true, nil, both},
		{"grow the set", file(aboveThreshold...), 2, 1, 1, false, []string{"1 added"}, both},
		{"change the set's source", strings.Replace(file(aboveThreshold...), "192.0.2.22", "192.0.2.250", 1) + "  - to: 192.0.2.23\n    dst: 0.0.0.0/0\n", 3, 1, 1, false,
			// The natural source under a broader rule needs a rule: RETURN.
			[]string{"change 198.51.100.4/32: 192.0.2.22 -> (natural 192.0.2.250)", "add    0.0.0.0/0"},
			map[string]string{"198.51.100.4": "192.0.2.250", "198.51.100.5": "192.0.2.23", "203.0.113.7": "192.0.2.250", "192.0.2.1": "192.0.2.23"}},
		{"shrink below the set threshold", file(belowThreshold...), snat.SetThreshold, 0, 0, false,
			[]string{"remove 0.0.0.0/0"}, both},
		{"back to the set", file(atThreshold...), 2, 1, 1, false, []string{"add    " + tenNets(snat.SetThreshold)[snat.SetThreshold-3]}, both},
		{"empty", "rules: []\n", 0, 0, 0, false, []string{fmt.Sprintf("0 added, 0 changed, %d removed", snat.SetThreshold+1)}, natural},
	}
	prevSets := []string(nil)
	prev := l.Ruleset(t)
	for _, st := range steps {
		path := writeConfig(t, dir, "egress.yaml", st.yaml)
		out := applyOK(t, l, path)
		rs := l.Ruleset(t)
		if st.noop {
			if !strings.Contains(out, "nothing to change") {
				t.Errorf("%s: apply printed %q, want \"nothing to change\"", st.name, out)
			}
			if rs != prev {
				t.Errorf("%s: the ruleset changed (-before +after):\n%s", st.name, cmp.Diff(prev, rs))
			}
		}
		for _, w := range st.out {
			if !strings.Contains(out, w) {
				t.Errorf("%s: apply printed:\n%s\nwant a line with %q", st.name, out, w)
			}
		}
		wantShape(t, st.name, rs, st.rules, st.setRule, st.sets)
		if st.rules > 0 {
			wantJumpFirst(t, rs, 1)
		} else if ours := ourLines(rs); ours != "" {
			t.Errorf("%s: no rules left, but the ruleset still has:\n%s", st.name, ours)
		}
		sets := ourSets(rs)
		// Only the set's content changes: it is changed in place and keeps
		// its name; the chain is not written.
		if st.name == "grow the set" && (len(sets) != 1 || !slices.Equal(sets, prevSets)) {
			t.Errorf("%s: the sets went from %v to %v; a set growing by one is changed in place, under its name", st.name, prevSets, sets)
		}
		if len(sets) == 1 {
			members := setContent(t, l, sets[0])
			if !slices.Contains(members, "198.51.100.4") || !slices.Contains(members, "203.0.113.7") {
				t.Errorf("%s: set %s holds %q, want 198.51.100.4 and 203.0.113.7 among them", st.name, sets[0], members)
			}
		}
		wantSeen(t, l, st.seen)
		t.Logf("%s: %d rules, ipsets %q", st.name, len(chainRules(rs)), sets)
		prev, prevSets = rs, sets
	}
}

// TestApplyLongestPrefixWins: where a set member and a single rule overlap,
// the more specific destination decides, whichever of the two is the set.
func TestApplyLongestPrefixWins(t *testing.T) {
	iptablesOnly(t, "it reads ipset members and nomatch exceptions (backend/nft: longest prefix across sets)")
	t.Parallel()
	tests := []struct {
		name  string
		yaml  string
		far   []string          // extra far hosts on the gateway
		seen  map[string]string // destination -> source the far side sees
		entry []string          // the set must hold these entries
	}{
		{
			name: "host rule inside a set's /24",
			yaml: "rules:\n" +
				"  - to: 192.0.2.22\n    dst: " + yamlList(append([]string{"203.0.113.0/24", "198.51.100.0/24"}, tenNets(snat.SetThreshold-2)...)...) + "\n" +
				"  - to: 192.0.2.23\n    dst: 203.0.113.7\n",
			far:   []string{"203.0.113.8/32"},
			seen:  map[string]string{"203.0.113.7": "192.0.2.23", "203.0.113.8": "192.0.2.22", "198.51.100.4": "192.0.2.22", "192.0.2.1": "192.0.2.250"},
			entry: []string{"203.0.113.0/24", "203.0.113.7 nomatch"},
		},
		{
			name: "set of hosts inside a /16 rule",
			yaml: "rules:\n" +
				"  - to: 192.0.2.23\n    dst: [198.51.100.4, 10.2.0.1, 10.2.0.2, 10.2.0.3, 10.2.0.4, 10.2.0.5, 10.2.0.6, 10.2.0.7]\n" +
				"  - to: 192.0.2.22\n    dst: 198.51.0.0/16\n",
			seen:  map[string]string{"198.51.100.4": "192.0.2.23", "198.51.100.5": "192.0.2.22", "203.0.113.7": "192.0.2.250"},
			entry: []string{"198.51.100.4"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t)
			gwAddrAdd(t, l, tt.far...)
			applyOK(t, l, writeConfig(t, t.TempDir(), "c.yaml", tt.yaml))
			rs := l.Ruleset(t)
			wantShape(t, tt.name, rs, 2, 1, 1)
			if sets := ourSets(rs); len(sets) == 1 {
				got := setContent(t, l, sets[0])
				for _, w := range tt.entry {
					if !slices.Contains(got, w) {
						t.Errorf("set %s holds %q, want %q among them", sets[0], got, w)
					}
				}
			}
			wantSeen(t, l, tt.seen)
		})
	}
}

// TestApplyRemovesSetRules: apply makes the host exactly the file, so rules
// made by set that the file does not name go, and the plan says so.
func TestApplyRemovesSetRules(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.5")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.7")
	mustES(t, l, "set", "--to", "2001:db8::22")
	wantSeen(t, l, map[string]string{"198.51.100.5": "192.0.2.23", "203.0.113.7": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22"})

	path := writeConfig(t, t.TempDir(), "c.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, 203.0.113.7]\n")
	dry := applyOK(t, l, path, "--dry-run")
	out := applyOK(t, l, path)
	for _, w := range []string{
		"remove 198.51.100.5/32 via eth0 from 192.0.2.250 -> 192.0.2.23",
		"remove ::/0 via eth0 from 2001:db8::250 -> 2001:db8::22",
		"add    198.51.100.4/32",
		"1 added, 0 changed, 2 removed",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("apply printed:\n%s\nwant a line with %q", out, w)
		}
		if !strings.Contains(dry, w) {
			t.Errorf("apply --dry-run printed:\n%s\nwant a line with %q", dry, w)
		}
	}
	if strings.Contains(out, "203.0.113.7") {
		t.Errorf("apply printed:\n%s\nbut 203.0.113.7 was set to the same source already", out)
	}
	rs := l.Ruleset(t)
	wantShape(t, "after apply", rs, 2, 0, 0)
	wantJumpFirst(t, rs, 1) // the IPv6 chain is gone
	wantSeen(t, l, map[string]string{
		"198.51.100.4":     "192.0.2.22",
		"198.51.100.5":     "192.0.2.250",
		"203.0.113.7":      "192.0.2.22",
		"2001:db8:ffff::4": "2001:db8::250",
	})
}

// TestApplyBadFileChangesNothing: a file that cannot work is refused with
// exit status 2 and a message naming the value, and the host stays as it was.
func TestApplyBadFileChangesNothing(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	addForeignRules(t, l)
	dir := t.TempDir()
	good := "rules:\n" +
		"  - to: 192.0.2.22\n    dst: " + yamlList(append([]string{"198.51.100.4"}, tenNets(snat.SetThreshold)...)...) + "\n" +
		"  - to: 2001:db8::23\n    dst: 2001:db8:ffff::4\n"
	applyOK(t, l, writeConfig(t, dir, "good.yaml", good))
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "203.0.113.7")
	before := l.Ruleset(t)
	seen := map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.23", "198.51.100.5": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::23"}
	wantSeen(t, l, seen)

	tests := []struct {
		name  string
		files []string // config first, then other files, name/content pairs
		want  []string // stderr must name each
	}{
		{"unknown key", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\nremove-others: false\n"}, []string{"line 4", "remove-others"}},
		{"address not on the host", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n  - to: 192.0.2.99\n    dst: 198.51.100.5\n"}, []string{"192.0.2.99", "198.51.100.5/32"}},
		{"same destination twice with different sources", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, 203.0.113.7]\n  - to: 192.0.2.23\n    dst: [198.51.100.4]\n"},
			[]string{"198.51.100.4/32", "192.0.2.22", "192.0.2.23", "twice"}},
		{"bad dst-file line", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: partners.txt\n", "partners.txt", "# partners\n198.51.100.4\n203.0.113.0/33\n"},
			[]string{`partners.txt" line 3`, "203.0.113.0/33"}},
		{"missing dst-file", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: nope.txt\n"}, []string{"nope.txt"}},
		{"bad address", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, 198.51.100.256]\n"}, []string{"line 3", "198.51.100.256"}},
		{"host bits", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.1/24\n"}, []string{"198.51.100.1/24", "198.51.100.0/24"}},
		{"families mixed", []string{"c.yaml", "rules:\n  - to: 192.0.2.22\n    dst: 2001:db8:ffff::4\n"}, []string{"192.0.2.22", "2001:db8:ffff::4"}},
		{"spread member not on the host", []string{"c.yaml", "rules:\n  - to: [192.0.2.22, 192.0.2.98]\n    spread: true\n    dst: 198.51.100.4\n"}, []string{"192.0.2.98"}},
		{"no failover member on the host", []string{"c.yaml", "rules:\n  - to: [192.0.2.98, 192.0.2.99]\n    dst: 198.51.100.4\n"}, []string{"192.0.2.98"}},
		{"source on the loopback", []string{"c.yaml", "rules:\n  - to: 127.0.0.1\n    dst: 198.51.100.4\n"}, []string{"127.0.0.1"}},
		{"empty file", []string{"c.yaml", ""}, []string{"empty file"}},
		{"two documents", []string{"c.yaml", "rules: []\n---\nrules: []\n"}, []string{"more than one YAML document"}},
		{"no such file", []string{"other.yaml", "rules: []\n"}, []string{"c.yaml"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := filepath.Join(dir, strings.NewReplacer(" ", "-").Replace(tt.name))
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			writeConfig(t, d, tt.files...)
			path := filepath.Join(d, "c.yaml")
			for _, dry := range []bool{true, false} {
				args := []string{"apply", "-f", path}
				if dry {
					args = append(args, "--dry-run")
				}
				r := es(t, l, args...)
				if r.code != exitUsage {
					t.Errorf("%s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, exitUsage, r.stdout, r.stderr)
				}
				for _, w := range tt.want {
					if !strings.Contains(r.stderr, w) {
						t.Errorf("%s: stderr %q, want it to name %q", strings.Join(args, " "), r.stderr, w)
					}
				}
				if after := l.Ruleset(t); after != before {
					t.Fatalf("%s changed the ruleset (-before +after):\n%s", strings.Join(args, " "), cmp.Diff(before, after))
				}
			}
		})
	}
	wantSeen(t, l, seen)
}

// TestApplyDryRun: --dry-run changes nothing and prints the plan and the
// exact payloads, which are then what a real run installs.
func TestApplyDryRun(t *testing.T) {
	iptablesOnly(t, "it reads iptables-restore and ipset payloads")
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.5")
	before := l.Ruleset(t)
	seenBefore := map[string]string{"198.51.100.4": "192.0.2.250", "198.51.100.5": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::250"}

	many := append([]string{"198.51.100.4"}, tenNets(snat.SetThreshold-1)...)
	path := writeConfig(t, t.TempDir(), "c.yaml", "rules:\n"+
		"  - to: 192.0.2.22\n    dst: "+yamlList(many...)+"\n"+
		"  - to: 192.0.2.23\n    dst: 203.0.113.7\n"+
		"  - to: 2001:db8::22\n    dst: 2001:db8:ffff::/48\n")
	out := applyOK(t, l, path, "--dry-run")
	if after := l.Ruleset(t); after != before {
		t.Errorf("apply --dry-run changed the ruleset (-before +after):\n%s", cmp.Diff(before, after))
	}
	wantSeen(t, l, seenBefore)
	for _, w := range []string{
		"would add    198.51.100.4/32",
		"would add    2001:db8:ffff::/48",
		"would remove 198.51.100.5/32",
		"10 added, 0 changed, 1 removed",
		"# ipset restore\ncreate egress-snat4-",
		" hash:net family inet ",
		" 198.51.100.4/32\n",
		"# iptables-restore --noflush\n*nat\n:EGRESS-SNAT - [0:0]\n",
		"-I POSTROUTING 1 -m comment --comment egress-snat -j EGRESS-SNAT\n",
		"-d 203.0.113.7/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23\n",
		"# ip6tables-restore --noflush\n*nat\n",
		"-d 2001:db8:ffff::/48 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 2001:db8::22\n",
		"COMMIT\n",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("apply --dry-run printed:\n%s\nwant it to contain %q", out, w)
		}
	}
	// Every change is listed in a dry run, even past the cap of a real run.
	if strings.Contains(out, "more changes") {
		t.Errorf("apply --dry-run printed:\n%s\nwant every change listed", out)
	}

	// What the dry run printed is what a real run installs.
	var setName string
	payloadRules := 0
	for line := range strings.Lines(out) {
		if n, ok := strings.CutPrefix(line, "create "); ok {
			setName = strings.Fields(n)[0]
		}
		if strings.HasPrefix(line, "-A "+iptables.ChainName+" ") {
			payloadRules++
		}
	}
	applyOK(t, l, path)
	rs := l.Ruleset(t)
	if got := ourSets(rs); !slices.Equal(got, []string{setName}) {
		t.Errorf("after apply: ipsets %q, want the one the dry run created, %q", got, setName)
	}
	if got := len(chainRules(rs)); got != payloadRules {
		t.Errorf("after apply: %d chain rules, the dry run's payloads had %d\nruleset:\n%s\ndry run:\n%s", got, payloadRules, rs, out)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.250", "203.0.113.7": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22"})

	// A dry run of the file now in force plans nothing.
	before = rs
	if out := applyOK(t, l, path, "--dry-run"); !strings.Contains(out, "nothing to change") {
		t.Errorf("apply --dry-run of the applied file printed %q, want \"nothing to change\"", out)
	}
	if after := l.Ruleset(t); after != before {
		t.Errorf("apply --dry-run changed the ruleset (-before +after):\n%s", cmp.Diff(before, after))
	}
}

// TestApplyClearRestoresRuleset: clear after apply (rules, sets, both
// families) leaves lab.Ruleset, ipsets included, exactly as before.
func TestApplyClearRestoresRuleset(t *testing.T) {
	t.Parallel()
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
			dir := t.TempDir()
			var v6 []string
			for i := range snat.SetThreshold {
				v6 = append(v6, fmt.Sprintf("2001:db8:%x::/48", 0xfff8+i))
			}
			path := writeConfig(t, dir, "c.yaml", "rules:\n"+
				"  - to: 192.0.2.22\n    dst-file: four.txt\n"+
				"  - to: [192.0.2.22, 192.0.2.23]\n    spread: true\n    dst: 203.0.113.7\n"+
				"  - to: 192.0.2.23\n    dst: 0.0.0.0/0\n"+
				"  - to: 2001:db8::22\n    dst: "+yamlList(v6...)+"\n",
				"four.txt", "198.51.100.4\n"+strings.Join(tenNets(snat.SetThreshold), "\n")+"\n")
			applyOK(t, l, path)
			rs := l.Ruleset(t)
			wantShape(t, "after apply", rs, 5, 2, 2)
			wantJumpFirst(t, rs, 2)
			wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.23", "2001:db8:ffff::4": "2001:db8::22"})

			mustES(t, l, "clear")
			want := before
			if backend(t) == "legacy" && before == "" {
				// As in TestClearRestoresRuleset: the legacy backend cannot
				// unload a table it loaded in a namespace.
				want = emptyNat + emptyNat
			}
			if diff := cmp.Diff(want, l.Ruleset(t)); diff != "" {
				t.Errorf("ruleset after apply and clear (-want +got):\n%s", diff)
			}
			wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "203.0.113.7": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"})
		})
	}
}

// TestApplyLargeDstFile: a dst-file of a few hundred destinations becomes
// one ipset, sampled on the wire; a second apply writes nothing.
func TestApplyLargeDstFile(t *testing.T) {
	iptablesOnly(t, "it counts iptables rules and ipsets")
	t.Parallel()
	l := newLab(t)
	const n = 400
	// Far hosts answering on the gateway: some in the file, one not.
	inFile := []string{"198.51.100.4", "203.0.113.7", "10.77.0.1", "10.77.1.1", "10.77.2.1"}
	gwAddrAdd(t, l, "10.77.0.1/32", "10.77.1.1/32", "10.77.2.1/32", "10.78.0.1/32")
	var b strings.Builder
	b.WriteString("# partners: generated\n\n")
	dsts := slices.Clone(inFile)
	for i := 0; len(dsts) < n; i++ {
		if i%10 == 0 {
			dsts = append(dsts, fmt.Sprintf("10.60.%d.0/24", i/10))
		} else {
			dsts = append(dsts, fmt.Sprintf("10.50.%d.%d", i/200, i%200+1))
		}
	}
	for i, d := range dsts {
		fmt.Fprintf(&b, "%s   # partner %d\n", d, i)
	}
	dir := t.TempDir()
	path := writeConfig(t, dir, "c.yaml", "rules:\n  - to: 192.0.2.23\n    dst-file: partners.txt\n  - to: 192.0.2.22\n    dst: 198.51.100.5\n",
		"partners.txt", b.String())

	start := time.Now()
	out := applyOK(t, l, path)
	took := time.Since(start)
	for _, w := range []string{fmt.Sprintf("%d added, 0 changed, 0 removed", n+1), fmt.Sprintf(" %d destinations", n)} {
		if !strings.Contains(out, w) {
			t.Errorf("apply printed:\n%s\nwant %q", out, w)
		}
	}
	if w := fmt.Sprintf("... and %d more changes", n+1-maxPlanLines); !strings.Contains(out, w) {
		t.Errorf("apply printed:\n%s\nwant the list cut short with %q", out, w)
	}
	rs := l.Ruleset(t)
	wantShape(t, "after apply", rs, 2, 1, 1)
	if sets := ourSets(rs); len(sets) == 1 {
		if got := setContent(t, l, sets[0]); len(got) != n {
			t.Errorf("set %s holds %d entries, want %d", sets[0], len(got), n)
		}
	}
	want := map[string]string{"198.51.100.5": "192.0.2.22", "10.78.0.1": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::250"}
	for _, d := range inFile {
		want[d] = "192.0.2.23"
	}
	wantSeen(t, l, want)

	start = time.Now()
	if out := applyOK(t, l, path); !strings.Contains(out, "nothing to change") {
		t.Errorf("second apply printed %q, want \"nothing to change\"", out)
	}
	tookAgain := time.Since(start)
	if again := l.Ruleset(t); again != rs {
		t.Errorf("second apply changed the ruleset (-first +second):\n%s", cmp.Diff(rs, again))
	}

	// Dropping one destination from the file moves it back to the natural source.
	writeConfig(t, dir, "partners.txt", strings.Replace(b.String(), "10.77.1.1 ", "# 10.77.1.1 ", 1))
	out = applyOK(t, l, path)
	if !strings.Contains(out, "remove 10.77.1.1/32") {
		t.Errorf("apply after dropping 10.77.1.1 printed:\n%s\nwant it removed", out)
	}
	want["10.77.1.1"] = "192.0.2.250"
	wantSeen(t, l, want)
	t.Logf("%d destinations: first apply %v, no-op apply %v", n, took.Round(time.Millisecond), tookAgain.Round(time.Millisecond))
}

// TestApplyIPv6: IPv6 rules in a file, alone and in a set, next to IPv4.
func TestApplyIPv6(t *testing.T) {
	iptablesOnly(t, "it counts iptables rules and ipsets")
	t.Parallel()
	l := newLab(t)
	gwAddrAdd(t, l, "2001:db8:ffff::5/128", "2001:db8:eeee::7/128")
	dir := t.TempDir()
	path := writeConfig(t, dir, "c.yaml", "rules:\n"+
		"  - to: 2001:db8::22\n    dst: 2001:db8:ffff::4\n"+
		"  - to: 2001:db8::23\n    dst: [2001:db8:ffff::/48]\n"+
		"  - to: 192.0.2.22\n    dst: 198.51.100.4\n")
	applyOK(t, l, path)
	rs := l.Ruleset(t)
	wantShape(t, "single rules", rs, 3, 0, 0)
	wantJumpFirst(t, rs, 2)
	seen := map[string]string{
		"2001:db8:ffff::4": "2001:db8::22",
		"2001:db8:ffff::5": "2001:db8::23",
		"2001:db8:eeee::7": "2001:db8::250",
		"2001:db8::1":      "2001:db8::250",
		"198.51.100.4":     "192.0.2.22",
	}
	wantSeen(t, l, seen)
	if out := applyOK(t, l, path); !strings.Contains(out, "nothing to change") {
		t.Errorf("second apply printed %q, want \"nothing to change\"", out)
	}

	// The /48 and enough more destinations of ::23 become an IPv6 set; the
	// ::4 host rule inside it still wins.
	var list strings.Builder
	list.WriteString("# IPv6 partners\n2001:db8:ffff::/48\n2001:db8:eeee::7\n")
	for i := range snat.SetThreshold {
		fmt.Fprintf(&list, "2001:db8:%x::/48 # %d\n", 0xa000+i, i)
	}
	writeConfig(t, dir, "c.yaml", "rules:\n"+
		"  - to: 2001:db8::22\n    dst: 2001:db8:ffff::4\n"+
		"  - to: 2001:db8::23\n    dst-file: v6.txt\n"+
		"  - to: 192.0.2.22\n    dst: 198.51.100.4\n",
		"v6.txt", list.String())
	applyOK(t, l, path)
	rs = l.Ruleset(t)
	wantShape(t, "with an IPv6 set", rs, 3, 1, 1)
	if sets := ourSets(rs); len(sets) != 1 || !strings.HasPrefix(sets[0], iptables.SetPrefix+"6-") {
		t.Errorf("ipsets %q, want one IPv6 set (%s6-…)", sets, iptables.SetPrefix)
	} else if got := setContent(t, l, sets[0]); !slices.Contains(got, "2001:db8:ffff::4 nomatch") {
		t.Errorf("set %s holds %q, want 2001:db8:ffff::4 as a nomatch exception", sets[0], got)
	}
	seen["2001:db8:eeee::7"] = "2001:db8::23"
	wantSeen(t, l, seen)
}
