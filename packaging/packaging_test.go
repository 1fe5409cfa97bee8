// Package packaging holds the Debian package's description (nfpm.yaml),
// maintainer scripts and shipped files; its test checks the files that the
// package installs for the operator to edit.
package packaging

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/config"
)

// TestExampleConfigIsValidAndHarmless: the /etc/egress-snat.yaml the
// package ships parses as apply -f reads it, and names no rule.
func TestExampleConfigIsValidAndHarmless(t *testing.T) {
	f, err := config.Load("egress-snat.yaml")
	if err != nil {
		t.Fatalf("the shipped /etc/egress-snat.yaml does not parse: %v", err)
	}
	if len(f.Rules) != 0 {
		t.Errorf("the shipped /etc/egress-snat.yaml names %d rules, want none (it must be harmless until edited)", len(f.Rules))
	}
	intents, err := f.Intents()
	if err != nil || len(intents) != 0 {
		t.Errorf("Intents() = %v, %v; want none, nil", intents, err)
	}
}

// TestConffilePointsAtTheManPage: the section of egress-snat(8) that the
// shipped /etc/egress-snat.yaml sends the operator to exists, and lists
// every key of a rule.
func TestConffilePointsAtTheManPage(t *testing.T) {
	conf, err := os.ReadFile("egress-snat.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`egress-snat\(8\), section ([A-Z][A-Z ]*[A-Z]),`).FindSubmatch(conf)
	if m == nil {
		t.Fatal("the shipped /etc/egress-snat.yaml names no section of egress-snat(8)")
	}
	page, err := os.ReadFile("../docs/man/egress-snat.8")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(page), "\n.SH "+string(m[1])+"\n")
	if !ok {
		t.Fatalf("egress-snat(8) has no section %s, which /etc/egress-snat.yaml points to", m[1])
	}
	section, _, _ = strings.Cut(section, "\n.SH ")
	for _, k := range config.RuleKeys {
		if !strings.Contains(section, `\fB`+strings.ReplaceAll(k.Name, "-", `\-`)+`\fR (`) {
			t.Errorf("egress-snat(8) section %s does not describe the key %s", m[1], k.Name)
		}
	}
}
