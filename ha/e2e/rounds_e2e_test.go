package e2e

import (
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

var (
	rounds    = flag.Int("rounds", 0, "TestHARounds: how many rounds of every scenario to measure (0: the test does not run)")
	report    = flag.String("report", "", "TestHARounds: append the figures, as Markdown, to this file")
	leakGuard = flag.Bool("leak-guard", false, "TestHARounds: count and drop untranslated packets after NAT (lab.HAOptions.LeakGuard)")
	only      = flag.String("scenarios", "kill,failback,drain,undrain,split-brain,heal", "TestHARounds: the scenarios of a round, in order (each starts where the one before left the pair)")
)

// TestHARounds is the measurement harness of issue 22, not a test of
// figures: it runs -rounds rounds of kill, failback, drain, undrain, split
// brain and heal under load on one pair, logs every move and writes the
// medians (and every move's line) to -report. It judges nothing but that
// the pair keeps working. Run it on each backend:
//
//	EGRESS_SNAT_IPTABLES=nft go test -count=1 -timeout 60m -run TestHARounds ./ha/e2e -args -rounds=10 -report=/tmp/ha.md
func TestHARounds(t *testing.T) {
	if *rounds == 0 {
		t.Skip("measurement harness: run with -args -rounds=N")
	}
	h := lab.NewHA(t, lab.HAOptions{LeakGuard: *leakGuard})
	all := map[string]scenario{}
	for _, sc := range []scenario{kill, failback, drain, undrain, stop, start, split, heal} {
		all[sc.name] = sc
	}
	var seq []scenario
	for _, name := range strings.Split(*only, ",") {
		sc, ok := all[name]
		if !ok {
			t.Fatalf("-scenarios: no scenario %q", name)
		}
		seq = append(seq, sc)
	}
	var moves []lab.Move
	for r := range *rounds {
		for _, sc := range seq {
			m := move(t, h, sc)
			t.Logf("round %d: %s", r+1, m.Summary())
			if len(m.Leaks) > 0 || m.Kept != m.Conns {
				t.Logf("round %d %s:\n%s", r+1, sc.name, m.Details())
			}
			moves = append(moves, m)
		}
	}
	md := Table(moves, *rounds)
	t.Logf("\n%s", md)
	if *report != "" {
		f, err := os.OpenFile(*report, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		backend := "iptables (the host's default flavour)"
		if v := os.Getenv("EGRESS_SNAT_IPTABLES"); v != "" {
			backend = "iptables-" + v
		}
		if v := os.Getenv("EGRESS_SNAT_BACKEND"); v != "" {
			backend = v
		}
		fmt.Fprintf(f, "\n### Backend %s: %d rounds, %s\n\n%s\n<details><summary>every move</summary>\n\n```\n", backend, *rounds, time.Now().UTC().Format(time.RFC3339), md)
		for _, m := range moves {
			fmt.Fprintln(f, m.Summary())
		}
		fmt.Fprintf(f, "```\n</details>\n")
	}
}

// Table is the report's table: per scenario, the medians over the rounds
// of each move's figures, and the totals of what was lost or leaked.
func Table(moves []lab.Move, rounds int) string {
	var b strings.Builder
	b.WriteString("| move | existing blackout, median of per-move max (min-max) | existing, median of per-move median | new connections | UDP | kept (worst, total) | new conns failed | leaked packets (total, moves with leaks) |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|\n")
	var order []string
	by := map[string][]lab.Move{}
	for _, m := range moves {
		if by[m.Scenario] == nil {
			order = append(order, m.Scenario)
		}
		by[m.Scenario] = append(by[m.Scenario], m)
	}
	for _, name := range order {
		ms := by[name]
		var max, med, nw, udp []time.Duration
		kept, conns, worst, leaks, leaky, nf := 0, 0, ms[0].Conns, 0, 0, 0
		for _, m := range ms {
			max = append(max, m.ExistingMax())
			med = append(med, m.ExistingMedian())
			nw = append(nw, m.NewBlackout)
			udp = append(udp, m.UDPBlackout)
			kept += m.Kept
			conns += m.Conns
			worst = min(worst, m.Kept)
			leaks += len(m.Leaks)
			if len(m.Leaks) > 0 {
				leaky++
			}
			nf += m.NewFailed
		}
		fmt.Fprintf(&b, "| %s %s->%s | %s (%s-%s) | %s | %s | %s | %d of %d, %d/%d | %d | %d, %d of %d |\n",
			name, ms[0].From, ms[0].To, d(lab.Median(max)), d(slices.Min(max)), d(slices.Max(max)), d(lab.Median(med)),
			d(lab.Median(nw)), d(lab.Median(udp)), worst, ms[0].Conns, kept, conns, nf, leaks, leaky, len(ms))
	}
	return b.String()
}

func d(x time.Duration) string { return x.Round(time.Millisecond).String() }
