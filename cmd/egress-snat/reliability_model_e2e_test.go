package main

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// srcModel is the expected state of a random sequence, kept without any of
// egress-snat's code: the source each destination prefix was given, and
// the kernel's longest-prefix rule for which one a new connection gets.
type srcModel map[netip.Prefix]netip.Addr

// natural is the source the lab's host picks by itself for each family.
var modelNatural = map[bool]netip.Addr{
	true:  netip.MustParseAddr("192.0.2.250"),
	false: netip.MustParseAddr("2001:db8::250"),
}

// source is what the far side must see for a new connection to dst.
func (m srcModel) source(dst netip.Addr) netip.Addr {
	best, src := -1, modelNatural[dst.Is4()]
	for p, a := range m {
		if p.Contains(dst) && p.Bits() > best {
			best, src = p.Bits(), a
		}
	}
	return src
}

// apply changes the model as one command says it should, then forgets the
// rules that keep the natural source where nothing broader would rewrite
// it, as set --help documents: "When the natural source already is --to, no
// rule is needed and none is installed, unless a broader rule would
// otherwise rewrite it." So "set --to NATURAL --dst D" followed by a
// broader set leaves D with the broader rule's source, while the other
// order keeps D natural: the order matters (reported on issue 16).
func (m srcModel) apply(args []string, files map[string]srcModel) srcModel {
	m = m.step(args, files)
	for p, a := range m {
		if a == modelNatural[p.Addr().Is4()] && m.broader(p) == a {
			delete(m, p)
		}
	}
	return m
}

// broader is the source of the longest prefix strictly containing p.
func (m srcModel) broader(p netip.Prefix) netip.Addr {
	best, src := -1, modelNatural[p.Addr().Is4()]
	for q, a := range m {
		if q.Bits() < p.Bits() && q.Contains(p.Addr()) && q.Bits() > best {
			best, src = q.Bits(), a
		}
	}
	return src
}

func (m srcModel) step(args []string, files map[string]srcModel) srcModel {
	switch args[0] {
	case "set": // set --to A [--dst D]
		m[modelDst(args)] = netip.MustParseAddr(args[2])
	case "unset": // unset --dst D: exactly that rule
		delete(m, modelDst(args))
	case "apply": // apply -f FILE: the file is the whole state
		return maps.Clone(files[args[2]])
	case "clear":
		return srcModel{}
	}
	return m
}

// modelDst is the --dst of args, or everything of --to's family.
func modelDst(args []string) netip.Prefix {
	to := netip.MustParseAddr(args[2])
	if i := slices.Index(args, "--dst"); i >= 0 {
		if p, err := netip.ParsePrefix(args[i+1]); err == nil {
			return p
		}
		a := netip.MustParseAddr(args[i+1])
		return netip.PrefixFrom(a, a.BitLen())
	}
	if to.Is4() {
		return netip.MustParsePrefix("0.0.0.0/0")
	}
	return netip.MustParsePrefix("::/0")
}

// modelFiles are desired states for apply -f, as files and as models.
var modelFiles = map[string]struct {
	yaml  string
	model srcModel
}{
	"mixed.yaml": {"rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.0/24]\n  - to: 192.0.2.23\n    dst: [198.51.100.5, 0.0.0.0/0]\n  - to: 2001:db8::23\n    dst: [2001:db8:ffff::/48]\n",
		srcModel{
			netip.MustParsePrefix("198.51.100.0/24"):    netip.MustParseAddr("192.0.2.22"),
			netip.MustParsePrefix("198.51.100.5/32"):    netip.MustParseAddr("192.0.2.23"),
			netip.MustParsePrefix("0.0.0.0/0"):          netip.MustParseAddr("192.0.2.23"),
			netip.MustParsePrefix("2001:db8:ffff::/48"): netip.MustParseAddr("2001:db8::23"),
		}},
	"empty.yaml": {"rules: []\n", srcModel{}},
}

// modelOp returns one random command of the kinds the model knows.
func modelOp(rng *rand.Rand, files []string) []string {
	pick := func(s ...string) string { return s[rng.IntN(len(s))] }
	v4 := rng.IntN(3) != 0
	dst := pick("198.51.100.4", "198.51.100.5", "198.51.100.0/24", "203.0.113.7", "0.0.0.0/0", "")
	to := pick("192.0.2.22", "192.0.2.23", "192.0.2.250")
	if !v4 {
		dst = pick("2001:db8:ffff::4", "2001:db8:ffff::/48", "::/0", "")
		to = pick("2001:db8::22", "2001:db8::23", "2001:db8::250")
	}
	switch n := rng.IntN(100); {
	case n < 50:
		args := []string{"set", "--to", to}
		if dst != "" {
			args = append(args, "--dst", dst)
		}
		return args
	case n < 80:
		if dst == "" {
			dst = map[bool]string{true: "0.0.0.0/0", false: "::/0"}[v4]
		}
		// to names the family for modelDst; unset has no --to.
		return []string{"unset", "--to", to, "--dst", dst}
	case n < 92:
		return []string{"apply", "-f", pick(files...)}
	default:
		return []string{"clear"}
	}
}

// modelProbes are the far hosts: at least one inside every destination a
// rule can name.
var modelProbes = []string{"198.51.100.4", "198.51.100.5", "203.0.113.7", "2001:db8:ffff::4"}

// TestRandomSequencesAgainstAModel runs random sequences of set, unset,
// apply and clear and, after every step, holds the host to a model written
// without egress-snat's code: the far side must see, for each far host, the
// source of the longest model prefix holding it (or the natural source),
// and list --json must show exactly the model's rules that change the
// source (a rule keeping the natural source may be listed, or left out as
// redundant, but only if the model has it).
//
//	EGRESS_SNAT_MODEL_SEQUENCES sequences (default 50), of
//	EGRESS_SNAT_MODEL_STEPS     steps each (default 10)
func TestRandomSequencesAgainstAModel(t *testing.T) {
	t.Parallel()
	n := relEnvInt(t, "EGRESS_SNAT_MODEL_SEQUENCES", 50)
	steps := relEnvInt(t, "EGRESS_SNAT_MODEL_STEPS", 10)
	rng := relRand(t)
	l := newLab(t)
	dir := t.TempDir()
	files := map[string]srcModel{}
	for name, f := range modelFiles {
		files[relWrite(t, dir, name, f.yaml)] = f.model
	}
	paths := slices.Sorted(maps.Keys(files))
	start := time.Now()
	passed, done, probes := 0, 0, 0
	for seq := 0; seq < n && !t.Failed(); seq++ {
		model := srcModel{}
		var history []string
		for i := 0; i < steps && !t.Failed(); i++ {
			args := modelOp(rng, paths)
			run := args
			if args[0] == "unset" {
				run = slices.Delete(slices.Clone(args), 1, 3) // the --to was for the model
			}
			history = append(history, strings.Join(run, " "))
			mustES(t, l, run...)
			model = model.apply(args, files)
			done++
			where := fmt.Sprintf("sequence %d step %d (%s)\nhistory:\n  %s", seq, i, strings.Join(run, " "), strings.Join(history, "\n  "))

			for _, p := range modelProbes {
				want := model.source(netip.MustParseAddr(p)).String()
				if got := l.SourceSeen(t, p); got != want {
					t.Errorf("%s:\nnew connection to %s: far side saw %q, the model says %s", where, p, got, want)
				}
				probes++
			}
			wantRules, maybe := map[string]string{}, map[string]bool{}
			for p, a := range model {
				if a == modelNatural[p.Addr().Is4()] {
					maybe[p.String()] = true
				} else {
					wantRules[p.String()] = a.String()
				}
			}
			gotRules := map[string]string{}
			for _, r := range parseList(t, mustES(t, l, "list", "--json")).Rules {
				switch {
				case len(r.To) == 0 && maybe[r.Dst]:
				case len(r.To) == 1:
					gotRules[r.Dst] = r.To[0]
				default:
					t.Errorf("%s:\nlist has %+v, which the model does not", where, r)
				}
			}
			if diff := cmp.Diff(wantRules, gotRules); diff != "" {
				t.Errorf("%s:\nlist --json against the model (-model +list):\n%s", where, diff)
			}
		}
		mustES(t, l, "clear")
		if !t.Failed() {
			passed++
		}
	}
	relFigure(t, "model_sequences", passed)
	relFigure(t, "model_steps", done)
	relFigure(t, "model_probes", probes)
	t.Logf("%d of %d sequences passed, %d steps, %d far-side probes in %s", passed, n, done, probes, time.Since(start).Round(time.Second))
}
