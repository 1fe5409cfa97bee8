package iptables_test

// The fakes held to the kernel: the same restore and ipset payloads go to
// FakeTables/FakeIPSets and to a real namespace (the backend
// EGRESS_SNAT_IPTABLES names, or the host's iptables), and after every step
// both must have accepted or both refused, and hold the same rules, jumps,
// chain and set members. The unit tests trust the fakes; this is what the
// fakes are trusted on.

import (
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/snat"
)

// kernelStep is one payload: for ipset restore (family 0) or for
// iptables-restore --noflush of family 4 or 6.
type kernelStep struct {
	name    string
	family  int
	payload string
	// refused is what the kernel does with it, checked too, so that a
	// case meant to be refused really is.
	refused bool
}

const (
	set4 = iptables.SetPrefix + "4-diff"
	set6 = iptables.SetPrefix + "6-diff"
	jump = "-m comment --comment egress-snat -j EGRESS-SNAT"
)

var kernelSteps = []kernelStep{
	{"create sets", 0, "create " + set4 + " hash:net family inet hashsize 1024 maxelem 65536\nadd " + set4 + " 198.51.100.0/24\nadd " + set4 + " 203.0.113.4\n" +
		"create " + set6 + " hash:net family inet6 hashsize 1024 maxelem 65536\nadd " + set6 + " 2001:db8:ffff::/48\n", false},
	{"the whole space in hash:net", 0, "add " + set4 + " 0.0.0.0/0\n", true},
	{"the whole snat.IPv6 space in hash:net", 0, "add " + set6 + " ::/0\n", true},
	{"lines before a refused one", 0, "add " + set4 + " 192.0.2.128/25\nadd " + set4 + " 0.0.0.0/0\n", true},
	{"a member already there", 0, "add " + set4 + " 198.51.100.0/24\n", true},
	{"a set that exists", 0, "create " + set4 + " hash:net family inet hashsize 1024 maxelem 65536\n", true},
	{"a host bits prefix is masked", 0, "add " + set4 + " 203.0.113.77/25\n", false},
	{"an snat.IPv6 member in an snat.IPv4 set", 0, "add " + set4 + " 2001:db8::1\n", true},
	{"an snat.IPv4 member in an snat.IPv6 set", 0, "add " + set6 + " 198.51.100.9\n", true},
	{"a member of a missing set", 0, "add " + iptables.SetPrefix + "4-missing 198.51.100.1\n", true},
	{"destroy a missing set", 0, "destroy " + iptables.SetPrefix + "4-missing\n", true},
	{"swap sets of two families", 0, "swap " + set4 + " " + set6 + "\n", true},

	{"chain, jump and rules", 4, "*nat\n:EGRESS-SNAT - [0:0]\n-I POSTROUTING 1 " + jump + "\n" +
		"-A EGRESS-SNAT -s 192.0.2.250/32 -d 198.51.100.4/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22\n" +
		"-A EGRESS-SNAT -s 192.0.2.250/32 -o eth0 -m set --match-set " + set4 + " dst -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23\n" +
		"-A EGRESS-SNAT -s 192.0.2.250/32 -d 203.0.113.0/24 -o eth0 -m comment --comment egress-snat -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source 192.0.2.22\n" +
		"-A EGRESS-SNAT -s 192.0.2.250/32 -d 198.51.100.5/32 -o eth0 -m comment --comment egress-snat -j RETURN\n" +
		"COMMIT\n", false},
	{"delete a member", 0, "del " + set4 + " 203.0.113.4\n", false},
	{"delete a member not there", 0, "del " + set4 + " 203.0.113.4\n", true},
	{"add it back", 0, "add " + set4 + " 203.0.113.4\n", false},
	{"rename a set in use", 0, "rename " + set4 + " " + set4 + "-r\n", true},
	{"rename a set no rule uses", 0, "create " + set4 + "-spare hash:net family inet hashsize 1024 maxelem 65536\nrename " + set4 + "-spare " + set4 + "-r\n", false},
	{"rename onto a set that exists", 0, "rename " + set4 + "-r " + set6 + "\n", true},
	{"destroy the renamed set", 0, "destroy " + set4 + "-r\n", false},
	{"a host address without its length", 4, "*nat\n-A EGRESS-SNAT -s 192.0.2.250 -d 198.51.100.6 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22\nCOMMIT\n", false},
	{"delete a missing rule", 4, "*nat\n-D EGRESS-SNAT -s 192.0.2.250/32 -d 198.51.100.99/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.22\nCOMMIT\n", true},
	{"jump to a missing chain", 4, "*nat\n-A EGRESS-SNAT -d 198.51.100.7/32 -j EGRESS-MISSING\nCOMMIT\n", true},
	{"a set that does not exist", 4, "*nat\n-A EGRESS-SNAT -s 192.0.2.250/32 -o eth0 -m set --match-set " + iptables.SetPrefix + "4-missing dst -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23\nCOMMIT\n", true},
	{"insert past the end", 4, "*nat\n-I POSTROUTING 9 " + jump + "\nCOMMIT\n", true},
	{"a failing line undoes the whole commit", 4, "*nat\n-D POSTROUTING " + jump + "\n-D POSTROUTING " + jump + "\nCOMMIT\n", true},
	{"remove a chain still jumped to", 4, "*nat\n:EGRESS-SNAT - [0:0]\n-X EGRESS-SNAT\nCOMMIT\n", true},
	{"no COMMIT", 4, "*nat\n-A EGRESS-SNAT -d 198.51.100.8/32 -o eth0 -m comment --comment egress-snat -j RETURN\n", true},
	{"destroy a set in use", 0, "destroy " + set4 + "\n", true},
	{"rewrite the chain", 4, "*nat\n:EGRESS-SNAT - [0:0]\n-D POSTROUTING " + jump + "\n-I POSTROUTING 1 " + jump + "\n" +
		"-A EGRESS-SNAT -s 192.0.2.250/32 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 192.0.2.23\nCOMMIT\n", false},

	{"snat.IPv6 chain, jump and rules", 6, "*nat\n:EGRESS-SNAT - [0:0]\n-I POSTROUTING 1 " + jump + "\n" +
		"-A EGRESS-SNAT -s 2001:db8::250/128 -d 2001:db8:ffff::4/128 -o eth0 -m comment --comment egress-snat -j SNAT --to-source 2001:db8::22\n" +
		"-A EGRESS-SNAT -s 2001:db8::250/128 -o eth0 -m set --match-set " + set6 + " dst -m comment --comment egress-snat -j SNAT --to-source 2001:db8::23\n" +
		"COMMIT\n", false},
	{"snat.IPv6: an snat.IPv4 set", 6, "*nat\n-A EGRESS-SNAT -o eth0 -m set --match-set " + set4 + " dst -m comment --comment egress-snat -j SNAT --to-source 2001:db8::23\nCOMMIT\n", true},

	{"clear snat.IPv4", 4, "*nat\n:EGRESS-SNAT - [0:0]\n-D POSTROUTING " + jump + "\n-X EGRESS-SNAT\nCOMMIT\n", false},
	{"clear snat.IPv6", 6, "*nat\n:EGRESS-SNAT - [0:0]\n-D POSTROUTING " + jump + "\n-X EGRESS-SNAT\nCOMMIT\n", false},
	{"destroy the sets no rule uses", 0, "destroy " + set4 + "\ndestroy " + set6 + "\n", false},
}

func TestFakesMatchTheKernel(t *testing.T) {
	lab.Require(t)
	l := lab.New(t)
	backend, err := iptables.DetectFlavour(os.Getenv("EGRESS_SNAT_IPTABLES"))
	if err != nil {
		t.Fatal(err)
	}
	var real iptables.ExecTables
	if err := lab.Do(l.Host, func() (err error) { real, err = iptables.NewExecTables(backend, 5*time.Second); return err }); err != nil {
		t.Fatal(err)
	}
	realSets := iptables.ExecIPSets{}
	ft, fs := iptables.NewFakeKernel()

	for _, st := range kernelSteps {
		var fakeErr, realErr error
		if st.family == 0 {
			fakeErr = fs.Restore(st.payload)
			realErr = lab.Do(l.Host, func() error { return realSets.Restore(st.payload) })
		} else {
			fakeErr = ft.Restore(family(st.family), st.payload)
			realErr = lab.Do(l.Host, func() error { return real.Restore(family(st.family), st.payload) })
		}
		if (realErr != nil) != st.refused {
			t.Errorf("%s: the kernel (%s): %v, want refused=%v; payload:\n%s", st.name, backend, realErr, st.refused, st.payload)
		}
		if (fakeErr != nil) != (realErr != nil) {
			t.Errorf("%s: fake: %v, kernel (%s): %v; payload:\n%s", st.name, fakeErr, backend, realErr, st.payload)
		}
		var realSave [2]string
		var realSetText string
		if err := lab.Do(l.Host, func() (err error) {
			if realSetText, err = realSets.Save(); err != nil {
				return err
			}
			for i, f := range []snat.Family{snat.IPv4, snat.IPv6} {
				if realSave[i], err = real.SaveNAT(f); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		fakeSetText, _ := fs.Save()
		realSetsParsed, fakeSetsParsed := parseSets(t, realSetText), parseSets(t, fakeSetText)
		if diff := cmp.Diff(realSetsParsed, fakeSetsParsed); diff != "" {
			t.Errorf("after %s: sets (-kernel +fake):\n%s", st.name, diff)
		}
		for i, f := range []snat.Family{snat.IPv4, snat.IPv6} {
			fakeSave, _ := ft.SaveNAT(f)
			want, got := installed(t, f, realSave[i]), installed(t, f, fakeSave)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("after %s: IPv%d nat (-kernel +fake):\n%s\nkernel's save:\n%s\nfake's save:\n%s", st.name, 4+2*i, diff, realSave[i], fakeSave)
			}
		}
		if t.Failed() {
			return // later steps build on this one
		}
	}
}

func family(n int) snat.Family {
	if n == 6 {
		return snat.IPv6
	}
	return snat.IPv4
}

// setView is a set as the comparison sees it: members as text, sorted.
type setView struct {
	Family           snat.Family
	Members, NoMatch []string
}

func parseSets(t *testing.T, text string) map[string]setView {
	t.Helper()
	sets, err := iptables.ParseSets(text)
	if err != nil {
		t.Fatalf("%v in:\n%s", err, text)
	}
	out := map[string]setView{}
	for name, s := range sets {
		v := setView{Family: s.Family}
		for _, p := range s.Members {
			v.Members = append(v.Members, p.String())
		}
		for _, p := range s.NoMatch {
			v.NoMatch = append(v.NoMatch, p.String())
		}
		slices.Sort(v.Members)
		slices.Sort(v.NoMatch)
		out[name] = v
	}
	return out
}

// nat is what both sides must agree on of a nat table.
type nat struct {
	ChainExists bool
	Jumps       [][]string
	Rules       []string
	Foreign     []string
}

func installed(t *testing.T, f snat.Family, text string) nat {
	t.Helper()
	in, err := iptables.ParseSave(f, text, nil)
	if err != nil {
		t.Fatalf("ParseSave: %v in:\n%s", err, text)
	}
	n := nat{ChainExists: in.ChainExists, Jumps: in.Jumps, Foreign: in.Foreign}
	for _, r := range in.Rules {
		n.Rules = append(n.Rules, fmtRule(r))
	}
	return n
}

func fmtRule(r iptables.Rule) string { return strings.Join(r.Args(), " ") }
