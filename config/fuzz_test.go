package config_test

// Fuzz target for the desired-state decoder (scripts/fuzz.sh runs it for a
// bounded time; plain `go test` runs the seeds and testdata/fuzz).

import (
	"bytes"
	"net/netip"
	"slices"
	"strconv"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

var decodeSeeds = []string{
	"rules: []\n",
	`rules:
  - to: 192.0.2.22
    dst: [198.51.100.0/24, 203.0.113.7]
    out: eth0
  - to: 2001:db8::23
    dst: [2001:db8:ffff::/48]
  - to: 192.0.2.23
    dst-file: partners.txt
  - to: [192.0.2.22, 192.0.2.23]
    spread: true
    dst: [203.0.113.0/24]
  - to: [192.0.2.22=3, 192.0.2.23]
    spread: true
    dst: [203.0.113.8]
  - to: [192.0.2.24, 192.0.2.25]
    dst: 198.18.0.0/16
`,
	"rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    colour: red\n",
	"rules:\n  - to: 192.0.2.300\n    dst: [198.51.100.1/24]\n",
	"rules:\n  - to: [192.0.2.22, 2001:db8::22]\n    dst: [::/0]\n",
	"rules:\n  - to: {a: b}\n    dst: [[x]]\n",
	"rules: &r\n  - to: 192.0.2.22\n    dst: *r\n",
	"rules:\n  - &a to: 192.0.2.22\n    dst: [198.51.100.4]\n  - <<: *a\n",
	"rules: []\n---\nrules: []\n",
	"rule:\n\t- to: x\n",
	"",
	// Issue #15: an address twice, an interface name that is not one.
	"rules:\n  - to: [192.0.2.22, 192.0.2.22]\n    dst: [198.51.100.4]\n",
	"rules:\n  - to: [2001:db8::22, 2001:DB8::22]\n    spread: true\n    dst: [2001:db8:ffff::4]\n",
	"rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: \"eth0\\nINJECTED\"\n",
	"rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: eth0:1\n",
	"rules:\n  - to: 192.0.2.22\n    dst-file: /dev/zero\n",
	"%YAML 1.2\n--- !!map\nrules: !!seq\n  - to: !!str 192.0.2.22\n    dst: !!str 198.51.100.4\n    spread: !!bool yes\n",
}

// mirror is File with plain types, to write a decoded file back as YAML.
type mirror struct {
	Rules []mirrorRule `yaml:"rules"`
}

type mirrorRule struct {
	To      []string `yaml:"to"`
	Dst     []string `yaml:"dst,omitempty"`
	DstFile string   `yaml:"dst-file,omitempty"`
	Out     string   `yaml:"out,omitempty"`
	Spread  bool     `yaml:"spread,omitempty"`
}

func toMirror(f *config.File) mirror {
	m := mirror{Rules: []mirrorRule{}}
	for _, r := range f.Rules {
		mr := mirrorRule{DstFile: r.DstFile, Out: r.Out, Spread: r.Spread}
		addrs, weights, weighted := snat.Weights(r.To.Addrs)
		for i, a := range addrs {
			v := a.String()
			if weighted {
				v += "=" + strconv.Itoa(weights[i])
			}
			mr.To = append(mr.To, v)
		}
		for _, p := range r.Dst {
			mr.Dst = append(mr.Dst, p.String())
		}
		m.Rules = append(m.Rules, mr)
	}
	return m
}

// FuzzDecode: Decode never panics, and a file it accepts is well formed
// (every rule has a source and a destination, one family, no zones, no
// host bits) and means the same when written back as YAML and decoded
// again.
func FuzzDecode(f *testing.F) {
	for _, s := range decodeSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := config.Decode(bytes.NewReader(data))
		if err != nil {
			if len(err.Error()) > 64<<10 {
				t.Fatalf("error message of %d bytes", len(err.Error()))
			}
			return
		}
		for i, r := range file.Rules {
			to := r.To.Addrs
			if len(to) == 0 || (len(r.Dst) == 0 && r.DstFile == "") {
				t.Fatalf("rule %d accepted without a source or a destination: %+v", i+1, r)
			}
			if r.To.Weighted && !r.Spread {
				t.Fatalf("rule %d: weights accepted without spread", i+1)
			}
			distinct, _, _ := snat.Weights(to)
			for k, a := range distinct {
				if !a.IsValid() || a.Zone() != "" || a.Is4() != to[0].Is4() {
					t.Fatalf("rule %d: source %v accepted (first source %v)", i+1, a, to[0])
				}
				if slices.Contains(distinct[:k], a) {
					t.Fatalf("rule %d: source %v accepted twice", i+1, a)
				}
			}
			if r.Out != "" && config.CheckInterface(r.Out) != nil {
				t.Fatalf("rule %d: out %q accepted", i+1, r.Out)
			}
			for _, p := range r.Dst {
				if !p.IsValid() || p.Masked() != p || p.Addr().Zone() != "" || p.Addr().Is4() != to[0].Is4() {
					t.Fatalf("rule %d: destination %v accepted for source %v", i+1, p, to[0])
				}
			}
		}
		if _, err := file.Intents(); err != nil {
			t.Fatalf("Decode accepted a file whose intents fail: %v", err)
		}
		out, err := yaml.Marshal(toMirror(file))
		if err != nil {
			t.Fatalf("writing back: %v", err)
		}
		again, err := config.Decode(bytes.NewReader(out))
		if err != nil {
			t.Fatalf("decoding what was written back: %v\n%s", err, out)
		}
		if !slices.EqualFunc(file.Rules, again.Rules, sameRule) {
			t.Fatalf("round trip changed the rules:\n%+v\n%+v\nwritten:\n%s", file.Rules, again.Rules, out)
		}
	})
}

func sameRule(a, b config.Rule) bool {
	// Weighted is not compared: equal weights (=2, =2) write back as none.
	return slices.Equal(a.To.Addrs, b.To.Addrs) &&
		slices.EqualFunc(a.Dst, b.Dst, func(x, y netip.Prefix) bool { return x == y }) &&
		a.DstFile == b.DstFile && a.Out == b.Out && a.Spread == b.Spread
}
