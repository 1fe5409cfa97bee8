package main

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/snat"
)

// relCrashFiles writes the two 2,000-destination desired states the crash
// test alternates between and returns their paths. Between them, one IPv4
// set changes members, one keeps them, a single rule changes source, and the
// IPv6 set keeps its members under another source.
func relCrashFiles(t *testing.T) (a, b string) {
	t.Helper()
	dir := t.TempDir()
	hosts := func(from, to int) string {
		var s strings.Builder
		for i := from; i < to; i++ {
			fmt.Fprintf(&s, "100.64.%d.%d\n", i/256, i%256)
		}
		return s.String()
	}
	var nets strings.Builder
	for i := range 490 {
		fmt.Fprintf(&nets, "100.%d.%d.0/24\n", 96+i/256, i%256)
	}
	relWrite(t, dir, "a22.txt", "# 1,500 hosts\n"+hosts(0, 1500))
	relWrite(t, dir, "b22.txt", "# 1,500 hosts, 1,000 of them in a22.txt\n"+hosts(500, 2000))
	relWrite(t, dir, "nets.txt", nets.String())
	v6 := "[2001:db8:ffff::4, 2001:db8:aaaa::1, 2001:db8:aaaa::2, 2001:db8:aaaa::3, 2001:db8:aaaa::4, 2001:db8:aaaa::5, 2001:db8:aaaa::6, 2001:db8:aaaa::7, 2001:db8:aaaa::8]"
	file := func(hostsFile, single, six string) string {
		return fmt.Sprintf(`rules:
  - to: 192.0.2.22
    dst-file: %s
  - to: 192.0.2.23
    dst-file: nets.txt
  - to: %s
    dst: [198.51.100.4]
  - to: %s
    dst: %s
`, hostsFile, single, six, v6)
	}
	a = relWrite(t, dir, "a.yaml", file("a22.txt", "192.0.2.23", "2001:db8::22"))
	b = relWrite(t, dir, "b.yaml", file("b22.txt", "192.0.2.22", "2001:db8::23"))
	return a, b
}

// relStateOf names a family's state: "A", "B", or "neither", judged by
// the kernel's own texts (see relKernelText), not by egress-snat's parser.
func relStateOf(got map[snat.Family]string, f snat.Family, want map[string]map[snat.Family]string) string {
	for _, name := range []string{"A", "B"} {
		if got[f] == want[name][f] {
			return name
		}
	}
	return "neither"
}

// relInitval is the random hash seed ipset save prints in a create line:
// chosen by the kernel at each create, not part of what the set holds.
var relInitval = regexp.MustCompile(` initval 0x[0-9a-f]+`)

// relKernelText is, per family, what the kernel holds that decides the
// source of new connections, as its own tools print it: iptables-save -t
// nat (comments dropped, counters zeroed) followed by ipset save of every
// set that table names (members sorted, initval dropped). Two states are
// the same exactly when these texts are equal byte for byte.
func relKernelText(t *testing.T, l *lab.Lab) map[snat.Family]string {
	t.Helper()
	sets := map[string]string{} // name -> its ipset save lines
	var name string
	for line := range strings.Lines(lab.SortedIPSetSave(l.Run(t, "ipset", "save"))) {
		f := strings.Fields(line)
		if len(f) > 1 && (f[0] == "create" || f[0] == "add") {
			name = f[1]
		}
		sets[name] += relInitval.ReplaceAllString(line, "")
	}
	out := map[snat.Family]string{}
	for _, f := range snat.Families {
		var b strings.Builder
		var named []string
		for line := range strings.Lines(l.Run(t, iptablesCmd(int(f))+"-save", "-t", "nat")) {
			if strings.HasPrefix(line, "#") {
				continue
			}
			b.WriteString(relCounters(line))
			words := strings.Fields(line)
			if i := slices.Index(words, "--match-set"); i >= 0 && i+1 < len(words) {
				named = append(named, words[i+1])
			}
		}
		slices.Sort(named)
		for _, n := range slices.Compact(named) {
			b.WriteString(sets[n])
		}
		out[f] = b.String()
	}
	return out
}

// relWriters are the children through which egress-snat writes: a kill
// while one of them runs is a kill during a write.
var relWriters = []string{"iptables-restore", "ip6tables-restore", "iptables-nft-restore", "ip6tables-nft-restore",
	"iptables-legacy-restore", "ip6tables-legacy-restore", "ipset", "ip"}

// relWriting returns the write children of pid alive now, read from /proc
// (a child's argv[0] names the tool; pid's own is "ip" until ip netns exec
// has exec'd egress-snat, and then it has no children of that kind).
func relWriting(pid int) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 2 || f[1] != strconv.Itoa(pid) || f[0] == "Z" {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		argv0, _, _ := strings.Cut(string(cmdline), "\x00")
		if slices.Contains(relWriters, filepath.Base(argv0)) {
			out = append(out, filepath.Base(argv0))
		}
	}
	return out
}

// relLeftoverSets returns our sets that no rule refers to.
func relLeftoverSets(s relSaved) []string {
	used := map[string]bool{}
	for _, f := range snat.Families {
		for _, n := range s.in[f].SetNames {
			used[n] = true
		}
	}
	var out []string
	for _, n := range s.setNames {
		if !used[n] {
			out = append(out, n)
		}
	}
	return out
}

// TestCrashDuringApply kills egress-snat with SIGKILL at random moments of
// applies that alternate between two 2,000-destination files, sometimes the
// tool alone (its iptables-restore or ipset child runs on, orphaned),
// sometimes its whole process group (the child dies too, as with systemd's
// KillMode=control-group). Killed applies may follow each other, so some
// start from what an earlier kill left.
//
// After every kill, each family's nat table and the sets it names are,
// byte for byte as iptables-save and ipset save print them, exactly what a
// complete apply of file A or of file B left, never a mixture. A kill counts
// as "during a write" only when an iptables-restore, ipset or ip child of
// the killed process was alive a moment before it (read from /proc). The two families are written one after the other, so one
// may be A while the other is B; that is counted. The next apply that runs to
// its end converges: check -f exits 0 and no set is left over.
func TestCrashDuringApply(t *testing.T) {
	iptablesOnly(t, "it judges kills by iptables-save and ipset save (TestNFTCrashDuringApply)")
	t.Parallel()
	kills := relEnvInt(t, "EGRESS_SNAT_KILLS", 20)
	rng := relRand(t)
	l := newLab(t)
	relForeignRules(t, l)
	fa, fb := relCrashFiles(t)
	file := map[string]string{"A": fa, "B": fb}
	foreignBefore := notOurs(relRuleset(t, l))

	// The reference states, and how long a switch takes.
	want := map[string]map[snat.Family]string{}
	var took []time.Duration
	for _, name := range []string{"A", "B", "A", "B"} {
		start := time.Now()
		mustES(t, l, "apply", "-f", file[name])
		took = append(took, time.Since(start))
		got := relKernelText(t, l)
		if prev, ok := want[name]; ok && !maps.Equal(prev, got) {
			t.Fatalf("two complete applies of %s left different kernel texts:\n%s", name, relDiff(prev[snat.IPv4]+prev[snat.IPv6], got[snat.IPv4]+got[snat.IPv6]))
		}
		want[name] = got
	}
	for _, f := range snat.Families {
		if want["A"][f] == want["B"][f] {
			t.Fatalf("%s: files A and B give the same state", f)
		}
	}
	median, _ := relStats(took[1:])
	t.Logf("a switch between A and B takes about %s", median)
	window := median

	converge := func(i int, target string) {
		t.Helper()
		mustES(t, l, "apply", "-f", file[target])
		if code, kinds := relCheck(t, l, file[target]); code != checkInSync {
			t.Fatalf("kill %d: after a complete apply of %s, check found %v", i, target, kinds)
		}
		s, text := relRead(t, l), relKernelText(t, l)
		for _, f := range snat.Families {
			if got := relStateOf(text, f, want); got != target {
				t.Fatalf("kill %d: after a complete apply of %s, %s is %s:\n%s", i, target, f, got, relDiff(want[target][f], text[f]))
			}
		}
		if left := relLeftoverSets(s); len(left) > 0 {
			t.Errorf("kill %d: after a complete apply of %s, sets no rule uses are left: %v", i, target, left)
		}
	}

	counts := map[string]int{}
	converged := 0
	target := "A"
	for i := 0; i < kills && !t.Failed(); i++ {
		target = map[string]string{"A": "B", "B": "A"}[target]
		group := rng.IntN(2) == 0
		p := relStart(t, l, "apply", "-f", file[target])
		delay := time.Duration(rng.Int64N(int64(window)))
		time.Sleep(delay)
		pid := p.cmd.Process.Pid
		writing := relWriting(pid)
		finished := p.exited()
		if group {
			syscall.Kill(-pid, syscall.SIGKILL)
		} else {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		code, ok := p.wait(10 * time.Second)
		if !ok {
			t.Fatalf("kill %d: egress-snat still running 10s after SIGKILL", i)
		}
		if !relGroupGone(pid, 20*time.Second) {
			t.Fatalf("kill %d: children of the killed egress-snat still running after 20s", i)
		}
		switch {
		case finished || code == 0:
			counts["finished before the kill"]++
		case code != -1:
			t.Fatalf("kill %d: apply -f %s exited %d before the kill\nstderr:\n%s", i, target, code, p.stderr.String())
		case group:
			counts["killed with its children"]++
		default:
			counts["killed alone"]++
		}
		if !finished && code == -1 && len(writing) > 0 {
			counts["killed during a write"]++
			for _, w := range slices.Compact(slices.Sorted(slices.Values(writing))) {
				counts["killed during "+w]++
			}
		}

		text := relKernelText(t, l)
		states := map[snat.Family]string{}
		for _, f := range snat.Families {
			states[f] = relStateOf(text, f, want)
			if states[f] == "neither" {
				t.Fatalf("kill %d after %s of apply -f %s (group %v, writing %v): the %s nat table is neither A nor B\nagainst A (-A +now):\n%s\nagainst B (-B +now):\n%s",
					i, delay, target, group, writing, f, relDiff(want["A"][f], text[f]), relDiff(want["B"][f], text[f]))
			}
		}
		switch {
		case states[snat.IPv4] != states[snat.IPv6]:
			counts["families apart"]++
		case states[snat.IPv4] == target:
			counts["left the new state"]++
		default:
			counts["left the old state"]++
		}
		if got := notOurs(relRuleset(t, l)); got != foreignBefore {
			t.Fatalf("kill %d: foreign rules changed (-want +got):\n%s", i, relDiff(foreignBefore, got))
		}
		// Half the time the next apply runs to its end; otherwise the
		// next killed apply starts from what this one left.
		if rng.IntN(2) == 0 || i == kills-1 {
			target = []string{"A", "B"}[rng.IntN(2)]
			converge(i, target)
			converged++
		}
	}
	t.Logf("kills: %v; %d complete applies converged", counts, converged)
	relFigure(t, "kills", kills)
	relFigure(t, "kills_during_run", kills-counts["finished before the kill"])
	relFigure(t, "kills_during_write", counts["killed during a write"])
	relFigure(t, "kills_families_apart", counts["families apart"])
	relFigure(t, "kills_left_old", counts["left the old state"])
	relFigure(t, "kills_left_new", counts["left the new state"])
	relFigure(t, "kills_converged", converged)
	relFigure(t, "kill_apply_ms", relMS(median))
	wantSeenAfterCrash(t, l)
}

// wantSeenAfterCrash checks the far side once the last apply converged.
func wantSeenAfterCrash(t *testing.T, l *lab.Lab) {
	t.Helper()
	list := parseList(t, mustES(t, l, "list", "--json"))
	want := map[string]string{}
	for _, r := range list.Rules {
		if r.Dst == "198.51.100.4/32" || r.Dst == "2001:db8:ffff::4/128" {
			want[strings.Split(r.Dst, "/")[0]] = r.To[0]
		}
	}
	if len(want) != 2 {
		t.Fatalf("list after the crash test: %+v, want rules for 198.51.100.4 and 2001:db8:ffff::4", list.Rules)
	}
	wantSeen(t, l, want)
}
