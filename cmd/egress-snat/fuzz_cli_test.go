package main

// FuzzCLI: the command line itself, fuzzed. Argument vectors run through
// the real urfave/cli app (newApp) with the kernel behind fakes: the
// iptables and ipset fakes of package snat, wrapped to check every payload
// they are given, a fake router for the selector, and an in-memory lock.
// scripts/fuzz.sh runs it for a bounded time; plain `go test` runs the
// seeds below and testdata/fuzz/FuzzCLI, without root.

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// An input is up to cliMaxRuns command lines separated by cliRunSep, each
// of arguments separated by cliArgSep, run in turn against the same fakes,
// so that sequences (set, then rotate, then unset) are explored too.
// "@DIR@" in an argument stands for the fuzz target's directory of files.
const (
	cliArgSep  = "\x00"
	cliRunSep  = "\x01"
	cliMaxRuns = 4
	// cliBound is how long one run may take: a run on fakes takes
	// milliseconds, so this only catches a hang.
	cliBound = 10 * time.Second
)

var cliSeeds = []string{
	// Good runs, so the fuzzer starts from payloads.
	"set\x00--to\x00192.0.2.22",
	"set\x00--to\x00192.0.2.22\x00--dst\x00198.51.100.4\x00--out\x00eth0",
	"set\x00--to\x00192.0.2.22,192.0.2.23\x00--spread\x00--dst\x00203.0.113.0/24\x00--json",
	"set\x00--to\x002001:db8::22\x00--dst\x002001:db8:ffff::/48\x00--dry-run",
	"set\x00--to\x00192.0.2.23\x01set\x00--to\x00192.0.2.22\x00--dst\x00198.51.100.4\x01unset\x00--dst\x00198.51.100.4\x01list",
	"set\x00--to\x00192.0.2.23\x00--permanent\x01save\x01clear\x01check",
	"rotate\x00--pool\x00192.0.2.22,192.0.2.23\x00--dst\x00198.51.100.4\x01rotate\x00--pool\x00192.0.2.22,192.0.2.23\x00--dst\x00198.51.100.4\x00--json",
	"rotate\x00--pool\x00192.0.2.22,192.0.2.23,192.0.2.24\x00--order\x00random",
	"apply\x00-f\x00@DIR@/good.yaml\x01check\x00-f\x00@DIR@/good.yaml\x01clear",
	"apply\x00--dry-run\x00-f\x00@DIR@/sets.yaml",
	"apply\x00-f\x00@DIR@/sets.yaml\x01check\x01list\x00--json",
	"explain\x00--dst\x00198.51.100.4",
	"explain\x00--dst\x00203.0.113.129\x00--out\x00eth1\x00--json",
	"--iptables-backend\x00legacy\x00--lock-timeout\x002s\x00set\x00--to\x00192.0.2.23",
	"--help",
	"set\x00--help",
	"help\x00set",
	"help\x00nope\nINJECTED line",
	"set\x00--to\x00203.0.113.130\x00--dst\x00198.51.100.0/24",
	"set\x00--to\x00203.0.113.130\x00--dst\x00198.51.100.0/24\x00--via\x00203.0.113.129\x01list\x01unset\x00--dst\x00198.51.100.0/24",
	"set\x00--to\x00192.0.2.22\x00--dst\x00198.51.100.4\x00--method\x00route\x01check",
	"set\x00--to\x00192.0.2.22\x00--uid\x000\x01set\x00--to\x00192.0.2.23\x00--from\x0010.0.0.0/8",
	"set\x00--to\x00203.0.113.130\x00--from\x0010.0.0.0/8\x00--dst\x00198.51.100.0/24\x01list\x01clear",
	"set\x00--to\x00203.0.113.130\x00--uid\x000\x00--dst\x00198.51.100.0/24\x01check",
	// Issue #15, each row.
	"apply\x00-f\x00@DIR@/fifo.yaml",
	"check\x00-f\x00@DIR@/fifo.yaml",
	"apply\x00-f\x00@DIR@/shadow.yaml",
	"--lock-timeout\x00-1s\x00set\x00--to\x00192.0.2.22",
	"--lock-timeout\x000s\x00clear",
	"rotate\x00--pool\x00192.0.2.22,192.0.2.22",
	"set\x00--to\x00192.0.2.22,192.0.2.22\x00--spread",
	"apply\x00-f\x00@DIR@/twice.yaml",
	"set\x00--to\x00192.0.2.22\x00--out\x00eth0\nINJECTED line",
	"set\x00--to\x00192.0.2.22\x00--dst\x00198.51.100.4\nINJECTED line",
	"set\x00--to\nINJECTED\x00192.0.2.22",
	// Other bad input.
	"set\x00--to\x00192.0.2.99",
	"set\x00--to\x00203.0.113.130\x00--dst\x00198.51.100.4",
	"set\x00--to\x00192.0.2.22\x00--out\x00nope0",
	"set\x00--to\x00192.0.2.22\x00--out\x00eth1\x00--dst\x00198.51.100.4",
	"apply\x00-f\x00/dev/zero",
	"apply\x00-f\x00@DIR@",
	"sett",
	"",
}

// cliFiles are written into the target's directory; fifo.yaml's dst-file
// is a named pipe with no writer.
var cliFiles = map[string]string{
	"good.yaml":   "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, 198.51.100.5]\n  - to: 2001:db8::23\n    dst: [2001:db8:ffff::/48]\n",
	"sets.yaml":   "rules:\n  - to: 192.0.2.22\n    dst-file: partners.txt\n  - to: [192.0.2.23, 192.0.2.24]\n    spread: true\n    dst: [203.0.113.0/28]\n",
	"twice.yaml":  "rules:\n  - to: [192.0.2.22, 192.0.2.22]\n    dst: [198.51.100.4]\n",
	"fifo.yaml":   "rules:\n  - to: 192.0.2.22\n    dst-file: partners.fifo\n",
	"shadow.yaml": "rules:\n  - to: 192.0.2.22\n    dst-file: shadow\n",
	"shadow":      "root:$6$rounds=656000$" + strings.Repeat("A", 86) + ":20228:0:99999:7:::\n",
	"partners.txt": "198.51.100.1\n198.51.100.2\n198.51.100.3\n198.51.100.4\n198.51.100.5\n" +
		"198.51.100.6\n198.51.100.7\n198.51.100.8\n198.51.100.9 # a comment\n198.51.100.128/25\n",
}

func FuzzCLI(f *testing.F) {
	dir := f.TempDir()
	for name, content := range cliFiles {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			f.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "partners.fifo"), 0o600); err != nil {
		f.Fatal(err)
	}
	// Nothing on the host can be run: a path the fakes do not cover (the
	// other backend's probe, ipset, nft) finds no command instead of
	// touching this machine's firewall.
	f.Setenv("PATH", f.TempDir())
	// The permanent file (--permanent, save) is the target's own, and is
	// removed before each input.
	permanent := filepath.Join(dir, "permanent.yaml")
	f.Setenv("EGRESS_SNAT_CONFIG", permanent)
	for _, s := range cliSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		input = strings.ReplaceAll(input, "@DIR@", dir)
		var runs [][]string
		for i, line := range strings.Split(input, cliRunSep) {
			if i == cliMaxRuns {
				break
			}
			args := strings.Split(line, cliArgSep)
			if !cliSafe(args, dir) {
				return
			}
			runs = append(runs, args)
		}
		os.Remove(permanent)
		h := newCLIHost()
		for _, args := range runs {
			h.run(t, args)
		}
	})
}

// TestCLIFakes: the fake host of FuzzCLI takes good command lines, so the
// fuzzer starts from runs that reach the payloads.
func TestCLIFakes(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	dir := t.TempDir()
	t.Setenv("EGRESS_SNAT_CONFIG", filepath.Join(dir, "permanent.yaml"))
	for name, content := range cliFiles {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	h := newCLIHost()
	for _, tt := range []struct {
		args []string
		code int
		want string // in the host's nat rules afterwards
	}{
		{[]string{"set", "--to", "192.0.2.23"}, 0, "--to-source 192.0.2.23"},
		{[]string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4"}, 0, "-d 198.51.100.4/32"},
		{[]string{"rotate", "--pool", "192.0.2.24,192.0.2.25", "--dst", "198.51.100.4"}, 0, "--to-source 192.0.2.24"},
		{[]string{"apply", "-f", filepath.Join(dir, "sets.yaml")}, 0, "--match-set"},
		{[]string{"check", "-f", filepath.Join(dir, "sets.yaml")}, 0, "--match-set"},
		{[]string{"set", "--to", "192.0.2.99"}, exitUsage, "--match-set"},
		{[]string{"--lock-timeout", "-1s", "clear"}, exitUsage, "--match-set"},
		{[]string{"set", "--to", "203.0.113.130", "--dst", "198.51.100.0/24"}, 0, "7420"},
		{[]string{"unset", "--dst", "198.51.100.0/24"}, 0, "--match-set"},
		{[]string{"clear"}, 0, ""},
	} {
		code, msg, _ := h.run(t, tt.args)
		if code != tt.code {
			t.Errorf("egress-snat %q: exit %d, want %d (%s)", tt.args, code, tt.code, msg)
		}
		if rules := h.snapshot(); !strings.Contains(rules, tt.want) || (tt.want == "" && strings.Contains(rules, "EGRESS-SNAT")) {
			t.Errorf("egress-snat %q: the host has\n%s\nwant %q", tt.args, rules, tt.want)
		}
	}
	if h.tables.fake.Restores[snat.IPv4] == 0 {
		t.Error("no iptables-restore reached the fake")
	}
}

// cliSafe says whether args may run in this process. watch runs until a
// signal; verify and stats start real flows or read the kernel's conntrack
// table, as --flush-conntrack writes it; --confirm and confirm keep a record
// under /run and start a reverter; --config names the permanent file,
// which is the target's own (EGRESS_SNAT_CONFIG); ha writes the
// machine's keepalived, conntrackd and drain files (ha_test.go runs it on
// temporary ones); a path
// outside the target's directory could name a device or a pseudo-file
// whose reading has effects (a prefix's "/24" is not a path).
func cliSafe(args []string, dir string) bool {
	for _, a := range args {
		switch a {
		case "watch", "verify", "__verify-flow", "stats", "__revert", "ha":
			return false
		}
		if strings.Contains(a, "flush-conntrack") || strings.Contains(a, "netns") || strings.Contains(a, "confirm") || strings.Contains(a, "config") {
			return false
		}
		// A path has a '/' before a name ("/dev", "../x"); a prefix
		// has one before its length.
		rest := strings.ReplaceAll(a, dir+"/", "")
		for i := strings.IndexByte(rest, '/'); i >= 0 && i+1 < len(rest); i = strings.IndexByte(rest, '/') {
			if c := rest[i+1]; c == '.' || c == '_' || c == '~' || c == '/' || (c|0x20 >= 'a' && c|0x20 <= 'z') {
				return false
			}
			rest = rest[i+1:]
		}
	}
	return true
}

// cliHost is one fake host: its tables, sets and routes, shared by the
// runs of one input.
type cliHost struct {
	tables  *checkedTables
	sets    *checkedSets
	routing *checkedRouting
	router  *fakeRouter
}

func newCLIHost() *cliHost {
	return &cliHost{
		tables:  &checkedTables{fake: iptables.NewFakeTables()},
		sets:    &checkedSets{fake: iptables.NewFakeIPSets()},
		routing: &checkedRouting{fake: routes.NewFake()},
		router:  newFakeRouter(),
	}
}

// run runs one command line, checks what it did, and returns its exit
// status, its error message and its output.
func (h *cliHost) run(t *testing.T, args []string) (code int, msg, stdout string) {
	t.Helper()
	before := h.snapshot()
	h.tables.bad, h.sets.bad, h.routing.bad = nil, nil, nil
	app := newApp()
	app.Before = nil // --netns would re-execute this process
	var out, errOut strings.Builder
	app.Writer, app.ErrWriter = &lockedWriter{w: &out}, &lockedWriter{w: &errOut}
	saved := envFor
	envFor = func(c *cli.Context) (*env, error) {
		return &env{
			sel:         h.router,
			paths:       h.router,
			mgr:         &snat.Manager{Backend: &iptables.Backend{Tables: h.tables, Sets: h.sets}, Routing: h.routing, Locker: noLock{}},
			flavour:     iptables.FlavourNFT,
			lockTimeout: c.Duration("lock-timeout"),
			out:         c.App.Writer,
		}, nil
	}
	defer func() { envFor = saved }()

	type result struct {
		err   error
		panic any
	}
	done := make(chan result, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				done <- result{panic: p}
			}
		}()
		done <- result{err: tidyExit(app, app.Run(append([]string{"egress-snat"}, args...)))}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(cliBound):
		t.Fatalf("egress-snat %q: still running after %s", args, cliBound)
	}
	if r.panic != nil {
		t.Fatalf("egress-snat %q: panic: %v", args, r.panic)
	}
	if r.err != nil {
		code, msg = exitCode(r.err), r.err.Error()
	}
	if code != exitOK && code != exitFailure && code != exitUsage {
		t.Fatalf("egress-snat %q: exit %d, want 0, 1 or 2 (%s)", args, code, msg)
	}
	for _, bad := range slices.Concat(h.tables.bad, h.sets.bad, h.routing.bad) {
		t.Errorf("egress-snat %q: %s", args, bad)
	}
	if code == exitUsage && h.snapshot() != before {
		t.Errorf("egress-snat %q: exit 2 (bad input), but the host changed (%s)", args, msg)
	}
	// A value with a newline is echoed quoted: what follows the newline
	// never starts a line of the message.
	for _, a := range args {
		for _, injected := range strings.Split(a, "\n")[1:] {
			if len(injected) >= 4 && (strings.Contains(msg, "\n"+injected) || strings.Contains(errOut.String(), "\n"+injected)) {
				t.Errorf("egress-snat %q: the text after a newline in a value is a line of the message:\n%s%s", args, msg, errOut.String())
			}
		}
	}
	return code, msg, out.String()
}

func (h *cliHost) snapshot() string {
	var b strings.Builder
	for _, f := range snat.Families {
		s, _ := h.tables.fake.Save(f)
		b.WriteString(s)
	}
	s, _ := h.sets.fake.Save()
	b.WriteString(s)
	for _, is4 := range []bool{true, false} {
		st, _ := h.routing.fake.Read(is4)
		fmt.Fprintf(&b, "%v\n", st)
	}
	return b.String()
}

// lockedWriter lets a run that the bound gave up on keep writing safely.
type lockedWriter struct {
	mu sync.Mutex
	w  *strings.Builder
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

type noLock struct{}

func (noLock) Lock(time.Duration) (func(), error) { return func() {}, nil }

// The payload grammar: what egress-snat may ever hand to iptables-restore
// and ipset restore, whatever its input.
//
//   - A payload is lines, each ended by "\n", of printable ASCII (0x20 to
//     0x7e): no NUL, tab, CR or newline inside a line, nothing outside ASCII.
//   - iptables-restore: "*nat" or "*mangle", then lines ":CHAIN - [0:0]",
//     "-I HOOK 1 RULE", "-D HOOK RULE", "-A CHAIN RULE" or "-X CHAIN", then
//     "COMMIT", where CHAIN is one of ours (EGRESS-SNAT, EGRESS-SNAT-FWD,
//     EGRESS-SNAT-OUT) and HOOK is POSTROUTING, PREROUTING or OUTPUT. A
//     RULE is options from
//     restoreOptions, each with the values its check accepts (an interface
//     name for -o, a prefix for -s and -d, an address for --to-source, a set
//     name for --match-set, ...), and ends with a -j target.
//   - ipset restore: "create NAME hash:net family inet|inet6 hashsize N
//     maxelem N", "add|del NAME PREFIX [nomatch]", "destroy|flush NAME",
//     "swap NAME NAME", where NAME is iptables.SetPrefix and then up to 31
//     characters in all of [A-Za-z0-9_.:-].
//   - ip -batch: "route replace|del DST [via ADDR] [dev IFACE] [src ADDR]
//     table N proto N" (DST a prefix or "default") and "rule add|del pref N
//     [not fwmark HEX] [from PREFIX] lookup N [suppress_prefixlength N]
//     protocol N", the table and preference ours (routes.OurTable,
//     routes.Ours; a rule may look up main, 254).
//
// A value with a newline in it would cut a line in two, and neither half
// would be a line of the grammar; an option the grammar does not know
// fails the fuzz target until it is added here with a check of its value.
var (
	// ipsetName is one of ours, within ipset's 31 characters.
	ipsetName = regexp.MustCompile(`^` + regexp.QuoteMeta(iptables.SetPrefix) + `[A-Za-z0-9_.:~-]{1,` + strconv.Itoa(31-len(iptables.SetPrefix)) + `}$`)
	ipsetLine = regexp.MustCompile(`^(create [^ ]+ hash:net family inet6? hashsize [0-9]+ maxelem [0-9]+|(add|del) [^ ]+ [0-9a-f.:/]+( nomatch)?|(destroy|flush) [^ ]+|swap [^ ]+ [^ ]+)$`)
	number    = regexp.MustCompile(`^[0-9]{1,10}$`)
	markMask  = regexp.MustCompile(`^0x[0-9a-f]{1,8}/0x[0-9a-f]{1,8}$`)
)

// restoreOptions are the options a RULE may have, each with a check of each
// of its values.
var restoreOptions = map[string][]func(string) bool{
	"-s": {isPrefix},
	"-d": {isPrefix},
	"-o": {func(v string) bool { return config.CheckInterface(v) == nil }},
	"-m": {func(v string) bool {
		return slices.Contains([]string{"comment", "set", "statistic", "owner", "cgroup", "addrtype", "mark"}, v)
	}},
	"--comment":   {func(v string) bool { return v == iptables.Comment }},
	"--match-set": {ipsetName.MatchString, func(v string) bool { return v == "dst" }},
	"--mode":      {func(v string) bool { return v == "nth" }},
	"--every":     {number.MatchString},
	"--packet":    {number.MatchString},
	"--uid-owner": {number.MatchString},
	"--path":      {func(v string) bool { p, err := snat.ParseCgroupPath(v); return err == nil && p == v }},
	"!":           {}, // negates the option after it
	"--src-type":  {func(v string) bool { return v == "LOCAL" }},
	"-j": {func(v string) bool {
		return v == "SNAT" || v == "RETURN" || v == "MARK" || v == "CONNMARK" || ourChain.MatchString(v)
	}},
	"--restore-mark": {},
	"--save-mark":    {},
	"--nfmask":       {func(v string) bool { return v == "0x7f000000" }},
	"--ctmask":       {func(v string) bool { return v == "0x7f000000" }},
	"--mark":         {markMask.MatchString},
	"--set-xmark":    {markMask.MatchString},
	"--to-source":    {func(v string) bool { _, err := netip.ParseAddr(v); return err == nil }},
}

func isPrefix(v string) bool {
	p, err := netip.ParsePrefix(v)
	return err == nil && p.Masked() == p
}

func payloadLines(payload string) ([]string, error) {
	if !strings.HasSuffix(payload, "\n") {
		return nil, fmt.Errorf("payload does not end with a newline: %q", payload)
	}
	lines := strings.Split(strings.TrimSuffix(payload, "\n"), "\n")
	for n, l := range lines {
		for i := 0; i < len(l); i++ {
			if l[i] < 0x20 || l[i] > 0x7e {
				return nil, fmt.Errorf("line %d: byte %#x outside the payload grammar: %q", n+1, l[i], l)
			}
		}
	}
	return lines, nil
}

// ourChain is the name of one of our chains: the nat chain, and the mangle
// chains (EGRESS-SNAT-FWD, EGRESS-SNAT-OUT) that mark senders' traffic.
var ourChain = regexp.MustCompile(`^` + regexp.QuoteMeta(iptables.ChainName) + `(-[A-Z]{1,8})?$`)

// checkRestore returns what is wrong with an iptables-restore payload.
func checkRestore(payload string) error {
	lines, err := payloadLines(payload)
	if err != nil {
		return err
	}
	if len(lines) < 3 || (lines[0] != "*nat" && lines[0] != "*mangle") || lines[len(lines)-1] != "COMMIT" {
		return fmt.Errorf("iptables-restore payload is not *nat or *mangle, our chains and rules, COMMIT:\n%s", payload)
	}
	for n, l := range lines[1 : len(lines)-1] {
		if err := checkRestoreLine(l); err != nil {
			return fmt.Errorf("iptables-restore line %d outside the grammar: %v: %q", n+2, err, l)
		}
	}
	return nil
}

func checkRestoreLine(l string) error {
	if chain, ok := strings.CutPrefix(l, ":"); ok {
		if name, ok := strings.CutSuffix(chain, " - [0:0]"); ok && ourChain.MatchString(name) {
			return nil
		}
		return errors.New("not a declaration of one of our chains")
	}
	if chain, ok := strings.CutPrefix(l, "-X "); ok && ourChain.MatchString(chain) {
		return nil
	}
	w := strings.Split(l, " ")
	var rule []string
	switch {
	case len(w) > 3 && w[0] == "-I" && slices.Contains(hooks, w[1]) && w[2] == "1":
		rule = w[3:]
	case len(w) > 2 && w[0] == "-D" && slices.Contains(hooks, w[1]):
		rule = w[2:]
	case len(w) > 2 && w[0] == "-A" && ourChain.MatchString(w[1]):
		rule = w[2:]
	default:
		return errors.New("not -I HOOK 1, -D HOOK, -A or -X of our chains")
	}
	target := false
	for i := 0; i < len(rule); {
		checks, ok := restoreOptions[rule[i]]
		if !ok {
			return fmt.Errorf("option %q", rule[i])
		}
		if i+len(checks) >= len(rule) {
			return fmt.Errorf("%s without its values", rule[i])
		}
		for k, check := range checks {
			if v := rule[i+1+k]; !check(v) {
				return fmt.Errorf("value %q of %s", v, rule[i])
			}
		}
		target = target || rule[i] == "-j"
		i += 1 + len(checks)
	}
	if !target {
		return errors.New("no -j target")
	}
	return nil
}

// hooks are the built-in chains that jump to ours.
var hooks = []string{"POSTROUTING", "PREROUTING", "OUTPUT"}

// batchOptions are the options of an ip -batch line after its object,
// verb and (for a route) destination, each with a check of its value.
var batchOptions = map[string]func(string) bool{
	"via":                   func(v string) bool { _, err := netip.ParseAddr(v); return err == nil },
	"src":                   func(v string) bool { _, err := netip.ParseAddr(v); return err == nil },
	"dev":                   func(v string) bool { return config.CheckInterface(v) == nil },
	"table":                 func(v string) bool { n, err := strconv.Atoi(v); return err == nil && routes.OurTable(n) },
	"lookup":                func(v string) bool { n, err := strconv.Atoi(v); return err == nil && (routes.OurTable(n) || n == 254) },
	"pref":                  func(v string) bool { n, err := strconv.Atoi(v); return err == nil && routes.Ours(n) },
	"proto":                 number.MatchString,
	"protocol":              number.MatchString,
	"from":                  isPrefix,
	"fwmark":                regexp.MustCompile(`^0x[0-9a-f]{1,8}(/0x[0-9a-f]{1,8})?$`).MatchString,
	"goto":                  func(v string) bool { n, err := strconv.Atoi(v); return err == nil && routes.Ours(n) },
	"nop":                   nil, // no value
	"suppress_prefixlength": number.MatchString,
}

// checkBatch returns what is wrong with an ip -batch input.
func checkBatch(input string) error {
	lines, err := payloadLines(input)
	if err != nil {
		return err
	}
	for n, l := range lines {
		w := strings.Split(l, " ")
		var opts []string
		switch {
		case len(w) >= 3 && w[0] == "route" && (w[1] == "replace" || w[1] == "del") && (w[2] == "default" || isPrefix(w[2])):
			opts = w[3:]
		case len(w) >= 2 && w[0] == "rule" && (w[1] == "add" || w[1] == "del"):
			opts = w[2:]
			if len(opts) >= 3 && opts[2] == "not" {
				opts = append(opts[:2:2], opts[3:]...)
			}
		default:
			return fmt.Errorf("ip -batch line %d outside the grammar: %q", n+1, l)
		}
		target := false
		for i := 0; i < len(opts); i += 2 {
			check, ok := batchOptions[opts[i]]
			target = target || slices.Contains([]string{"table", "lookup", "goto", "nop"}, opts[i])
			switch {
			case ok && check == nil:
				i-- // an option without a value
			case !ok || i+1 >= len(opts) || !check(opts[i+1]):
				return fmt.Errorf("ip -batch line %d: option %q outside the grammar: %q", n+1, opts[i], l)
			}
		}
		if !target {
			return fmt.Errorf("ip -batch line %d names no table, goto or nop: %q", n+1, l)
		}
	}
	return nil
}

// checkIPSet returns what is wrong with an ipset restore payload.
func checkIPSet(payload string) error {
	lines, err := payloadLines(payload)
	if err != nil {
		return err
	}
	for n, l := range lines {
		if !ipsetLine.MatchString(l) {
			return fmt.Errorf("ipset line %d outside the grammar: %q", n+1, l)
		}
		w := strings.Fields(l)
		names := w[1:2]
		if w[0] == "swap" {
			names = w[1:3]
		}
		for _, name := range names {
			if !ipsetName.MatchString(name) {
				return fmt.Errorf("ipset line %d: set name %q", n+1, name)
			}
		}
		if (w[0] == "add" || w[0] == "del") && !isPrefix(w[2]) {
			return fmt.Errorf("ipset line %d: member %q", n+1, w[2])
		}
	}
	return nil
}

// TestPayloadGrammar: the grammar FuzzCLI checks payloads against takes
// what egress-snat writes and refuses what a value with a newline, a blank
// or a stray byte would make of it.
func TestPayloadGrammar(t *testing.T) {
	head, tail := "*nat\n:EGRESS-SNAT - [0:0]\n", "COMMIT\n"
	good := "-A EGRESS-SNAT -s 192.0.2.250/32 -d 198.51.100.4/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22\n"
	if err := checkRestore(head + "-I POSTROUTING 1 -m comment --comment egress-snat -j EGRESS-SNAT\n" + good + tail); err != nil {
		t.Errorf("good payload refused: %v", err)
	}
	for _, bad := range []string{
		strings.Replace(good, "eth0", "eth0\n-F POSTROUTING", 1),
		strings.Replace(good, "eth0", "eth0\n-A EGRESS-SNAT -o eth0 -j RETURN", 1),
		strings.Replace(good, "eth0", "eth 0", 1),
		strings.Replace(good, "eth0", "eth0\t", 1),
		strings.Replace(good, "egress-snat -j", "\"egress snat\" -j", 1),
		strings.Replace(good, "192.0.2.22", "192.0.2.22 --random", 1),
		strings.Replace(good, " -j SNAT --to-source 192.0.2.22", "", 1),
		strings.Replace(good, "-A EGRESS-SNAT", "-A POSTROUTING", 1),
		"-F POSTROUTING\n",
	} {
		if err := checkRestore(head + bad + tail); err == nil {
			t.Errorf("payload accepted:\n%s", bad)
		}
	}
	if err := checkRestore(good); err == nil {
		t.Error("payload without *nat and COMMIT accepted")
	}
	goodBatch := "route replace 198.51.100.0/24 via 203.0.113.129 dev eth1 src 203.0.113.130 table 7420 proto 83\n" +
		"rule add pref 7421 lookup 254 suppress_prefixlength 0 protocol 83\n" +
		"rule add pref 7420 not fwmark 0x1cfc lookup 7420 protocol 83\n" +
		"route del default table 7422 proto 83\n"
	if err := checkBatch(goodBatch); err != nil {
		t.Errorf("good ip -batch input refused: %v", err)
	}
	for _, bad := range []string{
		"route replace 198.51.100.0/24 dev eth1\nINJECTED table 7420 proto 83\n",
		"route replace 198.51.100.0/24 dev eth1 table 254 proto 83\n",
		"route replace 198.51.100.0/24 dev eth1 proto 83\n",
		"rule add pref 100 lookup 7420 protocol 83\n",
		"route flush table 7420\n",
		"route replace 198.51.100.1/24 dev eth1 table 7420 proto 83\n",
	} {
		if err := checkBatch(bad); err == nil {
			t.Errorf("ip -batch input accepted: %q", bad)
		}
	}
	if err := checkIPSet("create egress-snat4-0123456789ab hash:net family inet hashsize 1024 maxelem 65536\nadd egress-snat4-0123456789ab 198.51.100.0/24\nadd egress-snat4-0123456789ab 198.51.100.4/32 nomatch\ndestroy egress-snat4-0123456789ab\n"); err != nil {
		t.Errorf("good ipset payload refused: %v", err)
	}
	for _, bad := range []string{
		"add egress-snat4-x 198.51.100.4/32\n\n",
		"add egress-snat4-x 198.51.100.4/32\ndestroy docker\n",
		"add egress-snat4-x 198.51.100.1/24\n",
		"add egress-snat4-x 198.51.100.4/32 timeout 5\n",
		"flush\n",
		"add egress-snat4-x 198.51.100.4/32",
	} {
		if err := checkIPSet(bad); err == nil {
			t.Errorf("ipset payload accepted: %q", bad)
		}
	}
}

// checkedTables checks every payload against the grammar before the fake
// applies it.
type checkedTables struct {
	fake *iptables.FakeTables
	bad  []string
}

func (c *checkedTables) Save(f snat.Family) (string, error) { return c.fake.Save(f) }
func (c *checkedTables) Restore(f snat.Family, payload string) error {
	if err := checkRestore(payload); err != nil {
		c.bad = append(c.bad, err.Error())
	}
	return c.fake.Restore(f, payload)
}
func (c *checkedTables) SaveNAT(f snat.Family) (string, error) { return c.fake.SaveNAT(f) }
func (c *checkedTables) SaveNATCounters(f snat.Family) (string, error) {
	return c.fake.SaveNATCounters(f)
}
func (c *checkedTables) Generation(f snat.Family) (uint64, error)   { return c.fake.Generation(f) }
func (c *checkedTables) DropTable(f snat.Family, name string) error { return c.fake.DropTable(f, name) }
func (c *checkedTables) CanDropTable() bool                         { return c.fake.CanDropTable() }

func (c *checkedSets) Headers() (map[string]int, error) { return c.fake.Headers() }

// checkedRouting checks every ip -batch input against the grammar before
// the fake applies it.
type checkedRouting struct {
	fake *routes.Fake
	bad  []string
}

func (c *checkedRouting) Read(is4 bool) (routes.State, error)     { return c.fake.Read(is4) }
func (c *checkedRouting) Rules(is4 bool) ([]routes.IPRule, error) { return c.fake.Rules(is4) }
func (c *checkedRouting) Batch(is4 bool, input string) error {
	if err := checkBatch(input); err != nil {
		c.bad = append(c.bad, err.Error())
	}
	return c.fake.Batch(is4, input)
}

type checkedSets struct {
	fake *iptables.FakeIPSets
	bad  []string
}

func (c *checkedSets) Save() (string, error) { return c.fake.Save() }
func (c *checkedSets) Restore(payload string) error {
	if err := checkIPSet(payload); err != nil {
		c.bad = append(c.bad, err.Error())
	}
	return c.fake.Restore(payload)
}

// fakeRouter is a host with two interfaces: eth0 (192.0.2.0/24 with the
// natural source .250 and .22 to .25; 2001:db8::/64 with ::250, ::22,
// ::23), the default route, and eth1 (203.0.113.128/25 with .130).
type fakeRouter struct {
	owner map[netip.Addr]string
}

func newFakeRouter() *fakeRouter {
	r := &fakeRouter{owner: map[netip.Addr]string{}}
	for _, a := range []string{"192.0.2.250", "192.0.2.22", "192.0.2.23", "192.0.2.24", "192.0.2.25", "2001:db8::250", "2001:db8::22", "2001:db8::23"} {
		r.owner[netip.MustParseAddr(a)] = "eth0"
	}
	r.owner[netip.MustParseAddr("203.0.113.130")] = "eth1"
	return r
}

var eth1Net = netip.MustParsePrefix("203.0.113.128/25")

func (r *fakeRouter) route(dst netip.Prefix) (string, netip.Addr, netip.Prefix) {
	switch {
	case dst.Addr().Is4() && eth1Net.Overlaps(dst) && dst.Bits() >= eth1Net.Bits():
		return "eth1", netip.MustParseAddr("203.0.113.130"), eth1Net
	case dst.Addr().Is4():
		return "eth0", netip.MustParseAddr("192.0.2.250"), netip.MustParsePrefix("0.0.0.0/0")
	}
	return "eth0", netip.MustParseAddr("2001:db8::250"), netip.MustParsePrefix("::/0")
}

func (r *fakeRouter) Natural(dst netip.Prefix, out string) (string, netip.Addr, error) {
	c, err := r.Lookup(dst, out)
	if err != nil {
		return "", netip.Addr{}, err
	}
	return c.Interface, c.Source, nil
}

func (r *fakeRouter) Owner(a netip.Addr) (string, error) {
	if iface, ok := r.owner[a]; ok {
		return iface, nil
	}
	return "", fmt.Errorf("%s: %w", a, selector.ErrNotLocal)
}

func (r *fakeRouter) Lookup(dst netip.Prefix, out string) (*selector.Choice, error) {
	if !dst.IsValid() {
		return nil, fmt.Errorf("%s: %w", dst, selector.ErrNoRoute)
	}
	iface, src, route := r.route(dst)
	if out != "" && out != "eth0" && out != "eth1" {
		return nil, fmt.Errorf("interface %s: %w", strconv.Quote(out), selector.ErrNoRoute)
	}
	if out != "" && out != iface {
		return nil, fmt.Errorf("traffic to %s leaves by %s, not %q: %w", dst, iface, out, selector.ErrNoRoute)
	}
	return &selector.Choice{Dst: dst, Probe: dst.Addr(), Table: 254, Route: route, Interface: iface, Source: src}, nil
}

func (r *fakeRouter) Path(dst netip.Prefix, out string) (string, netip.Addr, netip.Addr, error) {
	iface, src, err := r.Natural(dst, out)
	if err != nil {
		return "", netip.Addr{}, netip.Addr{}, err
	}
	return iface, r.gateway(iface, dst.Addr().Is4()), src, nil
}

// gateway is the one gateway of each interface and family.
func (r *fakeRouter) gateway(iface string, is4 bool) netip.Addr {
	switch {
	case iface == "eth1" && is4:
		return netip.MustParseAddr("203.0.113.129")
	case iface == "eth0" && is4:
		return netip.MustParseAddr("192.0.2.1")
	case iface == "eth0":
		return netip.MustParseAddr("2001:db8::1")
	}
	return netip.Addr{}
}

func (r *fakeRouter) Gateways(iface string, is4 bool, _ func(table int) bool) ([]netip.Addr, error) {
	if iface != "eth0" && iface != "eth1" {
		return nil, fmt.Errorf("interface %q: %w", iface, selector.ErrNoRoute)
	}
	if gw := r.gateway(iface, is4); gw.IsValid() {
		return []netip.Addr{gw}, nil
	}
	return nil, nil
}

func (r *fakeRouter) OnLink(iface string, a netip.Addr) (bool, error) {
	switch iface {
	case "eth0":
		return netip.MustParsePrefix("192.0.2.0/24").Contains(a) || netip.MustParsePrefix("2001:db8::/64").Contains(a), nil
	case "eth1":
		return eth1Net.Contains(a), nil
	}
	return false, fmt.Errorf("interface %q: %w", iface, selector.ErrNoRoute)
}

// PrefixUse: the host uses 2001:db8::/64 on eth0 (its addresses and the
// link), nothing else.
func (r *fakeRouter) PrefixUse(p netip.Prefix, _ func(int) bool) (selector.PrefixUse, error) {
	var u selector.PrefixUse
	for a, iface := range r.owner {
		if p.Contains(a) {
			u.Addrs = append(u.Addrs, selector.PrefixAddr{Addr: netip.PrefixFrom(a, a.BitLen()), Iface: iface})
		}
	}
	if eth0 := netip.MustParsePrefix("2001:db8::/64"); eth0.Overlaps(p) {
		u.OnLink = append(u.OnLink, selector.OnLinkRoute{Route: eth0, Table: 254, Iface: "eth0"})
	}
	return u, nil
}

func (r *fakeRouter) Forget() {}

func (r *fakeRouter) Deprecated(netip.Addr) bool { return false }
