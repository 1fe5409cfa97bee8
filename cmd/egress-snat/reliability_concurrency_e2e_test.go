package main

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// relOp is one writer of the concurrency test and what it reported.
type relOp struct {
	i          int
	args       []string
	dst        string // the destination it writes, as list prints it
	start, end time.Time
	code       int
	stdout     string
	stderr     string
	// before and after are the destination's source as the writer found
	// and left it ("" = no rule), read from its output.
	before, after string
}

func (o relOp) String() string {
	return fmt.Sprintf("#%d %s [%s -> %s]", o.i, strings.Join(o.args, " "), relOr(o.before, "none"), relOr(o.after, "none"))
}

func relOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

var (
	relAddLine    = regexp.MustCompile(`(?m)^add\s+(\S+) via \S+ from \S+ -> (\S+)$`)
	relChangeLine = regexp.MustCompile(`(?m)^change (\S+): (\S+) -> (\S+)$`)
	relRemoveLine = regexp.MustCompile(`(?m)^remove (\S+) via \S+ from \S+ -> (\S+)$`)
	relRotateLine = regexp.MustCompile(`(?m)^(\S+): (\S+) -> (\S+)$`)
)

// observe reads from a writer's output the state it found and left.
func (o *relOp) observe(natural string) error {
	out := o.stdout
	switch o.args[0] {
	case "set":
		to := o.args[2]
		switch {
		case strings.Contains(out, "nothing to change"):
			o.before, o.after = to, to
		case relAddLine.MatchString(out):
			m := relAddLine.FindStringSubmatch(out)
			o.before, o.after = "", m[2]
		case relChangeLine.MatchString(out):
			m := relChangeLine.FindStringSubmatch(out)
			o.before, o.after = m[2], m[3]
		default:
			return fmt.Errorf("cannot read set's output %q", out)
		}
	case "unset":
		switch {
		case strings.Contains(out, "has no rule"):
			o.before, o.after = "", ""
		case relRemoveLine.MatchString(out):
			o.before, o.after = relRemoveLine.FindStringSubmatch(out)[2], ""
		default:
			return fmt.Errorf("cannot read unset's output %q", out)
		}
	case "rotate":
		m := relRotateLine.FindStringSubmatch(out)
		if m == nil {
			return fmt.Errorf("cannot read rotate's output %q", out)
		}
		o.before, o.after = m[2], m[3]
		if o.before == natural {
			o.before = ""
		}
	}
	return nil
}

// relLinearize looks for a serial order of ops (all on one destination)
// that respects real time (an op that ended before another started comes
// first) and in which each op found what the previous one left, starting
// from initial and ending in final. It returns that order, or nil.
func relLinearize(ops []relOp, initial, final string) []relOp {
	n := len(ops)
	if n == 0 {
		if initial == final {
			return []relOp{}
		}
		return nil
	}
	seen := map[string]bool{}
	var order []relOp
	var dfs func(used uint64, cur string) bool
	dfs = func(used uint64, cur string) bool {
		if used == 1<<n-1 {
			return cur == final
		}
		key := fmt.Sprintf("%x|%s", used, cur)
		if seen[key] {
			return false
		}
		seen[key] = true
		for i, op := range ops {
			if used&(1<<i) != 0 || op.before != cur {
				continue
			}
			// Every op still to place that ended before op started
			// must come before it.
			ok := true
			for j, other := range ops {
				if used&(1<<j) == 0 && j != i && other.end.Before(op.start) {
					ok = false
					break
				}
			}
			if !ok {
				continue
			}
			order = append(order, op)
			if dfs(used|1<<i, op.after) {
				return true
			}
			order = order[:len(order)-1]
		}
		return false
	}
	if dfs(0, initial) {
		return order
	}
	return nil
}

// relInstalled returns each managed destination's source as list reports it.
func relInstalled(t *testing.T, l *lab.Lab) map[string]string {
	t.Helper()
	got := map[string]string{}
	for _, r := range parseList(t, mustES(t, l, "list", "--json")).Rules {
		if _, dup := got[r.Dst]; dup {
			t.Errorf("list shows destination %s twice", r.Dst)
		}
		got[r.Dst] = strings.Join(r.To, ",")
	}
	return got
}

// TestConcurrentWriters: rounds of 20 egress-snat processes started at once,
// each one set, unset or rotate of one of a few overlapping destinations
// (a /24 and hosts inside it, another host, an IPv6 host). Every set names
// its writer: writer i sets 192.0.2.(100+i), an address only it uses.
//
// The writers serialize on the namespace's lock, so the result must be
// linearizable: for every destination there is an order of its writers,
// consistent with real time, in which each found what the one before it left
// (as each reports in its output) and the last one's result is what the
// kernel holds. Besides, the chain is one egress-snat can read back and is in
// sync (check exits 0), the jump is there once and first in each family,
// and no set is left that the chain does not use.
//
// The last round uses a short --lock-timeout: writers may then fail, but
// only with the documented lock-timeout message and exit 1, having changed
// nothing.
func TestConcurrentWriters(t *testing.T) {
	t.Parallel()
	rounds := relEnvInt(t, "EGRESS_SNAT_CONCURRENCY_ROUNDS", 3)
	const writers = 20
	rng := relRand(t)
	l := newLab(t)
	addForeignRules(t, l)
	for i := range writers {
		l.HostAddrAdd(t, fmt.Sprintf("192.0.2.%d/24", 100+i), "eth0")
	}
	dsts := []string{"198.51.100.4/32", "198.51.100.0/24", "203.0.113.7/32", "2001:db8:ffff::4/128"}
	natural := map[bool]string{false: "192.0.2.250", true: "2001:db8::250"}
	// ran counts writers started; checked those placed in a serial order
	// (exit 0, and their destination's order found); timeouts those that
	// hit the lock timeout, which changed nothing and so have no place in
	// the order: a figure of their own, not silently left out.
	ran, checked, timeouts := 0, 0, 0
	for round := range rounds {
		lockTimeout := "10s"
		if round == rounds-1 && rounds > 1 {
			lockTimeout = "400ms"
		}
		initial := relInstalled(t, l)
		ops := make([]relOp, writers)
		for i := range ops {
			dst := dsts[rng.IntN(len(dsts))]
			v6 := strings.Contains(dst, ":")
			op := relOp{i: i, dst: dst}
			switch n := rng.IntN(10); {
			case n < 5:
				to := fmt.Sprintf("192.0.2.%d", 100+i)
				if v6 {
					to = []string{"2001:db8::22", "2001:db8::23"}[rng.IntN(2)]
				}
				op.args = []string{"set", "--to", to, "--dst", dst}
			case n < 7:
				op.args = []string{"unset", "--dst", dst}
			default:
				pool := "192.0.2.22,192.0.2.23"
				if v6 {
					pool = "2001:db8::22,2001:db8::23"
				}
				op.args = []string{"rotate", "--pool", pool, "--dst", dst}
			}
			ops[i] = op
		}
		var wg sync.WaitGroup
		gate := make(chan struct{})
		for i := range ops {
			wg.Go(func() {
				<-gate
				op := &ops[i]
				op.start = time.Now()
				stdout, stderr, code := l.RunErr(bin, append([]string{"--lock-timeout", lockTimeout}, op.args...)...)
				op.end = time.Now()
				op.stdout, op.stderr, op.code = stdout, stderr, code
			})
		}
		close(gate)
		wg.Wait()
		ran += writers

		byDst := map[string][]relOp{}
		for _, op := range ops {
			switch {
			case op.code == 0:
				if err := op.observe(natural[strings.Contains(op.dst, ":")]); err != nil {
					t.Errorf("round %d: %s: %v", round, op, err)
					continue
				}
				byDst[op.dst] = append(byDst[op.dst], op)
			case op.code == exitFailure && (strings.Contains(op.stderr, "another egress-snat run is holding the lock") ||
				strings.Contains(op.stderr, "timed out waiting for the xtables lock")):
				timeouts++ // documented; it changed nothing, so it takes no place in the order
			default:
				t.Errorf("round %d: egress-snat %s: exit %d, want 0 or a lock timeout\nstdout:\n%s\nstderr:\n%s",
					round, strings.Join(op.args, " "), op.code, op.stdout, op.stderr)
			}
		}
		final := relInstalled(t, l)
		for _, dst := range dsts {
			order := relLinearize(byDst[dst], initial[dst], final[dst])
			if order == nil {
				var lines []string
				for _, op := range byDst[dst] {
					lines = append(lines, fmt.Sprintf("%s  %s..%s", op, op.start.Format("05.000"), op.end.Format("05.000")))
				}
				t.Errorf("round %d: %s: from %q to %q, no serial order of its writers explains it:\n%s",
					round, dst, initial[dst], final[dst], strings.Join(lines, "\n"))
				continue
			}
			checked += len(byDst[dst])
			if len(order) > 0 {
				t.Logf("round %d: %s: last writer %s", round, dst, order[len(order)-1])
			}
		}
		for dst := range final {
			if !slices.Contains(dsts, dst) {
				t.Errorf("round %d: rule for %s, which no writer named", round, dst)
			}
		}
		if code, kinds := relCheck(t, l, ""); code != checkInSync {
			t.Errorf("round %d: check found drift %v", round, kinds)
		}
		rs := l.Ruleset(t)
		if n := strings.Count(rs, jumpRule+"\n"); n != len(natTablesWithChain(rs)) {
			t.Errorf("round %d: %d jumps for %d chains\n%s", round, n, len(natTablesWithChain(rs)), rs)
		}
		for _, nt := range natTablesWithChain(rs) {
			if nt.firstPostrouting != jumpRule {
				t.Errorf("round %d: first POSTROUTING rule %q, want our jump", round, nt.firstPostrouting)
			}
		}
		for _, name := range lab.SetNames(rs) {
			if !strings.Contains(rs, "--match-set "+name+" ") {
				t.Errorf("round %d: set %s is left over: no rule uses it", round, name)
			}
		}
		if t.Failed() {
			break
		}
	}
	relFigure(t, "concurrent_writers", ran)
	relFigure(t, "concurrent_writers_checked", checked)
	relFigure(t, "concurrent_lock_timeouts", timeouts)
}

// natTablesWithChain returns the nat tables of a ruleset that hold our chain.
func natTablesWithChain(rs string) []natTable {
	var out []natTable
	for _, nt := range natTables(rs) {
		if nt.ours {
			out = append(out, nt)
		}
	}
	return out
}

// TestReliabilityLinearizeChecker: the checker of TestConcurrentWriters
// finds serial orders that exist and rejects histories none explains.
func TestReliabilityLinearizeChecker(t *testing.T) {
	at := func(s, e int) (time.Time, time.Time) {
		base := time.Unix(0, 0)
		return base.Add(time.Duration(s) * time.Second), base.Add(time.Duration(e) * time.Second)
	}
	op := func(i int, before, after string, s, e int) relOp {
		o := relOp{i: i, args: []string{"set"}, before: before, after: after}
		o.start, o.end = at(s, e)
		return o
	}
	overlapping := []relOp{op(0, "b", "c", 0, 10), op(1, "", "a", 0, 10), op(2, "a", "b", 0, 10)}
	if got := relLinearize(overlapping, "", "c"); len(got) != 3 || got[0].i != 1 || got[1].i != 2 || got[2].i != 0 {
		t.Errorf("overlapping writers: order %v, want #1 #2 #0", got)
	}
	if got := relLinearize(overlapping, "", "a"); got != nil {
		t.Errorf("final state no last writer left: order %v, want none", got)
	}
	// #2 ended before #1 started, so it cannot follow it.
	sequential := []relOp{op(1, "", "a", 5, 6), op(2, "a", "b", 0, 1)}
	if got := relLinearize(sequential, "", "b"); got != nil {
		t.Errorf("order against real time: %v, want none", got)
	}
	if got := relLinearize(nil, "x", "x"); got == nil {
		t.Errorf("no writers, unchanged: want the empty order")
	}
	if got := relLinearize(nil, "x", ""); got != nil {
		t.Errorf("no writers, changed: order %v, want none", got)
	}
}
