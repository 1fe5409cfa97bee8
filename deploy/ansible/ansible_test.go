// Package ansible holds the egress_snat Ansible role (roles/egress_snat);
// its test runs the role for real with Debian's ansible-playbook, -c local,
// inside a lab namespace, against the freshly built binary.
package ansible

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/internal/lab"
)

var bin string

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "egress-snat-ansible-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = "/usr/local/go/bin/go"
	}
	bin = filepath.Join(dir, "egress-snat")
	if out, err := exec.Command(goCmd, "build", "-o", bin, "../../cmd/egress-snat").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// play is one ansible-playbook run of the role in the lab's host namespace.
type play struct {
	t    *testing.T
	l    *lab.Lab
	dir  string // inventory, playbook, temp dirs, config file, binary
	conf string // where the role writes the desired state (never /etc)
}

func newPlay(t *testing.T, l *lab.Lab) *play {
	t.Helper()
	if _, err := exec.LookPath("ansible-playbook"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("ansible-playbook not found (.ci/run installs ansible-core)")
		}
		t.Skip("ansible-playbook not found (apt-get install ansible-core)")
	}
	dir := t.TempDir()
	p := &play{t: t, l: l, dir: dir, conf: filepath.Join(dir, "etc", "egress-snat.yaml")}
	for _, d := range []string{"etc", "sbin", "tmp", "home"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p.write("ansible.cfg", "[defaults]\n") // not the machine's or the user's
	p.write("inventory", "localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n")
	p.write("site.yml", `---
- name: Egress source addresses
  hosts: localhost
  gather_facts: false
  roles:
    - role: egress_snat
`)
	return p
}

func (p *play) write(name, content string) {
	p.t.Helper()
	if err := os.WriteFile(filepath.Join(p.dir, name), []byte(content), 0o644); err != nil {
		p.t.Fatal(err)
	}
}

// rule is one entry of egress_snat_rules.
type rule struct {
	To  string   `json:"to"`
	Dst []string `json:"dst"`
}

// run runs the role with rules and extra ansible-playbook flags, and
// returns the play's changed count and its output.
func (p *play) run(rules []rule, flags ...string) (int, string) {
	p.t.Helper()
	code, stdout, stderr := p.try(map[string]any{"egress_snat_rules": rules}, flags...)
	if code != 0 {
		p.t.Fatalf("ansible-playbook %v: exit %d\n%s\n%s", flags, code, stdout, stderr)
	}
	m := recap.FindStringSubmatch(stdout)
	if m == nil {
		p.t.Fatalf("ansible-playbook %v: no PLAY RECAP for localhost in:\n%s", flags, stdout)
	}
	changed, _ := strconv.Atoi(m[1])
	return changed, stdout
}

// binaryPath is where the role installs the binary (egress_snat_binary).
func (p *play) binaryPath() string { return filepath.Join(p.dir, "sbin", "egress-snat") }

// try runs the role with the test's variables, overridden by vars, and
// returns ansible-playbook's exit status and output.
func (p *play) try(vars map[string]any, flags ...string) (code int, stdout, stderr string) {
	p.t.Helper()
	all := map[string]any{
		"egress_snat_install":    "binary",
		"egress_snat_binary_src": bin,
		"egress_snat_binary":     p.binaryPath(),
		"egress_snat_config":     p.conf,
		"egress_snat_service":    false, // never touch the real host's systemd
		"egress_snat_rules":      []rule{},
	}
	maps.Copy(all, vars)
	b, err := json.Marshal(all)
	if err != nil {
		p.t.Fatal(err)
	}
	p.write("vars.json", string(b))
	roles, err := filepath.Abs("roles")
	if err != nil {
		p.t.Fatal(err)
	}
	args := []string{
		"ANSIBLE_ROLES_PATH=" + roles,
		"ANSIBLE_HOME=" + filepath.Join(p.dir, "home"),
		"ANSIBLE_LOCAL_TEMP=" + filepath.Join(p.dir, "tmp"),
		"ANSIBLE_REMOTE_TEMP=" + filepath.Join(p.dir, "tmp"),
		"ANSIBLE_NOCOLOR=1", "ANSIBLE_RETRY_FILES_ENABLED=0", "ANSIBLE_CONFIG=" + filepath.Join(p.dir, "ansible.cfg"),
		"TMPDIR=" + filepath.Join(p.dir, "tmp"),
		"ansible-playbook", "-i", filepath.Join(p.dir, "inventory"), filepath.Join(p.dir, "site.yml"),
		"-e", "@" + filepath.Join(p.dir, "vars.json"),
	}
	stdout, stderr, code = p.l.RunErr("env", append(args, flags...)...)
	return code, stdout, stderr
}

var recap = regexp.MustCompile(`(?m)^localhost\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0`)

// rows returns `egress-snat list --json`'s rules as JSON texts, sorted.
func rows(t *testing.T, l *lab.Lab) []string {
	t.Helper()
	var out struct {
		Rules []json.RawMessage `json:"rules"`
	}
	if err := json.Unmarshal([]byte(l.Run(t, bin, "list", "--json")), &out); err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, r := range out.Rules {
		s = append(s, string(r))
	}
	slices.Sort(s)
	return s
}

func wantSeen(t *testing.T, l *lab.Lab, want map[string]string) {
	t.Helper()
	for dst, src := range want {
		if got := l.SourceSeen(t, dst); got != src {
			t.Errorf("new connection to %s: far side saw %s, want %s", dst, got, src)
		}
	}
}

// TestRole runs the role four times in a lab: it applies the variables'
// rules (changed, and the far side sees the sources they name), a second
// run changes nothing (changed=0), --check --diff with a changed variable
// reports the change and shows the plan but changes nothing, and a real
// run with it changes exactly that rule.
func TestRole(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	p := newPlay(t, l)
	rules := []rule{
		{To: "192.0.2.22", Dst: []string{"198.51.100.4"}},
		{To: "192.0.2.23", Dst: []string{"203.0.113.7"}},
	}

	changed, out := p.run(rules)
	if changed == 0 {
		t.Errorf("first run: changed=0, want changes\n%s", out)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.23"})

	if changed, out := p.run(rules); changed != 0 {
		t.Errorf("second run with the same variables: changed=%d, want 0\n%s", changed, out)
	}

	before := rows(t, l)
	edited := []rule{rules[0], {To: "192.0.2.22", Dst: []string{"203.0.113.7"}}}
	changed, out = p.run(edited, "--check", "--diff")
	t.Logf("ansible-playbook --check --diff:\n%s", out)
	if changed == 0 {
		t.Errorf("--check with a changed variable: changed=0, want the change reported\n%s", out)
	}
	if !strings.Contains(out, "203.0.113.7/32") || !strings.Contains(out, "1 changed") {
		t.Errorf("--check --diff: want the plan (the changed rule and its summary) shown:\n%s", out)
	}
	if after := rows(t, l); !slices.Equal(after, before) {
		t.Errorf("--check changed the rules:\nbefore %v\nafter  %v", before, after)
	}
	wantSeen(t, l, map[string]string{"203.0.113.7": "192.0.2.23"})

	if changed, out := p.run(edited); changed == 0 {
		t.Errorf("run with a changed variable: changed=0\n%s", out)
	}
	after := rows(t, l)
	var gone, added []string
	for _, r := range before {
		if !slices.Contains(after, r) {
			gone = append(gone, r)
		}
	}
	for _, r := range after {
		if !slices.Contains(before, r) {
			added = append(added, r)
		}
	}
	if len(gone) != 1 || len(added) != 1 || !strings.Contains(added[0], "203.0.113.7") {
		t.Errorf("a changed variable must change exactly its rule:\nremoved %v\nadded   %v", gone, added)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "203.0.113.7": "192.0.2.22"})

	if changed, out := p.run(edited); changed != 0 {
		t.Errorf("second run with the changed variable: changed=%d, want 0\n%s", changed, out)
	}
}

// TestRoleCheckModeOnAFreshHost: --check --diff on a host without
// egress-snat does not fail on the missing binary: it reports that it would
// install it and shows the plan, made with a temporary copy of the binary,
// and leaves the host as it was (no binary, no file, no rule, no scratch
// left). After a real run, --check reports nothing to change. With
// egress_snat_install none and no binary, the role fails saying so.
func TestRoleCheckModeOnAFreshHost(t *testing.T) {
	l := lab.New(t)
	l.StartProbe(t)
	p := newPlay(t, l)
	rules := []rule{{To: "192.0.2.22", Dst: []string{"198.51.100.4"}}}
	before := l.Ruleset(t)

	changed, out := p.run(rules, "--check", "--diff")
	t.Logf("ansible-playbook --check --diff on a fresh host:\n%s", out)
	if changed == 0 {
		t.Errorf("--check on a fresh host: changed=0, want the install and the rule reported")
	}
	for _, want := range []string{"would install egress-snat (binary)", "198.51.100.4/32", "1 added"} {
		if !strings.Contains(out, want) {
			t.Errorf("--check --diff on a fresh host: want %q in the output", want)
		}
	}
	for _, path := range []string{p.binaryPath(), p.conf} {
		if _, err := os.Stat(path); err == nil {
			t.Errorf("--check created %s", path)
		}
	}
	if after := l.Ruleset(t); after != before {
		t.Errorf("--check changed the rules")
	}
	if left, _ := filepath.Glob(filepath.Join(p.dir, "tmp", "*.egress-snat")); len(left) > 0 {
		t.Errorf("--check left its scratch directory: %v", left)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})

	if changed, out := p.run(rules); changed == 0 {
		t.Errorf("the real run after --check: changed=0\n%s", out)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})
	changed, out = p.run(rules, "--check")
	if changed != 0 || strings.Contains(out, "would install") {
		t.Errorf("--check on the installed host: changed=%d, want 0 and no install reported\n%s", changed, out)
	}

	if err := os.Remove(p.binaryPath()); err != nil {
		t.Fatal(err)
	}
	code, stdout, _ := p.try(map[string]any{"egress_snat_install": "none", "egress_snat_rules": rules}, "--check")
	if code == 0 || !strings.Contains(stdout, "egress_snat_install is none, but "+p.binaryPath()+" does not exist") {
		t.Errorf("install none without the binary: exit %d, want a failure saying so:\n%s", code, stdout)
	}
}
