package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestNaturalRuleIsShown: a rule of the permanent file whose source is the
// natural one installs nothing, as documented; list and explain still show
// it, as "natural: no rule needed", instead of nothing.
func TestNaturalRuleIsShown(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	perm := writeFile(t, "rules:\n  - to: 2001:db8::250\n    dst: [2001:db8:ffff::4]\n  - to: 192.0.2.23\n    dst: [198.51.100.4]\n")
	out := mustES(t, l, "--config", perm, "apply", "-f", perm)
	if !strings.Contains(out, "1 added") {
		t.Errorf("apply: %q, want one rule added (the IPv6 one needs none)", out)
	}
	list := mustES(t, l, "--config", perm, "list")
	if !strings.Contains(list, "natural: no rule needed") || !strings.Contains(list, "2001:db8:ffff::4/128") {
		t.Errorf("list: %q, want the IPv6 rule as natural, no rule needed", list)
	}
	var rows struct {
		Rules []struct {
			Dst          string `json:"dst"`
			NoRuleNeeded bool   `json:"no_rule_needed"`
		} `json:"rules"`
	}
	if err := json.Unmarshal([]byte(mustES(t, l, "--config", perm, "list", "--json")), &rows); err != nil || len(rows.Rules) != 2 ||
		!rows.Rules[1].NoRuleNeeded || rows.Rules[1].Dst != "2001:db8:ffff::4/128" || rows.Rules[0].NoRuleNeeded {
		t.Errorf("list --json: %+v (%v), want the installed rule, then the natural one", rows, err)
	}
	if ex := mustES(t, l, "--config", perm, "explain", "--dst", "2001:db8:ffff::4"); !strings.Contains(ex, "the natural source: no rule needed") {
		t.Errorf("explain: %q, want the permanent file's rule named as needing none", ex)
	}
	// Without the permanent file nothing knows of it: as before.
	if ex := mustES(t, l, "explain", "--dst", "2001:db8:ffff::4"); !strings.Contains(ex, "no rule applies") {
		t.Errorf("explain without the file: %q, want no rule applies", ex)
	}
}
