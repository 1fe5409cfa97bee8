package config

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

// TestRuleKeysAreRuleFields: RuleKeys, from which the man page's FILE
// FORMAT is generated, names exactly the keys Rule decodes, each with a
// type, a meaning and an example that decodes in a rule.
func TestRuleKeysAreRuleFields(t *testing.T) {
	var fields []string
	rt := reflect.TypeOf(Rule{})
	for i := range rt.NumField() {
		if tag := rt.Field(i).Tag.Get("yaml"); tag != "" {
			fields = append(fields, strings.Split(tag, ",")[0])
		}
	}
	var keys []string
	for _, k := range RuleKeys {
		keys = append(keys, k.Name)
		if k.Type == "" || k.Meaning == "" || !strings.HasPrefix(k.Example, k.Name+": ") {
			t.Errorf("key %s: want a type, a meaning and an example that starts with %q", k.Name, k.Name+": ")
		}
		// The example in a rule that has the other keys it needs.
		rule := map[string]string{"to": "to: 192.0.2.22", "dst": "dst: [198.51.100.4]"}
		rule[k.Name] = k.Example
		doc := "rules:\n  - " + rule["to"] + "\n    " + rule["dst"] + "\n"
		if k.Name != "to" && k.Name != "dst" {
			doc += "    " + k.Example + "\n"
		}
		if k.Name == "standby" { // only with from
			doc += "    from: [10.50.0.0/24]\n"
		}
		if k.Name == "spill" { // only with a list
			doc = "rules:\n  - to: [192.0.2.22, 192.0.2.23]\n    dst: [198.51.100.4]\n    " + k.Example + "\n"
		}
		if k.Name == "sticky" { // only with a pool
			doc = "rules:\n  - to: 2001:db8:1::/64\n    dst: [2001:db8:ffff::/48]\n    " + k.Example + "\n"
		}
		if _, err := Decode(strings.NewReader(doc)); err != nil {
			t.Errorf("key %s: its example does not decode in a rule: %v\n%s", k.Name, err, doc)
		}
	}
	slices.Sort(fields)
	slices.Sort(keys)
	if !slices.Equal(fields, keys) {
		t.Errorf("RuleKeys %v, Rule's fields %v: keep them in step", keys, fields)
	}
	if _, err := Decode(strings.NewReader("rules:\n  - to: 192.0.2.22\n    dts: [198.51.100.4]\n")); err == nil || !strings.Contains(err.Error(), "want "+ruleKeyList()) {
		t.Errorf("an unknown key: %v, want the keys listed", err)
	}
}

// TestExampleFileDecodes: the man page's example file is a valid file.
func TestExampleFileDecodes(t *testing.T) {
	f, err := Decode(strings.NewReader(ExampleFile))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for line := range strings.Lines(ExampleFile) {
		key, _, ok := strings.Cut(strings.TrimLeft(strings.TrimSpace(line), "- "), ":")
		if ok && isRuleKey(key) {
			seen[key] = true
		}
	}
	for _, k := range RuleKeys {
		if !seen[k.Name] && k.Name != "cgroup" { // cgroup needs one that exists: in a comment
			t.Errorf("the example file does not show %s", k.Name)
		}
	}
	if len(f.Rules) == 0 {
		t.Error("the example file has no rule")
	}
}
