package main

// The nftables backend's own tests (#23), where the iptables backends'
// counterparts read iptables-save and ipsets: drift of our table repaired
// by watch and named by check, kill -9 during a write leaving the old
// table or the new one, and the neighbours that fight over iptables' nat
// table (a dockerd restart, a firewalld reload) leaving ours alone.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/internal/lab"
)

// nftablesOnly skips t unless the binary uses the nftables backend: what
// t proves is that backend's (why).
func nftablesOnly(t *testing.T, why string) {
	t.Helper()
	if backend(t) != "nftables" {
		t.Skipf("nftables backend only (EGRESS_SNAT_BACKEND=nftables): %s", why)
	}
}

// nftTable is our table as nft lists it, elements sorted; "" when there is
// none.
func nftTable(t *testing.T, l *lab.Lab) string {
	t.Helper()
	out, _, code := l.RunErr("nft", "-s", "list", "table", "inet", nft.TableName)
	if code != 0 {
		return ""
	}
	return lab.SortedNFTElements(out)
}

// TestNFTDriftRepaired: our table deleted, its nat chain flushed, an
// element deleted from one of its sets, each by hand: check -f names it
// (while watch is frozen), and watch puts the table back; the far side
// sees the rule's source again.
func TestNFTDriftRepaired(t *testing.T) {
	nftablesOnly(t, "the drifts are of our nftables table")
	l := newLab(t)
	dir := t.TempDir()
	var dsts strings.Builder
	for i := range 20 {
		fmt.Fprintf(&dsts, "198.18.1.%d\n", i+1)
	}
	dsts.WriteString("198.51.100.4\n")
	if err := os.WriteFile(filepath.Join(dir, "dsts.txt"), []byte(dsts.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	path := relWrite(t, dir, "rules.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: dsts.txt\n")
	w := relStartWatch(t, l, path)
	want := nftTable(t, l)
	if !strings.Contains(want, "elements = {") {
		t.Fatalf("21 destinations are not in a set:\n%s", want)
	}
	set := ""
	for line := range strings.Lines(want) {
		if name, ok := strings.CutPrefix(strings.TrimSpace(line), "set "); ok {
			set = strings.TrimSuffix(name, " {")
		}
	}
	for _, drift := range []struct {
		name  string
		cmd   []string
		kinds []string
	}{
		{"table deleted", []string{"delete", "table", "inet", nft.TableName}, []string{"chain-missing"}},
		{"nat chain flushed", []string{"flush", "chain", "inet", nft.TableName, nft.ChainNAT}, []string{"chain-altered"}},
		{"element deleted", []string{"delete", "element", "inet", nft.TableName, set, "{", "198.18.1.1", "}"}, []string{"set-out-of-date"}},
	} {
		w.freeze(t)
		l.Run(t, "nft", drift.cmd...)
		code, kinds := relCheck(t, l, path)
		if code != checkDrift || !containsAll(kinds, drift.kinds) {
			t.Errorf("%s: check -f exit %d, kinds %v; want %d and %v", drift.name, code, kinds, checkDrift, drift.kinds)
		}
		since := time.Now()
		w.thaw(t)
		if _, _, ok := w.awaitRepair(t, l, path, since); !ok {
			t.Errorf("%s: not repaired\n%s", drift.name, w.p.stderr.String())
			continue
		}
		if got := nftTable(t, l); got != want {
			t.Errorf("%s: the repaired table differs from the one written", drift.name)
		}
		wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})
	}
}

func containsAll(have, want []string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			found = found || h == w
		}
		if !found {
			return false
		}
	}
	return true
}

// TestNFTCrashDuringApply: apply of file B over file A, killed with
// SIGKILL at a random moment, leaves our table exactly A's or exactly B's
// (one netlink transaction), and a complete apply then finishes the
// change. Rounds: EGRESS_SNAT_KILLS (default 10).
func TestNFTCrashDuringApply(t *testing.T) {
	nftablesOnly(t, "it judges the kills by our nftables table")
	kills := relEnvInt(t, "EGRESS_SNAT_KILLS", 10)
	rng := relRand(t)
	l := newLab(t)
	dir := t.TempDir()
	var a, b strings.Builder
	for i := range 3000 {
		fmt.Fprintf(&a, "198.18.%d.%d\n", 1+i/250, 1+i%250)
		fmt.Fprintf(&b, "198.19.%d.%d\n", 1+i/250, 1+i%250)
	}
	os.WriteFile(filepath.Join(dir, "a.txt"), []byte(a.String()), 0o644)
	os.WriteFile(filepath.Join(dir, "b.txt"), []byte(b.String()), 0o644)
	fileA := relWrite(t, dir, "a.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: a.txt\n")
	fileB := relWrite(t, dir, "b.yaml", "rules:\n  - to: 192.0.2.23\n    dst-file: b.txt\n")
	mustES(t, l, "apply", "-f", fileB)
	tableB := nftTable(t, l)
	mustES(t, l, "apply", "-f", fileA)
	tableA := nftTable(t, l)
	old, nw, during := 0, 0, 0
	for k := range kills {
		p := relStart(t, l, "apply", "-f", fileB)
		time.Sleep(time.Duration(rng.IntN(250)) * time.Millisecond)
		if !p.exited() {
			during++
		}
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		p.wait(5 * time.Second)
		switch got := nftTable(t, l); got {
		case tableA:
			old++
		case tableB:
			nw++
		default:
			t.Fatalf("kill %d: the table is neither A's nor B's:\n%s", k, got)
		}
		mustES(t, l, "apply", "-f", fileB)
		if got := nftTable(t, l); got != tableB {
			t.Fatalf("kill %d: a complete apply did not finish the change", k)
		}
		mustES(t, l, "apply", "-f", fileA)
	}
	relFigure(t, "nft_kills", kills)
	relFigure(t, "nft_kills_during_run", during)
	relFigure(t, "nft_kills_left_old", old)
	relFigure(t, "nft_kills_left_new", nw)
}

// TestNFTNeighbours: Docker and firewalld beside our table. A dockerd
// restart puts its MASQUERADE first in iptables' nat POSTROUTING, and a
// firewalld reload rebuilds its own nftables tables and flushes iptables'
// (masquerading in its public zone, at srcnat + 10); neither touches ours,
// which comes first by priority, so watch has nothing to repair (no
// converged write), check stays in sync, and connections leave with the
// rules' sources throughout.
func TestNFTNeighbours(t *testing.T) {
	nftablesOnly(t, "the neighbours fight over iptables' nat table, which the nftables backend is not in")
	quiet := func(t *testing.T, w *relWatch, before int) {
		t.Helper()
		if n := strings.Count(w.p.stderr.String(), `"msg":"converged"`) - before; n != 0 {
			t.Errorf("watch wrote %d times beside its neighbour, want 0 (nothing of ours moved)\n%s", n, w.p.stderr.String())
		}
	}
	t.Run("dockerd restart", func(t *testing.T) {
		lab.RequireDocker(t)
		l := newLab(t)
		d := lab.StartDocker(t, l)
		path := relWrite(t, t.TempDir(), "rules.yaml", fmt.Sprintf("rules:\n  - to: 192.0.2.23\n    from: [%s]\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n", lab.DockerBridge))
		w := relStartWatch(t, l, path)
		before := strings.Count(w.p.stderr.String(), `"msg":"converged"`)
		check := func(what string) {
			t.Helper()
			if got := d.SourceSeen(t, "bridge", "203.0.113.7"); got != "192.0.2.23" {
				t.Errorf("%s: a container: far side saw %q, want 192.0.2.23", what, got)
			}
			wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})
			if code, kinds := relCheck(t, l, path); code != checkInSync {
				t.Errorf("%s: check -f exit %d, kinds %v; want in sync", what, code, kinds)
			}
		}
		check("before")
		d.Restart(t)
		check("right after a dockerd restart")
		time.Sleep(time.Second)
		check("a second after")
		quiet(t, w, before)
	})
	t.Run("firewalld reload", func(t *testing.T) {
		l, fw := fwLab(t)
		path := relWrite(t, t.TempDir(), "rules.yaml", fwFile)
		w := relStartWatch(t, l, path)
		before := strings.Count(w.p.stderr.String(), `"msg":"converged"`)
		seen := map[string]string{"198.51.100.4": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::22"}
		wantSeen(t, l, seen)
		fw.Reload(t)
		wantSeen(t, l, seen)
		time.Sleep(time.Second)
		wantSeen(t, l, seen)
		if code, kinds := relCheck(t, l, path); code != checkInSync {
			t.Errorf("after a firewalld reload: check -f exit %d, kinds %v; want in sync", code, kinds)
		}
		quiet(t, w, before)
	})
}
