// Package kubernetes holds the DaemonSet, ConfigMap and Dockerfile that run
// egress-snat watch on every node of a cluster. Its test validates the
// manifests offline: strictly decoded into the k8s.io/api types (a
// misspelt or misplaced field fails), the security settings the README
// promises, no subPath mount, the probes, the memory limit against the
// ConfigMap's destinations, the version passed to every docker build, and
// the ConfigMap's file as apply -f reads it. Only this test imports
// k8s.io/api; the binary does not. (cmd/egress-snat's TestDaemonSetProbes
// runs the probes' commands against a watch in a lab.)
package kubernetes

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
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
		}
		// watch follows the kubelet's ..data symlink swap; a subPath
		// mount is a copy that never sees an update.
		if m.SubPath != "" || m.SubPathExpr != "" {
			t.Errorf("volume %s is mounted with subPath %q: a subPath mount is a copy that never sees an update", m.Name, m.SubPath+m.SubPathExpr)
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
	intents, err := f.Intents()
	if err != nil {
		t.Fatalf("the ConfigMap's %s does not make rules: %v", key, err)
	}

	checkProbes(t, pod, c, args)
	checkMemory(t, c, len(intents))
}

// binaryPath is where the Dockerfile puts egress-snat in the image.
func binaryPath(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^COPY --from=build /egress-snat (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the Dockerfile copies no egress-snat binary into the image")
	}
	return string(m[1])
}

// checkProbes: watch keeps a health file on a writable volume, and the
// probes read it with egress-snat health: startup and liveness ask for a
// live loop only, readiness also for a successful last reconcile. None
// runs check, which exits 1 on drift: a liveness probe on it would restart
// the pod for what watch repairs by itself.
func checkProbes(t *testing.T, pod corev1.PodSpec, c corev1.Container, args []string) {
	t.Helper()
	i := slices.Index(args, "--health-file")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("watch runs without --health-file: %v", args)
	}
	health := args[i+1]
	writable := false
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(health, m.MountPath+"/") && !m.ReadOnly {
			for _, v := range pod.Volumes {
				writable = writable || v.Name == m.Name && v.EmptyDir != nil
			}
		}
	}
	if !writable {
		t.Errorf("the health file %s is not on a writable emptyDir (the root file system is read-only)", health)
	}
	bin := binaryPath(t)
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		ready bool
	}{{"startupProbe", c.StartupProbe, false}, {"livenessProbe", c.LivenessProbe, false}, {"readinessProbe", c.ReadinessProbe, true}} {
		if p.probe == nil || p.probe.Exec == nil {
			t.Errorf("no %s running a command", p.name)
			continue
		}
		cmd := p.probe.Exec.Command
		if len(cmd) < 2 || cmd[0] != bin || cmd[1] != "health" {
			t.Errorf("%s runs %v, want %s health ...", p.name, cmd, bin)
			continue
		}
		if j := slices.Index(cmd, "--file"); j < 0 || j+1 >= len(cmd) || cmd[j+1] != health {
			t.Errorf("%s runs %v, want it to read --file %s", p.name, cmd, health)
		}
		if slices.Contains(cmd, "--ready") != p.ready {
			t.Errorf("%s runs %v: --ready belongs to the readiness probe alone", p.name, cmd)
		}
		if p.probe.TimeoutSeconds < 2 {
			t.Errorf("%s times out after %ds: a loaded node may take longer to start a process", p.name, p.probe.TimeoutSeconds)
		}
	}
	if s := c.StartupProbe; s != nil && s.PeriodSeconds*s.FailureThreshold < 120 {
		t.Errorf("the startup probe gives the first reconcile %ds; the first apply of a long list takes longer", s.PeriodSeconds*s.FailureThreshold)
	}
}

// checkMemory: the memory limit fits n destinations, 64 MiB plus 512
// bytes each (a full reconcile peaks at 101 MB for 100,000 and 408 MB for
// 1,000,000, docs/BENCHMARKS.md), and GOMEMLIMIT, the Go heap's soft limit,
// is set between 3/4 of the limit and the limit.
func checkMemory(t *testing.T, c corev1.Container, n int) {
	t.Helper()
	limit, ok := c.Resources.Limits[corev1.ResourceMemory]
	if !ok {
		t.Fatal("the container has no memory limit")
	}
	if want := int64(64<<20 + 512*n); limit.Value() < want {
		t.Errorf("memory limit %s for %d destinations, want at least %d bytes (64 MiB + 512 bytes each)", limit.String(), n, want)
	}
	// What the README promises the shipped limit holds.
	if limit.Value() < 64<<20+512*100_000 {
		t.Errorf("memory limit %s does not fit 100,000 destinations, as the README says", limit.String())
	}
	var soft int64 = -1
	for _, e := range c.Env {
		if e.Name == "GOMEMLIMIT" {
			soft = goMemLimit(t, e.Value)
		}
	}
	if soft < 0 {
		t.Fatal("no GOMEMLIMIT: the collector would not work harder before the OOM killer")
	}
	if soft >= limit.Value() || soft < limit.Value()*3/4 {
		t.Errorf("GOMEMLIMIT %d bytes, want between 3/4 of the limit and the limit (%d)", soft, limit.Value())
	}
}

// goMemLimit reads a GOMEMLIMIT value: a number with a unit B, KiB, MiB,
// GiB or TiB, or bytes.
func goMemLimit(t *testing.T, v string) int64 {
	t.Helper()
	m := regexp.MustCompile(`^(\d+)(B|KiB|MiB|GiB|TiB)?$`).FindStringSubmatch(v)
	if m == nil {
		t.Fatalf("GOMEMLIMIT %q is not a size Go reads", v)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	shift := map[string]int{"": 0, "B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40}[m[2]]
	return n << shift
}

// TestVersionIsPassedToTheImage: the Dockerfile builds the version from
// its VERSION argument into the binary, and every docker build the README,
// the Dockerfile and the DaemonSet show passes it (the build context has
// no .git, so without it the image reports "dev").
func TestVersionIsPassedToTheImage(t *testing.T) {
	docker, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^ARG VERSION\b`).Match(docker) || !strings.Contains(string(docker), "-X main.version=${VERSION}") {
		t.Error("the Dockerfile does not build its VERSION argument into the binary (-X main.version=${VERSION})")
	}
	builds := 0
	for _, f := range []string{"Dockerfile", "daemonset.yaml", "../../README.md"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.Contains(line, "docker build ") {
				continue
			}
			builds++
			if !strings.Contains(line, "--build-arg VERSION=") {
				t.Errorf("%s: %q does not pass --build-arg VERSION=", f, strings.TrimSpace(line))
			}
		}
	}
	if builds < 3 {
		t.Errorf("found %d docker build lines in the Dockerfile, the DaemonSet and the README, want one in each", builds)
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
