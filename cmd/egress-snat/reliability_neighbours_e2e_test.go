package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// TestReliabilityNeighbours repeats the neighbours findings (#20) with
// random choices, for the report's "neighbours" rows: live flows across
// every way a rule goes, foreign ip rules at random priorities (ours
// among them, and none) kept byte for byte through random writes, and a
// foreign rule ahead of ours seen by check and verify. Rounds:
// EGRESS_SNAT_NEIGHBOUR_ROUNDS (default 2).
func TestReliabilityNeighbours(t *testing.T) {
	rounds := relEnvInt(t, "EGRESS_SNAT_NEIGHBOUR_ROUNDS", 2)
	rng := relRand(t)
	removals := []struct {
		name string
		args [][]string
	}{
		{"unset", [][]string{{"unset", "--dst", "198.51.100.4"}, {"unset", "--dst", "2001:db8:ffff::4"}}},
		{"clear", [][]string{{"clear"}}},
		{"rotate", [][]string{{"rotate", "--pool", "192.0.2.250", "--dst", "198.51.100.4"}, {"rotate", "--pool", "2001:db8::250", "--dst", "2001:db8:ffff::4"}}},
		{"apply", [][]string{{"apply", "-f", "EMPTY"}}},
	}
	flows, kept, exact := 0, 0, 0
	foreignRuns, foreignKept := 0, 0
	ahead, aheadSeen := 0, 0
	for round := range rounds {
		l := newLab(t, lab.WithSecondUplink())
		empty := relWrite(t, t.TempDir(), "empty.yaml", "rules: []\n")
		before := hostTruth(t, l)
		for _, rm := range removals {
			mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
			mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")
			pairs := []flowPair{openFlows(t, l, "198.51.100.4", "192.0.2.22"), openFlows(t, l, "2001:db8:ffff::4", "2001:db8::22")}
			for _, a := range rm.args {
				mustES(t, l, replaceArg(a, "EMPTY", empty)...)
			}
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond)
			for _, p := range pairs {
				for _, ask := range []func() (string, error){p.tcp.Ask, p.udp.Ask} {
					flows++
					if got, err := ask(); err == nil && got == map[bool]string{true: "192.0.2.22", false: "2001:db8::22"}[p.dst == "198.51.100.4"] {
						kept++
					} else {
						t.Errorf("round %d, %s: a flow to %s answered %q (%v)", round, rm.name, p.dst, got, err)
					}
				}
				endFlows(t, l, p)
			}
			mustES(t, l, "clear")
			if hostTruth(t, l) == before {
				exact++
			} else {
				t.Errorf("round %d, %s: once the flows ended, clear did not restore the host", round, rm.name)
			}
		}

		// Foreign ip rules at random priorities, ours among them and none.
		prios := []string{"7419", "7420", "7421", "7422", "7423", "", "100", "32000"}
		var added []string
		for i := range 3 {
			p := prios[rng.IntN(len(prios))]
			args := []string{"rule", "add", "from", fmt.Sprintf("10.9%d.0.0/16", i), "lookup", fmt.Sprint(100 + i)}
			if p != "" {
				args = append(args, "priority", p)
			}
			l.Run(t, "ip", args...)
			added = append(added, fmt.Sprintf("10.9%d.0.0/16 lookup %d", i, 100+i))
		}
		foreignOf := func() string {
			var b strings.Builder
			for line := range strings.Lines(ipRules(t, l)) {
				for _, a := range added {
					if strings.Contains(line, a) {
						b.WriteString(line)
					}
				}
			}
			return b.String()
		}
		want := foreignOf()
		for range 6 {
			ops := [][]string{
				{"set", "--to", "203.0.113.130", "--dst", "198.51.100.4"},
				{"set", "--to", "192.0.2.22", "--dst", "203.0.113.7", "--method", "route"},
				{"unset", "--dst", "198.51.100.4"},
				{"clear"},
				{"clear", "--now"},
			}
			foreignRuns++
			if r := es(t, l, ops[rng.IntN(len(ops))]...); r.code == 0 && foreignOf() == want {
				foreignKept++
			} else {
				t.Errorf("round %d: beside foreign ip rules %q: exit %d, rules now %q", round, want, r.code, foreignOf())
			}
		}
		mustES(t, l, "clear", "--now")

		// A foreign rule ahead of ours.
		ahead++
		mustES(t, l, "set", "--to", "203.0.113.130", "--dst", "198.51.100.4")
		l.Run(t, "ip", "route", "add", "198.51.100.4", "via", "192.0.2.1", "table", "200")
		l.Run(t, "ip", "rule", "add", "to", "198.51.100.4", "lookup", "200")
		c, v := es(t, l, "check"), es(t, l, "verify", "--dst", "198.51.100.4")
		if c.code == checkDrift && strings.Contains(c.stdout, "ip-rule-ahead") && v.code == exitFailure && strings.Contains(v.stdout, "lookup 200") {
			aheadSeen++
		} else {
			t.Errorf("round %d: a rule ahead: check exit %d, verify exit %d\n%s%s%s", round, c.code, v.code, c.stdout, v.stdout, v.stderr)
		}
	}
	relFigure(t, "neighbour_flows", flows)
	relFigure(t, "neighbour_flows_kept", kept)
	relFigure(t, "neighbour_clear_exact", exact)
	relFigure(t, "neighbour_clears", rounds*len(removals))
	relFigure(t, "neighbour_foreign_runs", foreignRuns)
	relFigure(t, "neighbour_foreign_kept", foreignKept)
	relFigure(t, "neighbour_ahead", ahead)
	relFigure(t, "neighbour_ahead_seen", aheadSeen)
}

// replaceArg returns args with every old replaced by new.
func replaceArg(args []string, old, new string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = a
		if a == old {
			out[i] = new
		}
	}
	return out
}
