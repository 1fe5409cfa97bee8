package lab

import (
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// depsList returns the CMD=PKG pairs scripts/lab.sh checks for verb (deps,
// for make demo, or test-deps, for make test and CI) as a map from command
// to package, installing nothing.
func depsList(t *testing.T, verb string) map[string]string {
	t.Helper()
	out, err := exec.Command("bash", "../../scripts/lab.sh", verb, "--list").Output()
	if err != nil {
		t.Fatalf("lab.sh %s --list: %v", verb, err)
	}
	m := map[string]string{}
	for _, line := range strings.Fields(string(out)) {
		cmd, pkg, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("lab.sh %s --list: %q is not CMD=PKG", verb, line)
		}
		m[cmd] = pkg
	}
	return m
}

func packages(m map[string]string) []string {
	var out []string
	for _, p := range m {
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// TestDemoDepsAreTheDemos: make demo (scripts/demo.sh: lab.sh deps)
// installs iptables, ipset and iproute2 and nothing else (no daemon such as
// docker.io or firewalld), every command the demo runs in the lab is among
// them, and make test (lab.sh test-deps) installs those and the tests' own.
func TestDemoDepsAreTheDemos(t *testing.T) {
	demo := depsList(t, "deps")
	if got, want := packages(demo), []string{"iproute2", "ipset", "iptables"}; !slices.Equal(got, want) {
		t.Errorf("make demo installs %v, want exactly %v", got, want)
	}

	script, err := os.ReadFile("../../scripts/demo.sh")
	if err != nil {
		t.Fatal(err)
	}
	runs := regexp.MustCompile(`exec (?:host|gw) ([a-z0-9]+)`).FindAllStringSubmatch(string(script), -1)
	if len(runs) == 0 {
		t.Fatal("found no command the demo runs in the lab: has demo.sh changed how it calls lab.sh exec?")
	}
	for _, m := range runs {
		if _, ok := demo[m[1]]; !ok && m[1] != "sh" {
			t.Errorf("demo.sh runs %s, which lab.sh deps does not install", m[1])
		}
	}

	test := depsList(t, "test-deps")
	for cmd, pkg := range demo {
		if test[cmd] != pkg {
			t.Errorf("test-deps lacks %s=%s, which the lab needs", cmd, pkg)
		}
	}
	for _, pkg := range []string{"docker.io", "firewalld", "dbus", "nftables", "conntrack", "tcpdump", "busybox-static"} {
		if !slices.Contains(packages(test), pkg) {
			t.Errorf("test-deps does not install %s, which the tests use", pkg)
		}
	}
}
