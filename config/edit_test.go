package config_test

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

var update = flag.Bool("update", false, "rewrite the golden files of TestDocEditGolden")

func addrs(t *testing.T, ss ...string) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func dsts(t *testing.T, ss ...string) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	for _, s := range ss {
		p, err := config.ParseDst(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

// TestDocEditGolden edits testdata/edit/NAME.in.yaml and compares the
// written file with NAME.golden.yaml (go test ./config -run Golden -update
// rewrites them). The golden files show that comments and order survive.
func TestDocEditGolden(t *testing.T) {
	tests := []struct {
		name string
		edit func(t *testing.T, d *config.Doc)
	}{
		{"put-new", func(t *testing.T, d *config.Doc) {
			d.Put(config.Spec{Dst: dsts(t, "203.0.113.0/24"), To: addrs(t, "192.0.2.23")})
		}},
		{"put-replace", func(t *testing.T, d *config.Doc) {
			// Same destinations and Match: the rule keeps its place and comments.
			d.Put(config.Spec{Match: config.Match{Out: "eth0"}, Dst: dsts(t, "203.0.113.7", "198.51.100.0/24"), To: addrs(t, "192.0.2.23")})
			// One destination of a list moves to a rule of its own.
			d.Put(config.Spec{Dst: dsts(t, "198.51.100.5"), To: addrs(t, "192.0.2.22", "192.0.2.23"), Spread: true})
		}},
		{"remove-split", func(t *testing.T, d *config.Doc) {
			if miss := d.Remove(config.Match{Out: "eth0"}, dsts(t, "203.0.113.7/32")); len(miss) != 0 {
				t.Errorf("Remove: missing %v, want none", miss)
			}
			// Another Match: not this rule's destination.
			if miss := d.Remove(config.Match{}, dsts(t, "198.51.100.0/24")); len(miss) != 1 {
				t.Errorf("Remove with another Match: missing %v, want the one destination", miss)
			}
		}},
		{"remove-rule", func(t *testing.T, d *config.Doc) {
			d.RemoveAny(dsts(t, "198.51.100.4", "198.51.100.5", "2001:db8:ffff::/48"))
		}},
		{"rotate", func(t *testing.T, d *config.Doc) {
			if !d.ReplaceSource(snat.Host(), dsts(t, "2001:db8:ffff::/48")[0], addrs(t, "2001:db8::23")[0]) {
				t.Error("ReplaceSource 2001:db8:ffff::/48: not found")
			}
			if !d.ReplaceSource(snat.Host(), dsts(t, "198.51.100.4")[0], addrs(t, "192.0.2.23")[0]) {
				t.Error("ReplaceSource 198.51.100.4: not found")
			}
			if d.ReplaceSource(snat.Host(), dsts(t, "192.0.2.99")[0], addrs(t, "192.0.2.23")[0]) {
				t.Error("ReplaceSource 192.0.2.99: found, want not")
			}
		}},
		{"clear", func(t *testing.T, d *config.Doc) { d.Clear() }},
		{"empty-put", func(t *testing.T, d *config.Doc) {
			d.Put(config.Spec{Dst: dsts(t, "198.51.100.4"), To: addrs(t, "192.0.2.22")})
			d.Put(config.Spec{Dst: dsts(t, "203.0.113.7"), To: addrs(t, "192.0.2.22")}) // joins the rule
			d.Put(config.Spec{Dst: dsts(t, "203.0.113.7"), To: addrs(t, "192.0.2.22")}) // no change
		}},
		{"senders", func(t *testing.T, d *config.Doc) {
			from := snat.From(netip.MustParsePrefix("10.8.0.0/24"))
			// The VPN moves to .22: its sender is split out of the from list.
			d.Put(config.Spec{Match: config.Match{Sender: from}, Dst: dsts(t, "0.0.0.0/0"), To: addrs(t, "192.0.2.22")})
			// root's rule only: the host's rule for the same destination stays.
			d.Put(config.Spec{Match: config.Match{Sender: snat.UID(0)}, Dst: dsts(t, "198.51.100.0/24"), To: addrs(t, "192.0.2.23")})
			// The containers' rule (every destination, implicitly) goes.
			if miss := d.Remove(config.Match{Sender: snat.From(netip.MustParsePrefix("172.30.0.0/16"))}, dsts(t, "0.0.0.0/0")); len(miss) != 0 {
				t.Errorf("Remove from 172.30.0.0/16: missing %v", miss)
			}
			d.Put(config.Spec{Match: config.Match{Sender: snat.Cgroup("system.slice/postfix.service")}, Dst: dsts(t, "203.0.113.7"), To: addrs(t, "192.0.2.22")})
		}},
		{"null-rules-put", func(t *testing.T, d *config.Doc) {
			d.Put(config.Spec{Match: config.Match{Out: "eth1"}, Dst: dsts(t, "198.51.100.4"), To: addrs(t, "192.0.2.22")})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in, err := os.ReadFile(filepath.Join("testdata", "edit", tt.name+".in.yaml"))
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(t.TempDir(), "egress-snat.yaml")
			if err := os.WriteFile(path, in, 0o640); err != nil {
				t.Fatal(err)
			}
			d, err := config.OpenDoc(path)
			if err != nil {
				t.Fatal(err)
			}
			tt.edit(t, d)
			if err := d.Write(); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
				t.Errorf("mode after Write: %v, want 0640 kept", fi.Mode().Perm())
			}
			if _, err := config.Load(path); err != nil {
				t.Errorf("the written file does not load: %v", err)
			}
			golden := filepath.Join("testdata", "edit", tt.name+".golden.yaml")
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Errorf("%s (-want +got):\n%s", golden, diff)
			}
			entries, _ := os.ReadDir(filepath.Dir(path))
			if len(entries) != 1 {
				t.Errorf("folder after Write holds %d files, want only the file (no temporary left)", len(entries))
			}
		})
	}
}

// TestDocWeights: a weighted spread decodes into its turns (snat.Weigh)
// and is written back with its weights, which decode to the same turns.
func TestDocWeights(t *testing.T) {
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	if err := os.WriteFile(path, []byte("rules:\n  - to: [192.0.2.22=3, 192.0.2.23]\n    spread: true\n    dst: [198.51.100.0/24]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, intents, err := config.LoadIntents(path)
	if err != nil {
		t.Fatal(err)
	}
	want := addrs(t, "192.0.2.22", "192.0.2.22", "192.0.2.23", "192.0.2.22")
	if len(intents) != 1 || !slices.Equal(intents[0].To, want) || !intents[0].Spread {
		t.Fatalf("intents %+v, want one spread over %v", intents, want)
	}
	d, err := config.OpenDoc(path)
	if err != nil {
		t.Fatal(err)
	}
	// The same source joins the rule as it is; another Match's rule is
	// new, and written by the edit.
	d.Put(config.Spec{Dst: dsts(t, "203.0.113.0/24"), To: want, Spread: true})
	d.Put(config.Spec{Match: config.Match{Out: "eth1"}, Dst: dsts(t, "203.0.113.0/24"), To: want, Spread: true})
	b, err := d.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "to: [192.0.2.22=3, 192.0.2.23=1]") {
		t.Errorf("written:\n%s\nwant the weights written", b)
	}
	if _, err := config.Decode(bytes.NewReader(b)); err != nil {
		t.Errorf("what was written does not decode: %v", err)
	}
}

func TestDocIntentsAfterEdit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.yaml")
	d, err := config.OpenDoc(path)
	if err != nil {
		t.Fatal(err)
	}
	if d.Exists() {
		t.Error("Exists on a missing file: true")
	}
	d.Put(config.Spec{Dst: dsts(t, "198.51.100.4", "203.0.113.0/24"), To: addrs(t, "192.0.2.22")})
	d.Put(config.Spec{Dst: dsts(t, "198.51.100.4"), To: addrs(t, "192.0.2.23")})
	d.Put(config.Spec{Match: config.Match{Out: "eth0"}, Dst: dsts(t, "2001:db8:ffff::/48"), To: addrs(t, "2001:db8::22", "2001:db8::23"), Spread: true})
	d.ReplaceSource(snat.Host(), dsts(t, "203.0.113.0/24")[0], addrs(t, "192.0.2.24")[0])
	if err := d.Write(); err != nil {
		t.Fatal(err)
	}
	f, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	in, err := f.Intents()
	if err != nil {
		t.Fatal(err)
	}
	got := intentStrings(in)
	want := []string{
		"203.0.113.0/24 -> 192.0.2.24",
		"198.51.100.4/32 -> 192.0.2.23",
		"2001:db8:ffff::/48 -> 2001:db8::22,2001:db8::23 spread out eth0",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("intents (-want +got):\n%s", diff)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("mode of a new file: %v, want 0644", fi.Mode().Perm())
	}
}

func TestOpenDocRefusesBadFile(t *testing.T) {
	for name, content := range map[string]string{
		"not yaml":      "rules: [\n",
		"unknown key":   "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n    gateway: eth0\n",
		"not a list":    "rules: 3\n",
		"bad address":   "rules:\n  - to: 192.0.2.300\n    dst: 198.51.100.4\n",
		"empty":         "",
		"two documents": "rules: []\n---\nrules: []\n",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "f.yaml")
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := config.OpenDoc(path); err == nil {
				t.Fatal("OpenDoc: no error, want one")
			} else if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name the file", err)
			}
			if got, _ := os.ReadFile(path); string(got) != content {
				t.Errorf("file changed to %q", got)
			}
		})
	}
}

func TestWriteFileFailureLeavesFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f.yaml")
	if err := os.WriteFile(path, []byte("rules: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A folder that cannot take the temporary file: the write fails and
	// the file is as it was.
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(dir, 0o755) })
	if os.Geteuid() == 0 {
		// root ignores the folder's mode; point at a folder that is a file.
		path = filepath.Join(path, "inner.yaml")
	}
	if err := config.WriteFile(path, []byte("rules: []\n"), 0o644); err == nil {
		t.Fatal("WriteFile: no error, want one")
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "f.yaml")); string(got) != "rules: []\n" {
		t.Errorf("file changed to %q", got)
	}
}

func TestPendingAbortLeavesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.yaml")
	if err := os.WriteFile(path, []byte("# mine\nrules: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := config.OpenDoc(path)
	if err != nil {
		t.Fatal(err)
	}
	d.Put(config.Spec{Dst: dsts(t, "198.51.100.4"), To: addrs(t, "192.0.2.22")})
	p, err := d.Prepare()
	if err != nil {
		t.Fatal(err)
	}
	p.Abort()
	p.Abort()
	if got, _ := os.ReadFile(path); string(got) != "# mine\nrules: []\n" {
		t.Errorf("file after Abort: %q", got)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("folder after Abort holds %d files, want 1", len(entries))
	}
}

// TestDocPool: a pool is written as its prefix with its sticky (none for
// the default), joins a rule of the same pool, and reads back the same;
// an address put over it drops sticky.
func TestDocPool(t *testing.T) {
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	d, err := config.OpenDoc(path)
	if err != nil {
		t.Fatal(err)
	}
	pool := netip.MustParsePrefix("2001:db8:1::/64")
	d.Put(config.Spec{Dst: dsts(t, "2001:db8:ffff::/48"), Pool: pool, Sticky: snat.StickyDestination})
	d.Put(config.Spec{Dst: dsts(t, "2001:db8:fffe::/48"), Pool: pool, Sticky: snat.StickyDestination})
	d.Put(config.Spec{Dst: dsts(t, "2001:db8:fffd::/48"), Pool: pool, Sticky: snat.StickyConnection})
	b, err := d.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	want := "rules:\n" +
		"  - to: 2001:db8:1::/64\n    dst: ['2001:db8:ffff::/48', '2001:db8:fffe::/48']\n    sticky: destination\n" +
		"  - to: 2001:db8:1::/64\n    dst: ['2001:db8:fffd::/48']\n"
	if string(b) != want {
		t.Errorf("written:\n%s\nwant:\n%s", b, want)
	}
	f, err := config.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	in, err := f.Intents()
	if err != nil || len(in) != 3 || in[0].Pool != pool || in[0].Sticky != snat.StickyDestination || in[2].Sticky != "" {
		t.Errorf("read back %+v, %v", in, err)
	}
	if !d.ReplaceSource(snat.Host(), dsts(t, "2001:db8:fffd::/48")[0], netip.MustParseAddr("2001:db8::22")) {
		t.Fatal("ReplaceSource found no rule")
	}
	if b, _ = d.Bytes(); !strings.Contains(string(b), "  - to: 2001:db8::22\n    dst: ['2001:db8:fffd::/48']\n") {
		t.Errorf("after ReplaceSource:\n%s", b)
	}
}

// TestDocSpill: set --spill --permanent's edit writes spill: true on a
// failover list, which reads back as spill intents; the same rule without
// spill is another source (the edit drops the key); spill with one
// address, or a pool, is refused with the key named.
func TestDocSpill(t *testing.T) {
	path := filepath.Join(t.TempDir(), "egress-snat.yaml")
	d, err := config.OpenDoc(path)
	if err != nil {
		t.Fatal(err)
	}
	to := addrs(t, "192.0.2.22", "192.0.2.23")
	d.Put(config.Spec{Dst: dsts(t, "203.0.113.0/24"), To: to, Spill: true})
	if err := d.Write(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if !strings.Contains(string(b), "spill: true") {
		t.Errorf("written:\n%s\nwant spill: true", b)
	}
	_, intents, err := config.LoadIntents(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(intents) != 1 || !intents[0].Spill || intents[0].Spread || !slices.Equal(intents[0].To, to) {
		t.Errorf("intents %+v, want one spill over %v, not spread", intents, to)
	}
	d, err = config.OpenDoc(path)
	if err != nil {
		t.Fatal(err)
	}
	d.Put(config.Spec{Dst: dsts(t, "203.0.113.0/24"), To: to})
	if b, _ := d.Bytes(); strings.Contains(string(b), "spill") {
		t.Errorf("written without spill:\n%s\nwant no spill key", b)
	}
	for _, bad := range []string{
		"rules:\n  - to: 192.0.2.22\n    dst: [203.0.113.0/24]\n    spill: true\n",
		"rules:\n  - to: 2001:db8:1::/64\n    dst: [2001:db8:ffff::/48]\n    spill: true\n",
	} {
		if _, err := config.Decode(strings.NewReader(bad)); err == nil || !strings.Contains(err.Error(), "'spill'") {
			t.Errorf("%q: %v; want an error naming 'spill'", bad, err)
		}
	}
}
