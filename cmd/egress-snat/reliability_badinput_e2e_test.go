package main

import (
	"fmt"
	"path/filepath"
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
	{"dst-file with a bad line", "rules:\n  - to: 192.0.2.22\n    dst-file: partners.txt\n", []string{`partners.txt" line 2`, "198.51.100.300"}, true, "", ""},
	{"dst-file of the other family", "rules:\n  - to: 192.0.2.22\n    dst-file: partners6.txt\n", []string{"2001:db8:ffff::4", "192.0.2.22"}, true, "", ""},
	// Issue #15.
	{"to names an address twice", "rules:\n  - to: [192.0.2.22, 192.0.2.22]\n    dst: [198.51.100.4]\n", []string{"names 192.0.2.22 twice", "line 2"}, true, "", ""},
	{"spread to names an address twice", "rules:\n  - to: [192.0.2.22, 192.0.2.23, 192.0.2.22]\n    spread: true\n    dst: [198.51.100.4]\n", []string{"names 192.0.2.22 twice"}, true, "", ""},
	{"out with a newline", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: \"eth0\\nINJECTED\"\n", []string{`"eth0\nINJECTED"`}, true, "", ""},
	{"dst-file of a password file", "rules:\n  - to: 192.0.2.22\n    dst-file: shadow\n", []string{`shadow" line 1`, `"root:$6$rounds=656000$AAAAAAAAAAAAAAAAAA"…`}, true, "", ""},
	{"dst-file a device", "rules:\n  - to: 192.0.2.22\n    dst-file: /dev/zero\n", []string{`"/dev/zero"`, "not a regular file"}, true, "", ""},
	{"dst-file a directory", "rules:\n  - to: 192.0.2.22\n    dst-file: /\n", []string{`"/"`, "not a regular file"}, true, "", ""},
	{"a YAML value with a newline", "rules: \"a\\nINJECTED line\"\n", []string{`a\nINJEC`}, true, "", ""},
	{"dst-file one huge line", "rules:\n  - to: 192.0.2.22\n    dst-file: huge.txt\n", []string{`huge.txt" line 1`, "64 KiB"}, true, "", ""},
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
	"shadow":        relShadowLine,
	"huge.txt":      strings.Repeat("198.51.100.4", 100<<10) + "\n",
}

// relShadowLine looks like a line of /etc/shadow: a file that is not a list
// of destinations, whose content must not be echoed whole.
var relShadowLine = "root:$6$rounds=656000$" + strings.Repeat("A", 86) + ":20228:0:99999:7:::\n"

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
	// Issue #15.
	{"--pool names an address twice", []string{"rotate", "--pool", "192.0.2.22,192.0.2.22", "--dst", "198.51.100.4"}, []string{"names 192.0.2.22 twice"}},
	{"--pool names an address twice, two flags", []string{"rotate", "--pool", "192.0.2.22,192.0.2.23", "--pool", "192.0.2.22", "--dst", "198.51.100.4"}, []string{"names 192.0.2.22 twice"}},
	{"--to --spread names an address twice", []string{"set", "--to", "192.0.2.22,192.0.2.22", "--spread", "--dst", "198.51.100.4"}, []string{"names 192.0.2.22 twice"}},
	{"--to IPv6 twice, spelt differently", []string{"set", "--to", "2001:db8::22,2001:DB8:0::22", "--spread", "--dst", "2001:db8:ffff::4"}, []string{"names 2001:db8::22 twice"}},
	{"--lock-timeout negative", []string{"--lock-timeout", "-1s", "set", "--to", "192.0.2.22", "--dst", "198.51.100.4"}, []string{"--lock-timeout -1s"}},
	{"--lock-timeout zero", []string{"--lock-timeout", "0s", "clear"}, []string{"--lock-timeout 0s"}},
	{"--lock-timeout not a duration", []string{"--lock-timeout", "soon", "clear"}, []string{"soon"}},
	{"--out with a newline", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4", "--out", "eth0\nINJECTED"}, []string{`"eth0\nINJECTED"`}},
	{"--out with a tab", []string{"set", "--to", "192.0.2.22", "--out", "eth0\t"}, []string{`"eth0\t"`}},
	{"--dst with a newline", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4\nINJECTED"}, []string{`"198.51.100.4\nINJECTED"`}},
	{"--netns with a newline", []string{"--netns", "nope\nINJECTED", "list"}, []string{`"nope\nINJECTED"`}},
	{"unknown flag with a newline", []string{"set", "--to\nINJECTED", "192.0.2.22"}, []string{`to\nINJECTED`}},
	{"help on an unknown topic", []string{"help", "0"}, []string{"0"}},
	{"--to of 100,000 characters", []string{"set", "--to", strings.Repeat("1", 100000)}, []string{`"` + strings.Repeat("1", 40) + `"…`}},
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
			r := esWithin(t, l, relBadInputBound, tt.args...)
			bad := judge(t, tt.args, r.code, exitUsage, r.stderr, r.stdout, tt.want)
			if strings.Contains(strings.TrimSuffix(r.stderr, "\n"), "\n") {
				bad = append(bad, fmt.Sprintf("egress-snat %q: the message spans lines, want one:\n%s", tt.args, r.stderr))
			}
			report(t, "", bad)
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
				r := esWithin(t, l, relBadInputBound, cmd...)
				bad = append(bad, judge(t, cmd, r.code, exitUsage, r.stderr, r.stdout, tt.want)...)
			}
			cmd := []string{"check", "-f", path}
			r := esWithin(t, l, relBadInputBound, cmd...)
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

// relBadInputBound is how long one run on bad input may take: refusing is
// a matter of milliseconds, so this only catches a hang.
const relBadInputBound = 10 * time.Second

// esWithin is es for a run that must end within d: one that does not is
// killed and fails the test, instead of hanging it.
func esWithin(t *testing.T, l *lab.Lab, d time.Duration, args ...string) result {
	t.Helper()
	p := relStart(t, l, args...)
	code, ok := p.wait(d)
	if !ok {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		p.wait(d)
		t.Errorf("egress-snat %q: still running after %s, killed", args, d)
		return result{p.stdout.String(), p.stderr.String(), -1}
	}
	return result{p.stdout.String(), p.stderr.String(), code}
}

// TestBadInputIssue15 tries each row of issue #15's table on a host with
// rules of both families and foreign rules: every run ends within a bound,
// exits 2, leaves the ruleset as it was, and says what is wrong on one line
// (file content only as a short excerpt).
func TestBadInputIssue15(t *testing.T) {
	t.Parallel()
	l := newLab(t, lab.WithSecondNIC())
	relForeignRules(t, l)
	install := func(t *testing.T) {
		t.Helper()
		mustES(t, l, "clear")
		mustES(t, l, "set", "--to", "192.0.2.23")
		mustES(t, l, "set", "--to", "2001:db8::23", "--dst", "2001:db8:ffff::4")
		mustES(t, l, "rotate", "--pool", "192.0.2.22,192.0.2.23", "--dst", "198.51.100.4")
	}
	install(t)
	before := l.Ruleset(t)

	dir := t.TempDir()
	fifo := filepath.Join(dir, "partners.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	viaFIFO := relWrite(t, dir, "fifo.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: partners.fifo\n")
	relWrite(t, dir, "shadow", relShadowLine)
	viaShadow := relWrite(t, dir, "shadow.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: shadow\n")
	good := relWrite(t, dir, "good.yaml", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n")
	twice := relWrite(t, dir, "twice.yaml", "rules:\n  - to: [192.0.2.22, 192.0.2.22]\n    dst: [198.51.100.4]\n")
	twiceSpread := relWrite(t, dir, "twice-spread.yaml", "rules:\n  - to: [192.0.2.22, 192.0.2.22]\n    spread: true\n    dst: [198.51.100.4]\n")

	type run struct {
		args    []string
		want    []string // in stderr
		notWant []string // must not be in stderr
	}
	rows := []struct {
		name string
		runs []run
	}{
		{"dst-file names a FIFO with no writer", []run{
			{[]string{"apply", "-f", viaFIFO}, []string{`partners.fifo"`, "not a regular file", "named pipe"}, nil},
			{[]string{"apply", "--dry-run", "-f", viaFIFO}, []string{"not a regular file"}, nil},
			{[]string{"check", "-f", viaFIFO}, []string{"not a regular file"}, nil},
			{[]string{"watch", "-f", viaFIFO}, []string{"not a regular file"}, nil},
			{[]string{"apply", "-f", fifo}, []string{`partners.fifo"`, "not a regular file"}, nil},
			{[]string{"--config", fifo, "check"}, []string{`partners.fifo"`, "not a regular file"}, nil},
			{[]string{"--config", fifo, "set", "--to", "192.0.2.22", "--dst", "198.51.100.5", "--permanent"}, []string{`partners.fifo"`, "not a regular file"}, nil},
			{[]string{"--config", fifo, "watch"}, []string{`partners.fifo"`, "not a regular file"}, nil},
		}},
		{"dst-file whose first line is not an address", []run{
			{[]string{"apply", "-f", viaShadow}, []string{`shadow" line 1`, `"root:$6$rounds=656000$AAAAAAAAAAAAAAAAAA"…`}, []string{"20228", strings.Repeat("A", 19)}},
			{[]string{"check", "-f", viaShadow}, []string{`"root:$6$rounds=656000$AAAAAAAAAAAAAAAAAA"…`}, []string{"20228"}},
			{[]string{"watch", "-f", viaShadow}, []string{`"root:$6$rounds=656000$AAAAAAAAAAAAAAAAAA"…`}, []string{"20228"}},
		}},
		{"--lock-timeout -1s", []run{
			{[]string{"--lock-timeout", "-1s", "set", "--to", "192.0.2.22", "--dst", "198.51.100.5"}, []string{"--lock-timeout -1s"}, nil},
			{[]string{"--lock-timeout", "-1s", "clear"}, []string{"--lock-timeout -1s"}, nil},
			{[]string{"--lock-timeout", "0s", "apply", "-f", good}, []string{"--lock-timeout 0s"}, nil},
			{[]string{"watch", "-f", good, "--settle", "-1s"}, []string{"--settle -1s"}, nil},
			{[]string{"watch", "-f", good, "--full-resync", "-5m"}, []string{"--full-resync -5m0s"}, nil},
			{[]string{"watch", "-f", good, "--resync", "0s"}, []string{"--resync 0s"}, nil},
			{[]string{"apply", "-f", good, "--confirm", "0s"}, []string{"--confirm 0s"}, nil},
			{[]string{"watch", "-f", good, "--verify-every", "-1s"}, []string{"--verify-every -1s"}, nil},
			{[]string{"--lock-timeout", "-1s", "watch", "-f", good}, []string{"--lock-timeout -1s"}, nil},
		}},
		{"a pool names an address twice", []run{
			{[]string{"rotate", "--pool", "192.0.2.22,192.0.2.22", "--dst", "198.51.100.4"}, []string{"--pool names 192.0.2.22 twice"}, nil},
			{[]string{"rotate", "--pool", "192.0.2.22,192.0.2.22"}, []string{"--pool names 192.0.2.22 twice"}, nil},
			{[]string{"set", "--to", "192.0.2.22,192.0.2.22", "--spread", "--dst", "198.51.100.4"}, []string{"--to names 192.0.2.22 twice"}, nil},
			{[]string{"apply", "-f", twice}, []string{"names 192.0.2.22 twice", "line 2"}, nil},
			{[]string{"apply", "-f", twiceSpread}, []string{"names 192.0.2.22 twice"}, nil},
			{[]string{"check", "-f", twice}, []string{"names 192.0.2.22 twice"}, nil},
			{[]string{"watch", "-f", twice}, []string{"names 192.0.2.22 twice"}, nil},
		}},
		{"a newline in --out", []run{
			{[]string{"set", "--to", "192.0.2.22", "--out", "eth0\nINJECTED text"}, []string{`"eth0\nINJECTED text"`}, nil},
			{[]string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4", "--out", "eth0\n"}, []string{`"eth0\n"`}, nil},
			{[]string{"explain", "--dst", "198.51.100.4", "--out", "eth0\nINJECTED"}, []string{`"eth0\nINJECTED"`}, nil},
		}},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			for _, r := range row.runs {
				res := esWithin(t, l, relBadInputBound, r.args...)
				if res.code != exitUsage {
					t.Errorf("egress-snat %q: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", r.args, res.code, exitUsage, res.stdout, res.stderr)
				}
				if strings.Contains(strings.TrimSuffix(res.stderr, "\n"), "\n") {
					t.Errorf("egress-snat %q: the message spans lines, want one:\n%s", r.args, res.stderr)
				}
				for _, w := range r.want {
					if !strings.Contains(res.stderr, w) {
						t.Errorf("egress-snat %q: stderr %q, want it to name %q", r.args, res.stderr, w)
					}
				}
				for _, w := range r.notWant {
					if strings.Contains(res.stderr, w) {
						t.Errorf("egress-snat %q: stderr %q quotes %q", r.args, res.stderr, w)
					}
				}
				if after := l.Ruleset(t); after != before {
					t.Errorf("egress-snat %q changed the ruleset (-before +after):\n%s", r.args, cmp.Diff(before, after))
					install(t)
				}
			}
		})
	}
}
