package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// TestConfigMapPassesApplyDryRun: the desired state shipped in
// deploy/kubernetes/configmap.yaml passes apply --dry-run on a host that
// has one of the addresses it names (the lab's host), and changes nothing.
// (deploy/kubernetes's own test decodes the manifests strictly; it cannot
// reach the lab, which is internal to this module.)
func TestConfigMapPassesApplyDryRun(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "kubernetes", "configmap.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	if err := yaml.Unmarshal(b, &cm); err != nil {
		t.Fatal(err)
	}
	content, ok := cm.Data["egress-snat.yaml"]
	if !ok {
		t.Fatal("configmap.yaml has no data key egress-snat.yaml")
	}
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	l := newLab(t)
	before := l.Ruleset(t)
	out := mustES(t, l, "apply", "--dry-run", "-f", path)
	t.Logf("apply --dry-run:\n%s", out)
	if !strings.Contains(out, "would add") {
		t.Errorf("apply --dry-run of the ConfigMap's file: want a rule to add, got:\n%s", out)
	}
	if after := l.Ruleset(t); after != before {
		t.Errorf("apply --dry-run changed the rules")
	}
}
