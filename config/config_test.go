package config_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// intentStrings renders intents as "DST -> TO[,TO] [spread] [out IFACE]",
// so tests compare plain text instead of netip internals.
func intentStrings(in []snat.Intent) []string {
	var out []string
	for _, i := range in {
		to := make([]string, len(i.To))
		for k, a := range i.To {
			to[k] = a.String()
		}
		s := fmt.Sprintf("%s -> %s", i.Dst, strings.Join(to, ","))
		if i.Spread {
			s += " spread"
		}
		if i.Out != "" {
			s += " out " + i.Out
		}
		out = append(out, s)
	}
	return out
}

// writeFiles writes name -> content into a fresh directory and returns it.
func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// wantErrNaming fails unless err is non-nil and its message contains each
// of want.
func wantErrNaming(t *testing.T, what string, err error, want []string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: got no error, want one naming %q", what, want)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%s: error %q, want it to name %q", what, err, w)
		}
	}
}

func TestConfigDecodeRejects(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string // the error must contain each
	}{
		{
			name: "unknown top-level key",
			yaml: "rules: []\nrulez: []\n",
			want: []string{"line 2", "rulez"},
		},
		{
			name: "misspelt rules",
			yaml: "ruls:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n",
			want: []string{"line 1", "ruls"},
		},
		{
			name: "bad source address",
			yaml: "rules:\n  - to: 192.0.2.300\n    dst: 198.51.100.4\n",
			want: []string{"line 2", `"192.0.2.300"`},
		},
		{
			name: "bad source in a list",
			yaml: "rules:\n  - to: [192.0.2.22, not-an-address]\n    dst: 198.51.100.4\n",
			want: []string{"line 2", `"not-an-address"`},
		},
		{
			name: "source with a zone",
			yaml: "rules:\n  - to: fe80::1%eth0\n    dst: ::/0\n",
			want: []string{"line 2", "fe80::1%eth0"},
		},
		{
			name: "prefix too long",
			yaml: "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.0/33]\n",
			want: []string{"line 3", "198.51.100.0/33"},
		},
		{
			name: "not an address or prefix",
			yaml: "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, example.com]\n",
			want: []string{"line 3", "example.com"},
		},
		{
			name: "host bits set",
			yaml: "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, 198.51.100.1/24]\n",
			want: []string{"line 3", "198.51.100.1/24", "198.51.100.0/24"},
		},
		{
			name: "IPv6 host bits set",
			yaml: "rules:\n  - to: 2001:db8::22\n    dst: 2001:db8:ffff::4/48\n",
			want: []string{"line 3", "2001:db8:ffff::4/48", "2001:db8:ffff::/48"},
		},
		{
			name: "IPv4 source, IPv6 destination",
			yaml: "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n  - to: 192.0.2.23\n    dst: [2001:db8::/32]\n",
			want: []string{"rule 2", "line 4", "192.0.2.23", "2001:db8::/32"},
		},
		{
			name: "IPv6 source, IPv4 destination",
			yaml: "rules:\n  - to: 2001:db8::22\n    dst: 198.51.100.4\n",
			want: []string{"rule 1", "line 2", "2001:db8::22", "198.51.100.4/32"},
		},
		{
			name: "sources of both families",
			yaml: "rules:\n  - to: [192.0.2.22, 2001:db8::22]\n    spread: true\n    dst: 198.51.100.4\n",
			want: []string{"rule 1", "line 2", "192.0.2.22", "2001:db8::22"},
		},
		{
			name: "weights without spread",
			yaml: "rules:\n  - to: [192.0.2.22=3, 192.0.2.23=1]\n    dst: 198.51.100.4\n",
			want: []string{"rule 1", "line 2", "192.0.2.22=3, 192.0.2.23=1", "spread: true"},
		},
		{
			name: "weight zero",
			yaml: "rules:\n  - to: [192.0.2.22, 192.0.2.23=0]\n    spread: true\n    dst: 198.51.100.4\n",
			want: []string{"line 2", `"192.0.2.23=0"`, "weight 0"},
		},
		{
			name: "weight not a number",
			yaml: "rules:\n  - to:\n      - 192.0.2.22\n      - 192.0.2.23=heavy\n    spread: true\n    dst: 198.51.100.4\n",
			want: []string{"line 4", `"heavy"`},
		},
		{
			name: "negative weight",
			yaml: "rules:\n  - to: [192.0.2.22=-1, 192.0.2.23]\n    spread: true\n    dst: 198.51.100.4\n",
			want: []string{"line 2", "weight -1"},
		},
		{
			name: "missing to",
			yaml: "rules:\n  - dst: 198.51.100.4\n",
			want: []string{"rule 1", "line 2", "'to'"},
		},
		{
			name: "missing dst",
			yaml: "rules:\n  - to: 192.0.2.22\n",
			want: []string{"rule 1", "line 2", "'dst' or 'dst-file'"},
		},
		{
			name: "to is a mapping",
			yaml: "rules:\n  - to: {a: b}\n    dst: 198.51.100.4\n",
			want: []string{"line 2", "mapping"},
		},
		{
			name: "spread is not a boolean",
			yaml: "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n    spread: maybe\n",
			want: []string{"line 4", "maybe"},
		},
		{
			name: "rules is not a list",
			yaml: "rules: 192.0.2.22\n",
			want: []string{"line 1", "192.0.2.22"},
		},
		{
			name: "several problems are all reported",
			yaml: "rules:\n  - to: 192.0.2.22\n  - to: 2001:db8::22\n    dst: 198.51.100.4\n",
			want: []string{"rule 1 (line 2)", "rule 2 (line 3)"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := config.Decode(strings.NewReader(tt.yaml))
			wantErrNaming(t, "Decode", err, tt.want)
			if f != nil && err == nil {
				t.Errorf("Decode returned rules %+v and no error", f.Rules)
			}
		})
	}
}

// TestConfigUnknownKeyInRule: a misspelt key inside a rule must be an error
// like a misspelt top-level key, or a typo such as "sprad: true" or
// "ot: eth1" silently changes what the file means.
func TestConfigUnknownKeyInRule(t *testing.T) {
	for _, tt := range []struct{ name, yaml, key string }{
		{"misspelt spread", "rules:\n  - to: [192.0.2.22, 192.0.2.23]\n    dst: 198.51.100.4\n    sprad: true\n", "sprad"},
		{"misspelt out", "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n    ot: eth1\n", "ot"},
		{"misspelt dst next to dst-file", "rules:\n  - to: 192.0.2.22\n    dst-file: a.txt\n    dts: 198.51.100.4\n", "dts"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Decode(strings.NewReader(tt.yaml))
			wantErrNaming(t, "Decode", err, []string{"line 4", tt.key})
		})
	}
}

// TestConfigBlockListItemLine: in a block-style list the error must name
// the line of the bad item, not the line where the list starts.
func TestConfigBlockListItemLine(t *testing.T) {
	for _, tt := range []struct{ name, yaml, value, line string }{
		{"source", "rules:\n  - to:\n      - 192.0.2.22\n      - not-an-address\n    dst: 198.51.100.4\n", `"not-an-address"`, "line 4:"},
		{"destination", "rules:\n  - to: 192.0.2.22\n    dst:\n      - 198.51.100.4\n      - 198.51.100.5\n      - 198.51.100.1/24\n", "198.51.100.1/24", "line 6:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Decode(strings.NewReader(tt.yaml))
			wantErrNaming(t, "Decode", err, []string{tt.value, "line "})
			if err != nil && !strings.Contains(err.Error(), tt.line) {
				t.Errorf("Decode: error %q, want it to name %q, the bad item's line", err, tt.line)
			}
		})
	}
}

// TestConfigSyntaxErrorLine: a syntax error names the line of the
// mistake. The YAML parser names the line its enclosing block starts on
// (line 1 for a rule's key indented one space off on line 3); Decode finds
// the real one, also after a flow list that spans lines, and leaves the
// errors the parser already places right as they are.
func TestConfigSyntaxErrorLine(t *testing.T) {
	for _, tt := range []struct{ name, yaml, want string }{
		{"key indented too little", "rules:\n  - to: 192.0.2.22\n   dst: [198.51.100.4]\n", "line 3:"},
		{"key indented too far", "rules:\n  - to: 192.0.2.22\n     dst: [198.51.100.4]\n", "line 3:"},
		{"key out of its rule", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n  out: eth0\n", "line 4:"},
		{"key in too deep", "rules:\n- to: 192.0.2.22\n  dst: [198.51.100.4]\n    out: eth0\n", "line 4:"},
		{"after a flow list over two lines", "# the desired state\nrules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4,\n          198.51.100.5]\n   out: eth0\n", "line 6:"},
		{"second rule", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n  - to: 192.0.2.23\n    dst: [203.0.113.7]\n     out: eth0\n", "line 6:"},
		{"a tab", "rules:\n\t- to: 192.0.2.22\n", "line 2:"},
		{"no newline at the end", "rules:\n  - to: 192.0.2.22\n   dst: [198.51.100.4]", "line 3:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Decode(strings.NewReader(tt.yaml))
			wantErrNaming(t, "Decode", err, []string{tt.want})
		})
	}
}

func TestConfigDecodeEmptyAndMultiDocument(t *testing.T) {
	for _, tt := range []struct {
		name, yaml string
		want       []string
	}{
		{"empty file", "", []string{"empty file", "rules: []"}},
		{"only blank lines", "\n\n", []string{"empty file"}},
		{"only comments", "# nothing here yet\n", []string{"empty file"}},
		{"two documents", "rules: []\n---\nrules: []\n", []string{"more than one YAML document"}},
		{"a second, empty-looking document", "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n---\n# more\nfoo: 1\n", []string{"more than one YAML document"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Decode(strings.NewReader(tt.yaml))
			wantErrNaming(t, "Decode", err, tt.want)
		})
	}
}

func TestConfigDecodeAccepts(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string // intentStrings of the result
	}{
		{
			name: "empty rule list",
			yaml: "rules: []\n",
			want: nil,
		},
		{
			name: "scalar source and destination; a bare address is a host",
			yaml: "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n",
			want: []string{"198.51.100.4/32 -> 192.0.2.22"},
		},
		{
			name: "destination list, out and comments",
			yaml: "# partners\nrules:\n  - to: 192.0.2.22   # the new address\n    dst: [198.51.100.0/24, 203.0.113.7]\n    out: eth0\n",
			want: []string{"198.51.100.0/24 -> 192.0.2.22 out eth0", "203.0.113.7/32 -> 192.0.2.22 out eth0"},
		},
		{
			name: "failover list without spread keeps the order",
			yaml: "rules:\n  - to: [192.0.2.24, 192.0.2.25]\n    dst: [198.18.0.0/16]\n",
			want: []string{"198.18.0.0/16 -> 192.0.2.24,192.0.2.25"},
		},
		{
			name: "spread",
			yaml: "rules:\n  - to: [192.0.2.22, 192.0.2.23]\n    spread: true\n    dst: [203.0.113.0/24]\n",
			want: []string{"203.0.113.0/24 -> 192.0.2.22,192.0.2.23 spread"},
		},
		{
			name: "spread false is failover",
			yaml: "rules:\n  - to: [192.0.2.22, 192.0.2.23]\n    spread: false\n    dst: 203.0.113.7\n",
			want: []string{"203.0.113.7/32 -> 192.0.2.22,192.0.2.23"},
		},
		{
			name: "IPv6 and everything",
			yaml: "rules:\n  - to: 2001:db8::23\n    dst: [2001:db8:ffff::/48, 2001:db8:ffff::4]\n  - to: 192.0.2.23\n    dst: 0.0.0.0/0\n",
			want: []string{"2001:db8:ffff::/48 -> 2001:db8::23", "2001:db8:ffff::4/128 -> 2001:db8::23", "0.0.0.0/0 -> 192.0.2.23"},
		},
		{
			name: "block style lists",
			yaml: "rules:\n  - to:\n      - 192.0.2.22\n    dst:\n      - 198.51.100.4\n      - 198.51.100.5\n",
			want: []string{"198.51.100.4/32 -> 192.0.2.22", "198.51.100.5/32 -> 192.0.2.22"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := config.Decode(strings.NewReader(tt.yaml))
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			in, err := f.Intents()
			if err != nil {
				t.Fatalf("Intents: %v", err)
			}
			if diff := cmp.Diff(tt.want, intentStrings(in)); diff != "" {
				t.Errorf("intents (-want +got):\n%s", diff)
			}
		})
	}
}

func TestConfigLoadDstFile(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"etc/egress.yaml": "rules:\n" +
			"  - to: 192.0.2.22\n" +
			"    dst: 203.0.113.7\n" +
			"  - to: 192.0.2.23\n" +
			"    dst-file: lists/partners.txt\n" +
			"    dst: [198.51.100.4]\n",
		"etc/lists/partners.txt": "# partners, one a line\n" +
			"\n" +
			"198.51.100.0/24   # the whole /24\n" +
			"   203.0.113.8\n" +
			"#203.0.113.9 commented out\n" +
			"10.0.0.0/8#no blank before the comment\n",
		// A file of the same name next to the working directory's idea of
		// "lists" must not be read: the path is relative to the config.
		"lists/partners.txt": "192.0.2.99\n",
	})
	f, err := config.Load(filepath.Join(dir, "etc", "egress.yaml"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	in, err := f.Intents()
	if err != nil {
		t.Fatalf("Intents: %v", err)
	}
	want := []string{
		"203.0.113.7/32 -> 192.0.2.22",
		// A dst-file's destinations come longest prefix first, then by
		// address: the order of the chain.
		"198.51.100.4/32 -> 192.0.2.23",
		"203.0.113.8/32 -> 192.0.2.23",
		"198.51.100.0/24 -> 192.0.2.23",
		"10.0.0.0/8 -> 192.0.2.23",
	}
	if diff := cmp.Diff(want, intentStrings(in)); diff != "" {
		t.Errorf("intents (-want +got):\n%s", diff)
	}
}

func TestConfigLoadDstFileAbsolute(t *testing.T) {
	lists := writeFiles(t, map[string]string{"p.txt": "198.51.100.4\n"})
	abs := filepath.Join(lists, "p.txt")
	dir := writeFiles(t, map[string]string{"c.yaml": "rules:\n  - to: 192.0.2.22\n    dst-file: " + abs + "\n"})
	f, err := config.Load(filepath.Join(dir, "c.yaml"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	in, err := f.Intents()
	if err != nil {
		t.Fatalf("Intents: %v", err)
	}
	if diff := cmp.Diff([]string{"198.51.100.4/32 -> 192.0.2.22"}, intentStrings(in)); diff != "" {
		t.Errorf("intents (-want +got):\n%s", diff)
	}
}

func TestConfigLoadRejects(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string // c.yaml is loaded
		want  []string          // "DIR/" is replaced by the directory
	}{
		{
			name: "bad line in the dst-file",
			files: map[string]string{
				"c.yaml":     "rules:\n  - to: 192.0.2.22\n    dst: 203.0.113.7\n  - to: 192.0.2.23\n    dst-file: dsts.txt\n",
				"dsts.txt":   "# header\n198.51.100.4\n\n198.51.100.300\n198.51.100.5\n",
				"unused.txt": "",
			},
			want: []string{"DIR/c.yaml", "rule 2 (line 4)", `DIR/dsts.txt" line 4`, "198.51.100.300"},
		},
		{
			name: "host bits in the dst-file",
			files: map[string]string{
				"c.yaml":   "rules:\n  - to: 192.0.2.23\n    dst-file: dsts.txt\n",
				"dsts.txt": "198.51.100.1/24 # oops\n",
			},
			want: []string{`DIR/dsts.txt" line 1`, "198.51.100.1/24", "198.51.100.0/24"},
		},
		{
			name:  "missing dst-file",
			files: map[string]string{"c.yaml": "rules:\n  - to: 192.0.2.23\n    dst-file: nope.txt\n"},
			want:  []string{"DIR/c.yaml", "rule 1 (line 2)", "DIR/nope.txt"},
		},
		{
			name:  "bad address names the file and line",
			files: map[string]string{"c.yaml": "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n  - to: 192.0.2.x\n    dst: 198.51.100.5\n"},
			want:  []string{"DIR/c.yaml", "line 4", "192.0.2.x"},
		},
		{
			name:  "unknown key names the file and line",
			files: map[string]string{"c.yaml": "# comment\nrules: []\ndefaults: {}\n"},
			want:  []string{"DIR/c.yaml", "line 3", "defaults"},
		},
		{
			name:  "missing config file",
			files: map[string]string{"other.yaml": "rules: []\n"},
			want:  []string{"DIR/c.yaml"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := writeFiles(t, tt.files)
			_, err := config.Load(filepath.Join(dir, "c.yaml"))
			var want []string
			for _, w := range tt.want {
				want = append(want, strings.ReplaceAll(w, "DIR/", dir+"/"))
			}
			wantErrNaming(t, "Load", err, want)
		})
	}
}

// TestConfigDstFileFamily: the family of a dst-file's destinations can only
// be checked once the file is read, by Intents.
func TestConfigDstFileFamily(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"c.yaml":   "rules:\n  - to: 192.0.2.22\n    dst: 203.0.113.7\n  - to: 192.0.2.23\n    dst-file: d.txt\n",
		"d.txt":    "198.51.100.4\n2001:db8:ffff::4\n",
		"ok6.yaml": "rules:\n  - to: 2001:db8::22\n    dst-file: d6.txt\n",
		"d6.txt":   "2001:db8:ffff::/48\n2001:db8:ffff::4 # a host\n",
	})
	f, err := config.Load(filepath.Join(dir, "c.yaml"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	_, err = f.Intents()
	wantErrNaming(t, "Intents", err, []string{"rule 2 (line 4)", "2001:db8:ffff::4/128", "192.0.2.23"})

	f, err = config.Load(filepath.Join(dir, "ok6.yaml"))
	if err != nil {
		t.Fatalf("Load ok6.yaml: %v", err)
	}
	in, err := f.Intents()
	if err != nil {
		t.Fatalf("Intents of ok6.yaml: %v", err)
	}
	if diff := cmp.Diff([]string{"2001:db8:ffff::4/128 -> 2001:db8::22", "2001:db8:ffff::/48 -> 2001:db8::22"}, intentStrings(in)); diff != "" {
		t.Errorf("intents (-want +got):\n%s", diff)
	}
}

func TestConfigParseDst(t *testing.T) {
	for _, tt := range []struct {
		in, want, err string // err: a substring of the error, "" for none
	}{
		{"198.51.100.4", "198.51.100.4/32", ""},
		{" 198.51.100.0/24 ", "198.51.100.0/24", ""},
		{"0.0.0.0/0", "0.0.0.0/0", ""},
		{"2001:db8:ffff::4", "2001:db8:ffff::4/128", ""},
		{"::/0", "::/0", ""},
		{"198.51.100.4/24", "", "did you mean 198.51.100.0/24?"},
		{"198.51.100.0/33", "", `"198.51.100.0/33"`},
		{"fe80::1%eth0", "", `"fe80::1%eth0"`},
		{"", "", `""`},
	} {
		got, err := config.ParseDst(tt.in)
		switch {
		case tt.err == "" && err != nil:
			t.Errorf("ParseDst(%q): %v, want %s", tt.in, err, tt.want)
		case tt.err == "" && got != netip.MustParsePrefix(tt.want):
			t.Errorf("ParseDst(%q) = %s, want %s", tt.in, got, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("ParseDst(%q) = %v, %v; want an error containing %s", tt.in, got, err, tt.err)
		}
	}
}

// TestConfigLoadIntents: the one loader of a run gives the file and its
// intents, and any problem, of the file (Load) or of its intents (a uid
// that does not exist), as bad input.
func TestConfigLoadIntents(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"good.yaml":    "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4, 203.0.113.0/24]\n",
		"bad.yaml":     "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.300\n",
		"nouser.yaml":  "rules:\n  - to: 192.0.2.22\n    uid: no-such-user-of-egress-snat\n",
		"partner.yaml": "rules:\n  - to: 192.0.2.22\n    dst-file: missing.txt\n",
	})
	f, intents, err := config.LoadIntents(filepath.Join(dir, "good.yaml"))
	if err != nil || f == nil || len(f.Rules) != 1 {
		t.Fatalf("good file: %v, %v", f, err)
	}
	if diff := cmp.Diff([]string{"198.51.100.4/32 -> 192.0.2.22", "203.0.113.0/24 -> 192.0.2.22"}, intentStrings(intents)); diff != "" {
		t.Errorf("intents (-want +got):\n%s", diff)
	}
	for name, want := range map[string]string{"bad.yaml": "198.51.100.300", "nouser.yaml": "no-such-user-of-egress-snat", "partner.yaml": "missing.txt", "none.yaml": "none.yaml"} {
		f, intents, err := config.LoadIntents(filepath.Join(dir, name))
		var inv *snat.InvalidError
		if !errors.As(err, &inv) || f != nil || intents != nil {
			t.Errorf("%s: %v, %v, %v; want bad input and nothing else", name, f, intents, err)
			continue
		}
		wantErrNaming(t, name, err, []string{want})
	}
}

// TestPoolRule: to: PREFIX is a pool, with sticky; what cannot go with
// one is refused naming the line or the key.
func TestPoolRule(t *testing.T) {
	f, err := config.Decode(strings.NewReader("rules:\n  - to: 2001:db8:1::/64\n    sticky: destination\n    dst: [2001:db8:ffff::/48]\n  - to: 2001:db8:2::/120\n    from: [fd00:88::/64]\n"))
	if err != nil {
		t.Fatal(err)
	}
	in, err := f.Intents()
	if err != nil {
		t.Fatal(err)
	}
	if len(in) != 2 || in[0].Pool != netip.MustParsePrefix("2001:db8:1::/64") || in[0].Sticky != snat.StickyDestination || len(in[0].To) != 0 ||
		in[1].Pool != netip.MustParsePrefix("2001:db8:2::/120") || in[1].Dst != netip.MustParsePrefix("::/0") {
		t.Errorf("intents %+v, want the /64 per destination and the /120 for every destination", in)
	}
	for doc, want := range map[string]string{
		"rules:\n  - to: 2001:db8::/48\n    dst: [2001:db8:ffff::/48]\n":                         "larger than a /64",
		"rules:\n  - to: [2001:db8:1::/64]\n    dst: [2001:db8:ffff::/48]\n":                     "line 2: a pool",
		"rules:\n  - to: 2001:db8:1::/64\n    spread: true\n    dst: [2001:db8:ffff::/48]\n":     "leave out 'spread'",
		"rules:\n  - to: 2001:db8::22\n    sticky: sender\n    dst: [2001:db8:ffff::/48]\n":      "'sticky' is for a pool",
		"rules:\n  - to: 2001:db8:1::/64\n    sticky: hourly\n    dst: [2001:db8:ffff::/48]\n":   `sticky "hourly"`,
		"rules:\n  - to: 2001:db8:1::/64\n    dst: [198.51.100.0/24]\n":                          "different address families",
		"rules:\n  - to: 2001:db8:1::/64\n    method: route\n    dst: [2001:db8:ffff::/48]\n":    "method snat",
		"rules:\n  - to: 2001:db8:1::/64\n    via: 2001:db8::1\n    dst: [2001:db8:ffff::/48]\n": "'via'",
	} {
		if _, err := config.Decode(strings.NewReader(doc)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", doc, err, want)
		}
	}
}

// TestToPorts: to-ports reads into the intents; a bad range, one on a
// pool and one with method route are refused, naming the value.
func TestToPorts(t *testing.T) {
	f, err := config.Decode(strings.NewReader("rules:\n  - to: 192.0.2.22\n    dst: 203.0.113.9\n    to-ports: 40000-40007\n"))
	if err != nil {
		t.Fatal(err)
	}
	ins, err := f.Intents()
	if err != nil || len(ins) != 1 || ins[0].Ports != (snat.Ports{Lo: 40000, Hi: 40007}) {
		t.Fatalf("intents %+v, %v; want one with ports 40000-40007", ins, err)
	}
	for _, tc := range []struct{ rule, want string }{
		{"to: 192.0.2.22\n    dst: 203.0.113.9\n    to-ports: 40007-40000", `"40007-40000"`},
		{"to: 192.0.2.22\n    dst: 203.0.113.9\n    to-ports: 0-10", `"0-10"`},
		{"to: 192.0.2.22\n    dst: 203.0.113.9\n    to-ports: lots", `"lots"`},
		{"to: 2001:db8:1::/64\n    dst: 2001:db8:ffff::/48\n    to-ports: 40000-40007", "pool"},
		{"to: 192.0.2.22\n    dst: 203.0.113.9\n    method: route\n    to-ports: 40000", "method snat"},
	} {
		_, err := config.Decode(strings.NewReader("rules:\n  - " + tc.rule + "\n"))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want an error naming %s", tc.rule, err, tc.want)
		}
	}
}
