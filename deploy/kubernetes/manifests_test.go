// Package kubernetes holds the DaemonSet, ConfigMap and Dockerfile that run
// egress-snat watch on every node of a cluster. Its test validates the
// manifests offline: strictly decoded into the k8s.io/api types (a
// misspelt or misplaced field fails), the security settings the README
// promises, and the ConfigMap's file as apply -f reads it. Only this test
// imports k8s.io/api; the binary does not.
package kubernetes

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/egress-snat/egress-snat/config"
)

// decodeStrict converts one YAML document to JSON and decodes it into v,
// refusing fields v's type does not have, as kubectl --validate=strict does.
func decodeStrict(doc any, v any) error {
	b, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// manifests reads every YAML document of the *.yaml files here, by kind.
func manifests(t *testing.T) map[string][]any {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	byKind := map[string][]any{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for {
			var doc map[string]any
			if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			kind, _ := doc["kind"].(string)
			byKind[kind] = append(byKind[kind], doc)
		}
	}
	return byKind
}

func TestManifests(t *testing.T) {
	byKind := manifests(t)
	for kind := range byKind {
		if kind != "DaemonSet" && kind != "ConfigMap" {
			t.Errorf("unexpected kind %q (the test knows DaemonSet and ConfigMap)", kind)
		}
	}
	if len(byKind["DaemonSet"]) != 1 || len(byKind["ConfigMap"]) != 1 {
		t.Fatalf("want one DaemonSet and one ConfigMap, got %d and %d", len(byKind["DaemonSet"]), len(byKind["ConfigMap"]))
	}
	var ds appsv1.DaemonSet
	if err := decodeStrict(byKind["DaemonSet"][0], &ds); err != nil {
		t.Fatalf("daemonset.yaml does not decode strictly as an apps/v1 DaemonSet: %v", err)
	}
	var cm corev1.ConfigMap
	if err := decodeStrict(byKind["ConfigMap"][0], &cm); err != nil {
		t.Fatalf("configmap.yaml does not decode strictly as a v1 ConfigMap: %v", err)
	}
	if ds.APIVersion != "apps/v1" || cm.APIVersion != "v1" {
		t.Errorf("apiVersions %q and %q, want apps/v1 and v1", ds.APIVersion, cm.APIVersion)
	}

	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork {
		t.Error("the DaemonSet must use hostNetwork: the rules belong in the node's namespace")
	}
	sel, labels := ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels
	for k, v := range sel {
		if labels[k] != v {
			t.Errorf("selector %s=%s does not match the template's labels %v", k, v, labels)
		}
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(pod.Containers))
	}
	c := pod.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("the container has no securityContext.capabilities")
	}
	if sc.Privileged == nil || *sc.Privileged {
		t.Error("the container must say privileged: false")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("the container must say allowPrivilegeEscalation: false")
	}
	add := slices.Sorted(slices.Values(sc.Capabilities.Add))
	if !slices.Equal(add, []corev1.Capability{"NET_ADMIN", "NET_RAW"}) {
		t.Errorf("capabilities added: %v, want exactly NET_ADMIN and NET_RAW", add)
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities dropped: %v, want ALL", sc.Capabilities.Drop)
	}

	// watch -f on the file of the ConfigMap volume, mounted as a directory
	// (a subPath mount would never see an update).
	args := append(slices.Clone(c.Command), c.Args...)
	i := slices.Index(args, "-f")
	if !slices.Contains(args, "watch") || i < 0 || i+1 >= len(args) {
		t.Fatalf("the container runs %v, want watch -f FILE", args)
	}
	file := args[i+1]
	var volume string
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(file, m.MountPath+"/") {
			volume = m.Name
			if m.SubPath != "" {
				t.Errorf("volume %s is mounted with subPath %q: ConfigMap updates would never reach the pod", m.Name, m.SubPath)
			}
		}
	}
	key := filepath.Base(file)
	found := false
	for _, v := range pod.Volumes {
		if v.Name == volume {
			found = true
			if v.ConfigMap == nil || v.ConfigMap.Name != cm.Name {
				t.Errorf("volume %s is not the ConfigMap %s", v.Name, cm.Name)
			}
		}
	}
	if !found {
		t.Fatalf("no volume is mounted where %s lives", file)
	}
	content, ok := cm.Data[key]
	if !ok {
		t.Fatalf("the ConfigMap has no key %s (watch reads %s)", key, file)
	}

	// The file as apply -f and watch -f read it.
	path := filepath.Join(t.TempDir(), key)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := config.Load(path)
	if err != nil {
		t.Fatalf("the ConfigMap's %s does not load: %v", key, err)
	}
	if _, err := f.Intents(); err != nil {
		t.Fatalf("the ConfigMap's %s does not make rules: %v", key, err)
	}
}

// TestStrictDecodingCatchesTypos proves the check above has teeth: a
// misspelt field fails.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	doc := map[string]any{"apiVersion": "apps/v1", "kind": "DaemonSet", "spec": map[string]any{
		"template": map[string]any{"spec": map[string]any{"hostNetwrk": true}},
	}}
	var ds appsv1.DaemonSet
	if err := decodeStrict(doc, &ds); err == nil || !strings.Contains(err.Error(), "hostNetwrk") {
		t.Errorf("a misspelt field decoded without an error naming it: %v", err)
	}
}
