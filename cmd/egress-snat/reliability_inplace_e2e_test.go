package main

// Kills during a change in place. When one set is all that changes, the
// set is changed where it is (backend/iptables/inplace.go): its guarantee is per
// destination, not per set. This test kills apply -9 while it changes a
// set of 20,000 destinations by 8,000, and judges what the kernel holds
// from outside, by ipset save and iptables-save text: every destination in
// both files is in the set, none outside them is, and the chain is the one
// both files give. Then a complete apply must finish the change.

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// relSetMembers returns the members of every set of ours, from ipset save.
func relSetMembers(t *testing.T, l *lab.Lab) map[string]map[string]bool {
	t.Helper()
	out := map[string]map[string]bool{}
	for line := range strings.Lines(l.Run(t, "ipset", "save")) {
		f := strings.Fields(line)
		if len(f) < 3 || !strings.HasPrefix(f[1], "egress-snat") {
			continue
		}
		if out[f[1]] == nil {
			out[f[1]] = map[string]bool{}
		}
		if f[0] == "add" {
			out[f[1]][strings.TrimSuffix(f[2], "/32")] = true
		}
	}
	return out
}

func TestCrashDuringInPlaceChange(t *testing.T) {
	iptablesOnly(t, "it kills an ipset restore changing a set in place (TestNFTCrashDuringApply)")
	t.Parallel()
	kills := relEnvInt(t, "EGRESS_SNAT_KILLS", 20)
	rng := relRand(t)
	l := newLab(t)
	dir := t.TempDir()
	hosts := func(from, to int) (string, map[string]bool) {
		var s strings.Builder
		set := map[string]bool{}
		for i := from; i < to; i++ {
			a := fmt.Sprintf("100.64.%d.%d", i/256, i%256)
			s.WriteString(a + "\n")
			set[a] = true
		}
		return s.String(), set
	}
	textA, inA := hosts(0, 20000)
	textB, inB := hosts(4000, 24000)
	relWrite(t, dir, "a.txt", textA)
	relWrite(t, dir, "b.txt", textB)
	file := map[string]string{
		"A": relWrite(t, dir, "a.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: a.txt\n"),
		"B": relWrite(t, dir, "b.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: b.txt\n"),
	}
	both := map[string]bool{}
	for a := range inA {
		if inB[a] {
			both[a] = true
		}
	}

	mustES(t, l, "apply", "-f", file["A"])
	chain := l.Run(t, iptablesCmd(4)+"-save", "-t", "nat")
	sets := relSetMembers(t, l)
	if len(sets) != 1 {
		t.Fatalf("want one set after apply -f A, have %v", slices.Collect(maps.Keys(sets)))
	}
	var name string
	for name = range sets {
	}
	// A switch is one ipset step, in place, under the same name.
	var took []time.Duration
	for _, target := range []string{"B", "A", "B", "A"} {
		out := mustES(t, l, "apply", "-f", file[target], "--dry-run")
		if !strings.Contains(out, "change set "+name+" in place: 4000 added, 4000 deleted") {
			t.Fatalf("the switch to %s is not a change of %s in place:\n%s", target, name, out)
		}
		start := time.Now()
		mustES(t, l, "apply", "-f", file[target])
		took = append(took, time.Since(start))
	}
	window, _ := relStats(took)
	t.Logf("a switch in place takes about %s", window)

	counts := map[string]int{}
	target := "A"
	for i := 0; i < kills && !t.Failed(); i++ {
		target = map[string]string{"A": "B", "B": "A"}[target]
		p := relStart(t, l, "apply", "-f", file[target])
		time.Sleep(time.Duration(rng.Int64N(int64(window))))
		pid := p.cmd.Process.Pid
		writing := relWriting(pid)
		finished := p.exited()
		syscall.Kill(-pid, syscall.SIGKILL)
		code, ok := p.wait(10 * time.Second)
		if !ok || !relGroupGone(pid, 20*time.Second) {
			t.Fatalf("kill %d: egress-snat or its children still running after SIGKILL", i)
		}
		if finished || code == 0 {
			counts["finished before the kill"]++
		} else if slices.Contains(writing, "ipset") {
			counts["killed during the ipset write"]++
		}

		if now := l.Run(t, iptablesCmd(4)+"-save", "-t", "nat"); relCountersAll(now) != relCountersAll(chain) {
			t.Fatalf("kill %d: the chain changed (-before +now):\n%s", i, relDiff(relCountersAll(chain), relCountersAll(now)))
		}
		sets := relSetMembers(t, l)
		members, ok := sets[name]
		if !ok || len(sets) != 1 {
			t.Fatalf("kill %d: sets %v, want %s alone", i, slices.Collect(maps.Keys(sets)), name)
		}
		for a := range both {
			if !members[a] {
				t.Fatalf("kill %d (writing %v): %s, in both files, is missing from the set", i, writing, a)
			}
		}
		for a := range members {
			if !inA[a] && !inB[a] {
				t.Fatalf("kill %d: %s, in neither file, is in the set", i, a)
			}
		}
		onlyA, onlyB := 0, 0
		for a := range members {
			switch {
			case !inB[a]:
				onlyA++
			case !inA[a]:
				onlyB++
			}
		}
		switch {
		case onlyA == 4000 && onlyB == 0:
			counts["left A whole"]++
		case onlyA == 0 && onlyB == 4000:
			counts["left B whole"]++
		default:
			counts["left between A and B"]++
		}
		if rng.IntN(2) == 0 || i == kills-1 {
			target = []string{"A", "B"}[rng.IntN(2)]
			mustES(t, l, "apply", "-f", file[target])
			if code, kinds := relCheck(t, l, file[target]); code != checkInSync {
				t.Fatalf("kill %d: after a complete apply of %s, check found %v", i, target, kinds)
			}
			want := map[string]map[string]bool{"A": inA, "B": inB}[target]
			if got := relSetMembers(t, l)[name]; !maps.Equal(got, want) {
				t.Fatalf("kill %d: after a complete apply of %s the set holds %d members, want %d", i, target, len(got), len(want))
			}
		}
	}
	t.Logf("kills: %v", counts)
	relFigure(t, "inplace_kills", kills)
	relFigure(t, "inplace_kills_during_ipset", counts["killed during the ipset write"])
	relFigure(t, "inplace_kills_left_between", counts["left between A and B"])
}

// relCountersAll is an iptables-save text with its comments dropped and
// every counter zeroed.
func relCountersAll(text string) string {
	var b strings.Builder
	for line := range strings.Lines(text) {
		if !strings.HasPrefix(line, "#") {
			b.WriteString(relCounters(line))
		}
	}
	return b.String()
}
