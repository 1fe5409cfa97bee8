package main

// End-to-end test of spill: a rule's address runs out of source ports
// toward one far port, and watch spills new connections to the next
// address of the list before they fail.

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// spillFam is one family's addresses of the test: the rule's two and the
// far host.
type spillFam struct{ a, b, far, host string }

var spillFams = []spillFam{
	{"192.0.2.22", "192.0.2.23", "203.0.113.7", "/32"},
	{"2001:db8::22", "2001:db8::23", "2001:db8:ffff::4", "/128"},
}

// spillFile is the desired state of the test: a then b for the far host,
// with ten source ports.
func spillFile(f spillFam, spill bool) string {
	s := "rules:\n  - to: [" + f.a + ", " + f.b + "]\n    dst: [" + f.far + "]\n    to-ports: 40000-40009\n"
	if spill {
		s += "    spill: true\n"
	}
	return s
}

// dialHold opens n TCP connections from namespace ns (H, or a client) to
// dst's flow port, one at a time, and keeps those that connect open
// (closed at the test's end, or by the caller). It returns them, the
// sources the far side saw, and how many failed.
func dialHold(t *testing.T, ns string, dst string, n int) (conns []*net.TCPConn, sources map[string]int, failed int) {
	t.Helper()
	sources = map[string]int{}
	addr := net.JoinHostPort(dst, fmt.Sprint(lab.TCPFlowPort))
	for range n {
		var c net.Conn
		err := lab.Do(ns, func() (err error) {
			c, err = net.DialTimeout("tcp", addr, time.Second)
			return err
		})
		if err != nil {
			failed++
			continue
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		if _, err := c.Write([]byte("?\n")); err != nil {
			failed++
			continue
		}
		m, err := c.Read(buf)
		if err != nil {
			failed++
			continue
		}
		c.SetDeadline(time.Time{})
		conns = append(conns, c.(*net.TCPConn))
		sources[strings.TrimSpace(string(buf[:m]))]++
	}
	return conns, sources, failed
}

// TestSpillOnTheWire: a rule of two addresses with a range of ten source
// ports toward one far host and port.
//
// Without spill, the rule is the first address's: ten connections held
// open take the ten ports, and the next ones fail (the kernel finds no
// free source port for the tuple), none from the second address. With
// spill but without watch, the same.
//
// With spill and watch running, once eight of the ten ports are held
// (80%) watch installs a spill entry for that far port, and the next
// connections succeed from 192.0.2.23 while the first eight stay on .22
// (and the same in IPv6); a watch stopped and started again meanwhile
// keeps the spill without rewriting anything;
// list shows the spill entry as "spill of" the rule, check (with the file
// and without) calls it no drift. When .22's connections end (reset, so
// conntrack forgets them within seconds) the spill ends and new
// connections leave from .22 again.
func TestSpillOnTheWire(t *testing.T) {
	// Without spill, and with spill but no watch to act on it: the same.
	for _, spill := range []bool{false, true} {
		name := map[bool]string{false: "without spill", true: "spill without watch"}[spill]
		t.Run(name, func(t *testing.T) {
			f := spillFams[0]
			l := newLab(t)
			path := relWrite(t, t.TempDir(), "rules.yaml", spillFile(f, spill))
			mustES(t, l, "apply", "-f", path)
			const tries = 14
			_, sources, failed := dialHold(t, l.Host, f.far, tries)
			t.Logf("%s, %s: %d of %d connections held open to %s:%d connected, from %v; %d failed", backend(t), name, tries-failed, tries, f.far, lab.TCPFlowPort, sources, failed)
			if sources[f.a] != 10 || len(sources) != 1 || failed != tries-10 {
				t.Errorf("%s: sources %v, %d failed; want the 10 of the range from %s and %d failures", name, sources, failed, f.a, tries-10)
			}
		})
	}
	for _, f := range spillFams {
		t.Run("with spill to "+f.far, func(t *testing.T) {
			l := newLab(t)
			path := relWrite(t, t.TempDir(), "rules.yaml", spillFile(f, true))
			// The first watch is stopped while it spills; the second,
			// relStartWatch's, runs to the end.
			w1 := &relWatch{p: relStart(t, l, "watch", "-f", path, "--log-format", "json")}
			t.Cleanup(func() {
				if !w1.p.exited() {
					w1.p.cmd.Process.Kill()
					<-w1.p.done
				}
			})
			if _, ok := relWaitInSync(t, l, path, 5*time.Second); !ok {
				t.Fatalf("watch -f %s: not in sync after 5s\nlog:\n%s", path, w1.p.stderr.String())
			}
			first, sources, failed := dialHold(t, l.Host, f.far, 8)
			if sources[f.a] != 8 || failed != 0 {
				t.Fatalf("the first 8 connections: sources %v, %d failed; want 8 from %s", sources, failed, f.a)
			}
			// Watch logs the spill when it finds it, and writes it after
			// its settle.
			if !awaitLogFor(w1, 0, 5*time.Second, "spill started", f.b) ||
				!awaitLogFor(w1, 0, 2*time.Second, "converged", `"reason":"spill"`) {
				t.Fatalf("no spill written within 5s of 8 of 10 ports in use\nrules:\n%s\nwatch log:\n%s", l.Ruleset(t), w1.p.stderr.String())
			}
			// Watch stops, leaving the spill; another one starts, finds
			// it from conntrack and the rules, and writes nothing.
			before := l.Ruleset(t)
			w1.p.cmd.Process.Signal(syscall.SIGTERM)
			if code, ok := w1.p.wait(10 * time.Second); !ok || code != 0 {
				t.Fatalf("the first watch: exit %d (ended: %v) after SIGTERM\nlog:\n%s", code, ok, w1.p.stderr.String())
			}
			w := relStartWatch(t, l, path)
			if !awaitLogFor(w, 0, 5*time.Second, "spill started", f.b) {
				t.Fatalf("the second watch found no spill within 5s\nwatch log:\n%s", w.p.stderr.String())
			}
			if after := l.Ruleset(t); after != before || logCount(w, "converged") != 0 {
				t.Errorf("the second watch changed the rules at its start (-before +after):\n%s\nlog:\n%s", cmp.Diff(before, after), w.p.stderr.String())
			}
			const more = 7
			_, sources, failed = dialHold(t, l.Host, f.far, more)
			t.Logf("%s, with spill: after 8 from %s, %d more connections: from %v, %d failed", backend(t), f.a, more, sources, failed)
			if sources[f.b] != more || failed != 0 {
				t.Errorf("with spill: %d more connections from %v, %d failed; want all %d from %s\nrules:\n%s\nwatch log:\n%s", more, sources, failed, more, f.b, l.Ruleset(t), w.p.stderr.String())
			}

			rule := f.far + f.host
			text := mustES(t, l, "list")
			if !strings.Contains(text, "(spill of "+rule+")") || !strings.Contains(text, "tcp/"+fmt.Sprint(lab.TCPFlowPort)) {
				t.Errorf("list:\n%s\nwant the spill entry, its port and its rule", text)
			}
			var got struct {
				Rules []struct {
					Dst     string   `json:"dst"`
					To      []string `json:"to"`
					DPort   int      `json:"dport"`
					Proto   string   `json:"proto"`
					SpillOf string   `json:"spill_of"`
				} `json:"rules"`
			}
			out := mustES(t, l, "list", "--json")
			if err := json.Unmarshal([]byte(out), &got); err != nil {
				t.Fatalf("list --json: %v\n%s", err, out)
			}
			spills := 0
			for _, r := range got.Rules {
				if r.SpillOf != "" {
					spills++
					if r.SpillOf != rule || r.DPort != lab.TCPFlowPort || r.Proto != "tcp" || strings.Join(r.To, ",") != f.b {
						t.Errorf("list --json spill entry %+v; want tcp/%d to %s, spill of %s", r, lab.TCPFlowPort, f.b, rule)
					}
				}
			}
			if spills != 1 {
				t.Errorf("list --json: %d spill entries; want 1\n%s", spills, out)
			}
			want := fmt.Sprintf("new tcp connections to port %d leave with %s ", lab.TCPFlowPort, f.b)
			if text := mustES(t, l, "explain", "--dst", f.far); !strings.Contains(text, want) {
				t.Errorf("explain --dst %s:\n%s\nwant %q", f.far, text, want)
			}
			for _, args := range [][]string{{"check", "-f", path}, {"check"}} {
				r := es(t, l, args...)
				if r.code != 0 || !strings.Contains(r.stdout, "spilling: ") {
					t.Errorf("%s while watch spills: exit %d\n%s%s\nwant 0, spilling", strings.Join(args, " "), r.code, r.stdout, r.stderr)
				}
			}

			// a's connections end, reset: conntrack's CLOSE state keeps
			// them 10 seconds, then the spill ends.
			for _, c := range first {
				c.SetLinger(0)
				c.Close()
			}
			if !awaitLogFor(w, 0, 20*time.Second, "spill ended") ||
				!awaitLogFor(w, 0, 2*time.Second, "converged", `"reason":"spill"`) {
				t.Fatalf("no spill ended within 20s of %s's connections reset\nwatch log:\n%s", f.a, w.p.stderr.String())
			}
			_, sources, failed = dialHold(t, l.Host, f.far, 1)
			if sources[f.a] != 1 || failed != 0 {
				t.Errorf("after the spill ended: a new connection from %v, %d failed; want %s", sources, failed, f.a)
			}
			if n := logCount(w, "spill started"); n != 1 {
				t.Errorf("%d spill started lines; want 1 (no flapping)\n%s", n, w.p.stderr.String())
			}
		})
	}
}

// awaitLogFor is awaitLog with a limit of its own: the spill is found on
// watch's tick, and ends when conntrack forgets the flows.
func awaitLogFor(w *relWatch, before int, limit time.Duration, msg string, words ...string) bool {
	deadline := time.Now().Add(limit)
	for logCount(w, msg, words...) <= before {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// TestSpillUDP: watch counts UDP flows as it counts TCP connections. Eight
// flows to one far port hold eight of the ten source ports of 192.0.2.22;
// watch spills that port, and the next seven flows leave from 192.0.2.23,
// none failing, while the first eight keep .22. explain names the spill.
func TestSpillUDP(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	f := spillFams[0]
	path := relWrite(t, t.TempDir(), "rules.yaml", spillFile(f, true))
	w := relStartWatch(t, l, path)
	ask := func(n int) (map[string]int, []*lab.UDPFlow) {
		t.Helper()
		seen := map[string]int{}
		var flows []*lab.UDPFlow
		for range n {
			fl := l.UDPFlow(t, f.far)
			s, err := fl.Ask()
			if err != nil {
				s = "failed: " + err.Error()
			}
			seen[s]++
			flows = append(flows, fl)
		}
		return seen, flows
	}
	first, flows := ask(8)
	if first[f.a] != 8 {
		t.Fatalf("the first 8 UDP flows: %v; want 8 from %s", first, f.a)
	}
	if !awaitLogFor(w, 0, 5*time.Second, "spill started", f.b, "udp") ||
		!awaitLogFor(w, 0, 2*time.Second, "converged", `"reason":"spill"`) {
		t.Fatalf("no UDP spill written within 5s of 8 of 10 ports in use\nrules:\n%s\nwatch log:\n%s", l.Ruleset(t), w.p.stderr.String())
	}
	more, _ := ask(7)
	t.Logf("%s, UDP with spill: after 8 flows from %s, 7 more from %v", backend(t), f.a, more)
	if more[f.b] != 7 {
		t.Errorf("with spill: 7 more UDP flows from %v; want all from %s\nrules:\n%s", more, f.b, l.Ruleset(t))
	}
	for i, fl := range flows {
		if s, err := fl.Ask(); err != nil || s != f.a {
			t.Errorf("UDP flow %d after the spill: %q, %v; want it kept on %s", i, s, err, f.a)
		}
	}
	want := fmt.Sprintf("new udp connections to port %d leave with %s ", lab.UDPPort, f.b)
	if text := mustES(t, l, "explain", "--dst", f.far); !strings.Contains(text, want) {
		t.Errorf("explain --dst %s:\n%s\nwant %q", f.far, text, want)
	}
}

// TestSpillFrom: spill counts a forwarded client's connections by their
// original source. A --from rule of two addresses and ten source ports:
// eight connections a client holds open to one far port crowd .22, watch
// spills the port, and the client's next seven leave from .23.
func TestSpillFrom(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	c := l.AddClient(t, lab.ClientOptions{})
	f := spillFams[0]
	path := relWrite(t, t.TempDir(), "rules.yaml", "rules:\n  - to: ["+f.a+", "+f.b+"]\n    from: ["+c.Subnet4.String()+"]\n    dst: ["+f.far+"]\n    to-ports: 40000-40009\n    spill: true\n")
	w := relStartWatch(t, l, path)
	_, sources, failed := dialHold(t, c.NS, f.far, 8)
	if sources[f.a] != 8 || failed != 0 {
		t.Fatalf("the client's first 8 connections: sources %v, %d failed; want 8 from %s", sources, failed, f.a)
	}
	if !awaitLogFor(w, 0, 5*time.Second, "spill started", f.b) ||
		!awaitLogFor(w, 0, 2*time.Second, "converged", `"reason":"spill"`) {
		t.Fatalf("no spill of the --from rule within 5s of 8 of 10 ports in use\nrules:\n%s\nwatch log:\n%s", l.Ruleset(t), w.p.stderr.String())
	}
	_, sources, failed = dialHold(t, c.NS, f.far, 7)
	t.Logf("%s, --from with spill: after 8 from %s, 7 more from %v, %d failed", backend(t), f.a, sources, failed)
	if sources[f.b] != 7 || failed != 0 {
		t.Errorf("with spill: the client's 7 more connections from %v, %d failed; want all from %s\nrules:\n%s", sources, failed, f.b, l.Ruleset(t))
	}
}
