// Package packaging holds the Debian package's description (nfpm.yaml),
// maintainer scripts and shipped files; its test checks the files that the
// package installs for the operator to edit.
package packaging

import (
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
