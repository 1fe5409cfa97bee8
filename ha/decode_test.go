package ha

import (
	"fmt"
	"net/netip"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.yaml.in/yaml/v3"
)

var cmpNetip = []cmp.Option{
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
}

// TestConfigKeys: every field of Config, nested ones included, has a key
// of its own in the file, in the file format's kebab-case, so that the
// file maps one to one onto Config (a new field cannot be forgotten).
func TestConfigKeys(t *testing.T) {
	kebab := regexp.MustCompile(`^[a-z][a-z0-9]*(-[a-z0-9]+)*$`)
	var walk func(typ reflect.Type, path string)
	walk = func(typ reflect.Type, path string) {
		seen := map[string]bool{}
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			key := f.Tag.Get("yaml")
			if !kebab.MatchString(key) || seen[key] {
				t.Errorf("%s%s: yaml key %q, want a kebab-case key of its own", path, f.Name, key)
			}
			seen[key] = true
			if f.Type.Kind() == reflect.Struct && f.Type.PkgPath() == typ.PkgPath() {
				walk(f.Type, path+f.Name+".")
			}
		}
	}
	walk(reflect.TypeOf(Config{}), "Config.")
}

// TestDecodeRoundTrip: a Config with every field set, written as YAML,
// decodes to itself.
func TestDecodeRoundTrip(t *testing.T) {
	c := nopreemptB()
	c.Preempt, c.PurgeTimeout = true, 0
	c.PreemptDelay = 2500 * 1000 * 1000
	doc, err := yaml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeConfig(strings.NewReader(string(doc)))
	if err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
	if diff := cmp.Diff(c, got, cmpNetip...); diff != "" {
		t.Errorf("decoded (-written +decoded):\n%s\n%s", diff, doc)
	}
}

// TestExamples: the example pair's files decode, validate, and are each
// other's mirror image: node and peer swapped, all else alike.
func TestExamples(t *testing.T) {
	if len(Examples) != 2 {
		t.Fatalf("%d examples, want the two nodes of a pair", len(Examples))
	}
	var cs []Config
	for _, e := range Examples {
		c, err := DecodeConfig(strings.NewReader(e.YAML))
		if err != nil {
			t.Fatalf("example %s: %v", e.Node, err)
		}
		if err := c.Validate(); err != nil {
			t.Errorf("example %s: %v", e.Node, err)
		}
		if c.Node.Name != e.Node {
			t.Errorf("example %s is the file of node %s", e.Node, c.Node.Name)
		}
		cs = append(cs, c)
	}
	mirror := cs[1]
	mirror.Node, mirror.Peer = mirror.Peer, mirror.Node
	if diff := cmp.Diff(cs[0], mirror, cmpNetip...); diff != "" {
		t.Errorf("the examples are not one pair (-%s +%s mirrored):\n%s", Examples[0].Node, Examples[1].Node, diff)
	}
}

// TestDecodeRefuses: each mistake is an error naming the line or value,
// in the file's words rather than Go's.
func TestDecodeRefuses(t *testing.T) {
	good := Examples[0].YAML
	for _, tc := range []struct {
		name, doc string
		want      []string
	}{
		{"empty", "", []string{"empty file"}},
		{"unknown key", good + "preemt: true\n", []string{fmt.Sprintf("line %d: field preemt not found in the pair's settings", strings.Count(good, "\n")+1)}},
		{"unknown node key", strings.Replace(good, "sync-addr: 10.51.0.1", "sync: 10.51.0.1", 1), []string{"field sync not found in node or peer"}},
		{"bad address", strings.Replace(good, "client-vip: 10.50.0.1/24", "client-vip: 10.50.0.1/33", 1), []string{`line 9: "10.50.0.1/33": prefix length out of range (want an address with its prefix length`}},
		{"bad sync address", strings.Replace(good, "sync-addr: 10.51.0.2", "sync-addr: 10.51.0.x", 1), []string{`line 6: "10.51.0.x": `, "(want an address, such as"}},
		{"bad duration", strings.Replace(good, "advert-interval: 100ms", "advert-interval: 100", 1), []string{"line 23", "into a duration (100ms, 2s)"}},
		{"scalar egress", strings.Replace(good, "egress-vips: [192.0.2.100/24]", "egress-vips: 192.0.2.100/24", 1), []string{"into a list of addresses"}},
		{"two documents", good + "---\nnode: {}\n", []string{"more than one YAML document"}},
		{"syntax", "node: {name: gw-a\n", []string{"line 1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeConfig(strings.NewReader(tc.doc))
			if err == nil {
				t.Fatalf("DecodeConfig: no error, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("DecodeConfig: %q, want it to say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "ha.") || strings.Contains(err.Error(), "netip") || strings.HasPrefix(err.Error(), "yaml:") {
				t.Errorf("DecodeConfig: %q speaks Go", err)
			}
		})
	}
}
