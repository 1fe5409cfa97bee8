package main

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// relBadFiles are desired-state files that can never work, each with the
// words the error must name. Files named "*.txt" are dst-files they refer
// to, written alongside.
var relBadFiles = []struct {
	name    string
	content string
	want    []string
	// decode is true when the problem is in the file itself, so watch
	// refuses it too (a source missing from the host is a runtime state
	// for watch, which waits for it).
	decode bool
	// bug names a known product bug that makes the case fail; the case
	// then skips instead of failing, and passes once the bug is fixed.
	bug string
	// checkBug is bug for `check -f` alone.
	checkBug string
}{
	{"unknown key", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    colour: red\n", []string{"colour", "line 4"}, true, "", ""},
	{"misspelt top-level key", "rule:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n", []string{"rule"}, true, "", ""},
	{"to not an address", "rules:\n  - to: 192.0.2.300\n    dst: [198.51.100.4]\n", []string{"192.0.2.300"}, true, "", ""},
	{"to with a zone", "rules:\n  - to: fe80::1%eth0\n    dst: [2001:db8:ffff::4]\n", []string{"fe80::1%eth0"}, true, "", ""},
	{"to a prefix", "rules:\n  - to: 192.0.2.22/24\n    dst: [198.51.100.4]\n", []string{"192.0.2.22/24"}, true, "", ""},
	{"to a mapping", "rules:\n  - to: {address: 192.0.2.22}\n    dst: [198.51.100.4]\n", []string{"line 2", "mapping"}, true, "", ""},
	{"to a nested list", "rules:\n  - to: [[192.0.2.22]]\n    dst: [198.51.100.4]\n", []string{"line 2", "list"}, true, "", ""},
	{"to missing", "rules:\n  - dst: [198.51.100.4]\n", []string{"'to'", "line 2"}, true, "", ""},
	{"dst missing", "rules:\n  - to: 192.0.2.22\n", []string{"'dst'", "line 2"}, true, "", ""},
	{"dst prefix too long", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.0/33]\n", []string{"198.51.100.0/33"}, true, "", ""},
	{"dst host bits", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.1/24]\n", []string{"198.51.100.1/24", "198.51.100.0/24"}, true, "", ""},
	{"dst IPv6 host bits", "rules:\n  - to: 2001:db8::22\n    dst: [2001:db8:ffff::1/48]\n", []string{"2001:db8:ffff::1/48"}, true, "", ""},
	{"dst not an address", "rules:\n  - to: 192.0.2.22\n    dst: [partner.example]\n", []string{"partner.example"}, true, "", ""},
	{"dst empty prefix length", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.0/]\n", []string{"198.51.100.0/"}, true, "", ""},
	{"to mixes families", "rules:\n  - to: [192.0.2.22, 2001:db8::22]\n    spread: true\n    dst: [198.51.100.4]\n", []string{"192.0.2.22", "2001:db8::22"}, true, "", ""},
	{"dst of the other family", "rules:\n  - to: 192.0.2.22\n    dst: [2001:db8:ffff::4]\n", []string{"192.0.2.22", "2001:db8:ffff::4"}, true, "", ""},
	{"spread not a boolean", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    spread: sometimes\n", []string{"sometimes"}, true, "", ""},
	{"rules a mapping", "rules:\n  to: 192.0.2.22\n", []string{"line 2"}, true, "", ""},
	{"two documents", "rules: []\n---\nrules: []\n", []string{"more than one YAML document"}, true, "", ""},
	{"empty file", "", []string{"empty file"}, true, "", ""},
	{"tab indentation", "rules:\n\t- to: 192.0.2.22\n", []string{"line 2"}, true, "", ""},
	{"unterminated flow list", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4\n", []string{"line"}, true, "", ""},
	{"binary garbage", "\x00\x01\x02\xff\xfe", []string{"rules.yaml"}, true, "", ""},
	{"dst-file missing", "rules:\n  - to: 192.0.2.22\n    dst-file: nowhere.txt\n", []string{"nowhere.txt"}, true, "", ""},
	{"dst-file with a bad line", "rules:\n  - to: 192.0.2.22\n    dst-file: partners.txt\n", []string{"partners.txt:2", "198.51.100.300"}, true, "", ""},
	{"dst-file of the other family", "rules:\n  - to: 192.0.2.22\n    dst-file: partners6.txt\n", []string{"2001:db8:ffff::4", "192.0.2.22"}, true, "", ""},
	// For check, a source missing from the host is drift (to-not-on-host,
	// exit 1), not an error: see TestBadInputCorpus.
	{"to not on the host", "rules:\n  - to: 192.0.2.99\n    dst: [198.51.100.4]\n", []string{"192.0.2.99"}, false, "", ""},
	{"to on another interface", "rules:\n  - to: 203.0.113.130\n    dst: [198.51.100.4]\n", []string{"203.0.113.130", "eth1"}, false, "", ""},
	{"spread onto another interface", "rules:\n  - to: [192.0.2.22, 203.0.113.130]\n    spread: true\n    dst: [198.51.100.4]\n", []string{"203.0.113.130", "eth1"}, false, "", ""},
	{"unknown out", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: nope0\n", []string{"nope0"}, false, "", ""},
	{"same dst, two sources", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n  - to: 192.0.2.23\n    dst: [198.51.100.4]\n", []string{"198.51.100.4", "192.0.2.22", "192.0.2.23"}, false, "",
		"check -f reports a file giving one destination two sources as drift (exit 1) instead of refusing it (exit 2) as apply does: " +
			"desiredNow resolves the intents one at a time, so snat.Resolve's duplicate check never sees both"},
}

var relBadFileExtras = map[string]string{
	"partners.txt":  "198.51.100.4\n198.51.100.300 # typo\n",
	"partners6.txt": "2001:db8:ffff::4\n",
}

// relBadArgs are command lines with a malformed address, prefix or
// interface, each with the words the error must name.
var relBadArgs = []struct {
	name string
	args []string
	want []string
}{
	// Addresses.
	{"--to octet too large", []string{"set", "--to", "192.0.2.256"}, []string{"192.0.2.256"}},
	{"--to three octets", []string{"set", "--to", "192.0.2"}, []string{"192.0.2"}},
	{"--to five octets", []string{"set", "--to", "1.2.3.4.5"}, []string{"1.2.3.4.5"}},
	{"--to hex", []string{"set", "--to", "0xc0000216"}, []string{"0xc0000216"}},
	{"--to leading zero", []string{"set", "--to", "192.0.2.022"}, []string{"192.0.2.022"}},
	{"--to bad IPv6", []string{"set", "--to", "2001:db8::g"}, []string{"2001:db8::g"}},
	{"--to IPv6 with a zone", []string{"set", "--to", "2001:db8::22%eth0"}, []string{"2001:db8::22%eth0"}},
	{"--to IPv4-mapped IPv6", []string{"set", "--to", "::ffff:192.0.2.22"}, []string{"::ffff:192.0.2.22"}},
	{"--to a prefix", []string{"set", "--to", "192.0.2.22/32"}, []string{"192.0.2.22/32"}},
	{"--to empty list element", []string{"set", "--to", "192.0.2.22,,192.0.2.23", "--spread"}, []string{`""`}},
	{"--to loopback", []string{"set", "--to", "127.0.0.1"}, []string{"127.0.0.1"}},
	{"--to IPv6 loopback", []string{"set", "--to", "::1"}, []string{"::1"}},
	{"--to multicast", []string{"set", "--to", "224.0.0.1"}, []string{"224.0.0.1"}},
	{"--to IPv6 unspecified", []string{"set", "--to", "::"}, []string{"::"}},
	{"--to a host name", []string{"set", "--to", "localhost"}, []string{"localhost"}},
	{"--pool bad member", []string{"rotate", "--pool", "192.0.2.22,bogus", "--dst", "198.51.100.4"}, []string{"bogus"}},
	{"--pool mixes families", []string{"rotate", "--pool", "192.0.2.22,2001:db8::22", "--dst", "198.51.100.4"}, []string{"192.0.2.22", "2001:db8::22"}},
	{"--pool none on the host", []string{"rotate", "--pool", "192.0.2.98,192.0.2.99", "--dst", "198.51.100.4"}, []string{"192.0.2.98", "192.0.2.99"}},
	{"--pool on another interface", []string{"rotate", "--pool", "203.0.113.130", "--dst", "198.51.100.4"}, []string{"203.0.113.130", "eth1"}},
	{"--pool of the other family", []string{"rotate", "--pool", "2001:db8::22", "--dst", "198.51.100.4"}, []string{"2001:db8::22", "198.51.100.4"}},
	{"--order unknown", []string{"rotate", "--pool", "192.0.2.22", "--order", "sideways"}, []string{"sideways"}},
	// Prefixes.
	{"--dst /33", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.0/33"}, []string{"198.51.100.0/33"}},
	{"--dst no address", []string{"set", "--to", "192.0.2.22", "--dst", "/24"}, []string{"/24"}},
	{"--dst empty length", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.0/"}, []string{"198.51.100.0/"}},
	{"--dst negative length", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.0/-1"}, []string{"198.51.100.0/-1"}},
	{"--dst length not a number", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.0/a"}, []string{"198.51.100.0/a"}},
	{"--dst two lengths", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.0/24/8"}, []string{"198.51.100.0/24/8"}},
	{"--dst host bits", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.128/24"}, []string{"198.51.100.128/24", "198.51.100.0/24"}},
	{"--dst IPv6 /129", []string{"set", "--to", "2001:db8::22", "--dst", "2001:db8::/129"}, []string{"2001:db8::/129"}},
	{"--dst IPv6 host bits", []string{"set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::1/48"}, []string{"2001:db8:ffff::1/48", "2001:db8:ffff::/48"}},
	{"--dst IPv6 prefix with a zone", []string{"set", "--to", "2001:db8::22", "--dst", "fe80::%eth0/64"}, []string{"fe80::%eth0/64"}},
	{"--dst empty list element", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4,"}, []string{`""`}},
	{"--dst a mask", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.0/255.255.255.0"}, []string{"198.51.100.0/255.255.255.0"}},
	{"unset bad prefix", []string{"unset", "--dst", "198.51.100.0/40"}, []string{"198.51.100.0/40"}},
	{"rotate bad prefix", []string{"rotate", "--pool", "192.0.2.22", "--dst", "198.51.100.999"}, []string{"198.51.100.999"}},
	{"explain bad prefix", []string{"explain", "--dst", "300.1.1.1"}, []string{"300.1.1.1"}},
	// Interfaces.
	{"--out unknown", []string{"set", "--to", "192.0.2.22", "--out", "nope0"}, []string{"nope0"}},
	{"--out with a slash", []string{"set", "--to", "192.0.2.22", "--out", "eth0/1"}, []string{"eth0/1"}},
	{"--out too long", []string{"set", "--to", "192.0.2.22", "--out", "a-very-long-interface-name"}, []string{"a-very-long-interface-name"}},
	{"--out with a blank", []string{"set", "--to", "192.0.2.22", "--out", "eth 0"}, []string{"eth 0"}},
	{"--out loopback", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4", "--out", "lo"}, []string{"lo"}},
	{"--out not where the source is", []string{"set", "--to", "192.0.2.22", "--dst", "203.0.113.129", "--out", "eth1"}, []string{"192.0.2.22", "eth0", "eth1"}},
	{"explain --out unknown", []string{"explain", "--dst", "198.51.100.4", "--out", "nope0"}, []string{"nope0"}},
}

// TestBadInputCorpus: malformed addresses, prefixes, interfaces and
// desired-state files each give exit 2, a message naming the bad value, and
// an unchanged ruleset, on a host with rules of both families and foreign
// rules. Files are tried with apply, check and (when the file itself is
// wrong) watch.
func TestBadInputCorpus(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondNIC())
	relForeignRules(t, l)
	install := func(t *testing.T) {
		t.Helper()
		mustES(t, l, "clear")
		mustES(t, l, "set", "--to", "192.0.2.23")
		mustES(t, l, "set", "--to", "2001:db8::23", "--dst", "2001:db8:ffff::4")
		mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.1,203.0.113.2,203.0.113.3,203.0.113.4,203.0.113.5,203.0.113.6,203.0.113.7,203.0.113.8")
	}
	install(t)
	before := l.Ruleset(t)
	seen := map[string]string{"198.51.100.4": "192.0.2.23", "203.0.113.7": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::23"}
	wantSeen(t, l, seen)

	// judge returns what is wrong with one run, and puts the rules back
	// if it changed them, so that every case starts from the same host.
	// Every run is judged once: runs and passed count runs, not cases.
	runs, passed := 0, 0
	judge := func(t *testing.T, args []string, code, wantCode int, stderr, stdout string, want []string) []string {
		t.Helper()
		runs++
		var bad []string
		defer func() {
			if len(bad) == 0 {
				passed++
			}
		}()
		if code != wantCode {
			bad = append(bad, fmt.Sprintf("egress-snat %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, wantCode, stdout, stderr))
		}
		for _, w := range want {
			if !strings.Contains(stderr, w) {
				bad = append(bad, fmt.Sprintf("egress-snat %s: stderr %q, want it to name %q", strings.Join(args, " "), stderr, w))
			}
		}
		if after := l.Ruleset(t); after != before {
			bad = append(bad, fmt.Sprintf("egress-snat %s changed the ruleset (-before +after):\n%s", strings.Join(args, " "), cmp.Diff(before, after)))
			install(t)
		}
		return bad
	}
	report := func(t *testing.T, bug string, bad []string) {
		t.Helper()
		if len(bad) > 0 {
			if bug != "" {
				t.Errorf("regression of %s", bug)
			}
			t.Error(strings.Join(bad, "\n"))
		}
	}
	for _, tt := range relBadArgs {
		t.Run("args/"+tt.name, func(t *testing.T) {
			r := es(t, l, tt.args...)
			report(t, "", judge(t, tt.args, r.code, exitUsage, r.stderr, r.stdout, tt.want))
		})
	}
	for _, tt := range relBadFiles {
		t.Run("file/"+tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, content := range relBadFileExtras {
				relWrite(t, dir, name, content)
			}
			path := relWrite(t, dir, "rules.yaml", tt.content)
			var bad []string
			for _, cmd := range [][]string{{"apply", "-f", path}, {"apply", "--dry-run", "-f", path}} {
				r := es(t, l, cmd...)
				bad = append(bad, judge(t, cmd, r.code, exitUsage, r.stderr, r.stdout, tt.want)...)
			}
			cmd := []string{"check", "-f", path}
			r := es(t, l, cmd...)
			if strings.Contains(tt.name, "not on the host") {
				// check's job is to report this state of the host.
				bad = append(bad, judge(t, cmd, r.code, checkDrift, r.stdout, "", append([]string{"to-not-on-host"}, tt.want...))...)
			} else {
				t.Run("check", func(t *testing.T) {
					report(t, tt.checkBug, judge(t, cmd, r.code, checkError, r.stderr, r.stdout, tt.want))
				})
			}
			if !tt.decode {
				report(t, tt.bug, bad)
				return
			}
			cmd = []string{"watch", "-f", path}
			p := relStart(t, l, cmd...)
			code, ok := p.wait(5 * time.Second)
			if !ok {
				p.cmd.Process.Signal(syscall.SIGTERM)
				code, _ = p.wait(5 * time.Second)
				bad = append(bad, fmt.Sprintf("egress-snat %s: still running after 5s, want it to refuse the file", strings.Join(cmd, " ")))
			}
			bad = append(bad, judge(t, cmd, code, exitUsage, p.stderr.String(), p.stdout.String(), tt.want)...)
			report(t, tt.bug, bad)
		})
	}
	missing := []string{"apply", "-f", "/nonexistent/egress-snat.yaml"}
	r := es(t, l, missing...)
	report(t, "", judge(t, missing, r.code, exitUsage, r.stderr, r.stdout, []string{"/nonexistent/egress-snat.yaml"}))
	relFigure(t, "bad_inputs", runs)
	relFigure(t, "bad_inputs_passed", passed)
	relFigure(t, "bad_inputs_failed", runs-passed)
	wantSeen(t, l, seen)
}
