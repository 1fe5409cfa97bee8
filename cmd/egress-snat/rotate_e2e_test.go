package main

// End-to-end tests of `rotate` and of spreading with `set --spread`, judged
// by the source the far side of the lab sees.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// rotate runs `rotate --pool POOL --dst DST` plus extra arguments and
// returns the result, failing unless it exits 0.
func rotate(t *testing.T, l *lab.Lab, pool, dst string, extra ...string) result {
	t.Helper()
	r := es(t, l, append([]string{"rotate", "--pool", pool, "--dst", dst}, extra...)...)
	if r.code != 0 {
		t.Fatalf("rotate --pool %s --dst %s %v: exit %d, want 0\nstdout:\n%s\nstderr:\n%s", pool, dst, extra, r.code, r.stdout, r.stderr)
	}
	return r
}

// rulesWithout returns the chain rules of a lab.Ruleset that do not mention
// any of skip.
func rulesWithout(ruleset string, skip ...string) []string {
	return slices.DeleteFunc(chainRules(ruleset), func(r string) bool {
		for _, s := range skip {
			if strings.Contains(r, s) {
				return true
			}
		}
		return false
	})
}

func TestRotateAlternates(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		addAddr string // added to the host's eth0 first
		pool    string
		dst     string
		probe   string // the far host inside dst
		other   string // a destination that must keep its natural source
		natural string
		want    []string // sources seen after each rotation
	}{
		{"two members", "", "192.0.2.22,192.0.2.23", "198.51.100.4", "198.51.100.4", "198.51.100.5", "192.0.2.250",
			[]string{"192.0.2.22", "192.0.2.23", "192.0.2.22", "192.0.2.23", "192.0.2.22"}},
		{"three members", "192.0.2.24/24", "192.0.2.22,192.0.2.23,192.0.2.24", "198.51.100.0/24", "198.51.100.5", "203.0.113.7", "192.0.2.250",
			[]string{"192.0.2.22", "192.0.2.23", "192.0.2.24", "192.0.2.22", "192.0.2.23", "192.0.2.24", "192.0.2.22"}},
		{"IPv6", "", "2001:db8::22,2001:db8::23", "2001:db8:ffff::4", "2001:db8:ffff::4", "2001:db8::1", "2001:db8::250",
			[]string{"2001:db8::22", "2001:db8::23", "2001:db8::22"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t)
			if tt.addAddr != "" {
				l.HostAddrAdd(t, tt.addAddr, "eth0")
			}
			prev := tt.natural
			var got []string
			for i, want := range tt.want {
				r := rotate(t, l, tt.pool, tt.dst)
				if line := fmt.Sprintf("%s -> %s\n", prev, want); !strings.Contains(r.stdout, line) {
					t.Errorf("rotation %d printed %q, want a move %q", i+1, r.stdout, line)
				}
				got = append(got, l.SourceSeen(t, tt.probe))
				prev = want
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("sources the far side saw after each rotation (-want +got):\n%s", diff)
			}
			wantSeen(t, l, map[string]string{tt.other: tt.natural})
			rs := l.Ruleset(t)
			if rules := chainRules(rs); len(rules) != 1 {
				t.Errorf("after %d rotations: chain rules %q, want exactly one", len(tt.want), rules)
			}
		})
	}
}

// TestRotateLeavesOthersAlone: rotating one destination rewrites nothing
// of any other destination, single rule or set.
func TestRotateLeavesOthersAlone(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.23", "--dst", "198.51.100.5")
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.0/24")
	mustES(t, l, "set", "--to", "2001:db8::23")
	// A set of another source on the same interface.
	mustES(t, l, append([]string{"set", "--to", "198.18.0.10"}, dstFlags(tenNets(9))...)...)
	before := l.Ruleset(t)
	others := map[string]string{"198.51.100.5": "192.0.2.23", "203.0.113.7": "192.0.2.22", "2001:db8:ffff::4": "2001:db8::23"}
	wantSeen(t, l, others)

	for i, want := range []string{"192.0.2.22", "192.0.2.23", "192.0.2.22"} {
		rotate(t, l, "192.0.2.22,192.0.2.23", "198.51.100.4")
		after := l.Ruleset(t)
		// iptables prints the rotated destination as -d 198.51.100.4/32,
		// nftables as ip daddr 198.51.100.4 followed by a word.
		if diff := cmp.Diff(rulesWithout(before), rulesWithout(after, "198.51.100.4/32", "daddr 198.51.100.4 ")); diff != "" {
			t.Errorf("rotation %d changed other destinations' rules (-before +after):\n%s", i+1, diff)
		}
		if diff := cmp.Diff(ourSets(before), ourSets(after)); diff != "" {
			t.Errorf("rotation %d changed the ipsets (-before +after):\n%s", i+1, diff)
		}
		if diff := cmp.Diff(notOurs(before), notOurs(after)); diff != "" {
			t.Errorf("rotation %d changed rules that are not egress-snat's (-before +after):\n%s", i+1, diff)
		}
		wantSeen(t, l, map[string]string{"198.51.100.4": want})
	}
	wantSeen(t, l, others)
}

func dstFlags(dsts []string) []string {
	var out []string
	for _, d := range dsts {
		out = append(out, "--dst", d)
	}
	return out
}

// TestRotateSkipsRemovedMember: a pool member no longer on the host is
// skipped with a warning, and the rotation goes on with the others.
func TestRotateSkipsRemovedMember(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	l.HostAddrAdd(t, "192.0.2.24/24", "eth0")
	const pool = "192.0.2.22,192.0.2.23,192.0.2.24"
	if r := rotate(t, l, pool, "198.51.100.4"); r.stderr != "" {
		t.Errorf("rotation with every member present: stderr %q, want none", r.stderr)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22"})

	l.HostAddrDel(t, "192.0.2.23/24", "eth0")
	for _, want := range []string{"192.0.2.24", "192.0.2.22"} {
		r := rotate(t, l, pool, "198.51.100.4")
		if w := "warning: pool member 192.0.2.23 is not on this host"; !strings.Contains(r.stderr, w) {
			t.Errorf("rotate printed to stderr %q, want %q", r.stderr, w)
		}
		if !strings.Contains(r.stdout, "-> "+want+"\n") {
			t.Errorf("rotate printed %q, want a move to %s", r.stdout, want)
		}
		wantSeen(t, l, map[string]string{"198.51.100.4": want})
	}
}

// TestRotateNoUsableMember: when no pool member is on the host, rotate
// fails, names the pool and changes nothing.
func TestRotateNoUsableMember(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	mustES(t, l, "set", "--to", "2001:db8::22", "--dst", "2001:db8:ffff::4")
	l.HostAddrAdd(t, "192.0.2.24/24", "eth0")
	l.HostAddrDel(t, "192.0.2.24/24", "eth0") // was there, is gone
	before := l.Ruleset(t)
	for _, tt := range []struct {
		name, pool, dst string
		want            []string
	}{
		{"never on the host", "192.0.2.98,192.0.2.99", "198.51.100.4", []string{"192.0.2.98", "192.0.2.99"}},
		{"removed from the host", "192.0.2.24", "198.51.100.4", []string{"192.0.2.24"}},
		{"destination without a rule", "192.0.2.98", "198.51.100.5", []string{"192.0.2.98"}},
		{"IPv6", "2001:db8::98,2001:db8::99", "2001:db8:ffff::4", []string{"2001:db8::98", "2001:db8::99"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := es(t, l, "rotate", "--pool", tt.pool, "--dst", tt.dst)
			// Bad input by the README's table: exit 2, nothing changed.
			if r.code != exitUsage {
				t.Errorf("rotate --pool %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", tt.pool, r.code, exitUsage, r.stdout, r.stderr)
			}
			for _, w := range tt.want {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("rotate --pool %s: stderr %q, want it to name %s", tt.pool, r.stderr, w)
				}
			}
			if after := l.Ruleset(t); after != before {
				t.Errorf("a failed rotate changed the ruleset (-before +after):\n%s", cmp.Diff(before, after))
			}
		})
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.22", "198.51.100.5": "192.0.2.250", "2001:db8:ffff::4": "2001:db8::22"})
}

// ask returns the source the far side saw for one datagram of a UDP flow.
func ask(t *testing.T, f *lab.UDPFlow, name string) string {
	t.Helper()
	got, err := f.Ask()
	if err != nil {
		t.Fatalf("UDP flow %s: %v", name, err)
	}
	return got
}

// TestRotateFlushConntrack: without --flush-conntrack an existing UDP flow
// keeps its address while new connections get the new one; with it, flows
// bound to the old address move to the new one.
func TestRotateFlushConntrack(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	const pool, dst = "192.0.2.22,192.0.2.23", "198.51.100.4"
	rotate(t, l, pool, dst) // -> .22
	a := l.UDPFlow(t, dst)
	if got := ask(t, a, "a"); got != "192.0.2.22" {
		t.Fatalf("flow a after the first rotation: far side saw %s, want 192.0.2.22", got)
	}

	r := rotate(t, l, pool, dst) // -> .23, no flush
	if strings.Contains(r.stdout, "conntrack") {
		t.Errorf("rotate without --flush-conntrack printed %q, want no conntrack deletion", r.stdout)
	}
	for i := range 3 {
		if got := ask(t, a, "a"); got != "192.0.2.22" {
			t.Errorf("flow a, datagram %d after rotating to .23 without --flush-conntrack: far side saw %s, want the old 192.0.2.22", i, got)
		}
	}
	wantSeen(t, l, map[string]string{dst: "192.0.2.23"})
	b := l.UDPFlow(t, dst)
	if got := ask(t, b, "b"); got != "192.0.2.23" {
		t.Fatalf("new flow b: far side saw %s, want 192.0.2.23", got)
	}

	// -> .22 with the flush: b (bound to .23) moves, a already is on .22.
	r = rotate(t, l, pool, dst, "--flush-conntrack")
	if !regexp.MustCompile(`deleted (1 conntrack entry|[2-9]\d* conntrack entries|1\d+ conntrack entries) bound to 192\.0\.2\.23`).MatchString(r.stdout) {
		t.Errorf("rotate --flush-conntrack printed %q, want it to say it deleted entries bound to 192.0.2.23", r.stdout)
	}
	for name, f := range map[string]*lab.UDPFlow{"a": a, "b": b} {
		if got := ask(t, f, name); got != "192.0.2.22" {
			t.Errorf("flow %s after rotating to .22 with --flush-conntrack: far side saw %s, want 192.0.2.22", name, got)
		}
	}

	// -> .23 with the flush: both flows are bound to .22 now and both move.
	rotate(t, l, pool, dst, "--flush-conntrack")
	for name, f := range map[string]*lab.UDPFlow{"a": a, "b": b} {
		if got := ask(t, f, name); got != "192.0.2.23" {
			t.Errorf("flow %s after rotating to .23 with --flush-conntrack: far side saw %s, want 192.0.2.23", name, got)
		}
	}
	wantSeen(t, l, map[string]string{dst: "192.0.2.23", "198.51.100.5": "192.0.2.250"})
}

// spreadRow is the part of list --json that describes a spread rule.
type spreadRow struct {
	Dst    string   `json:"dst"`
	To     []string `json:"to"`
	Spread bool     `json:"spread"`
}

// TestSpreadRoundRobin: with --spread, new connections take the addresses
// in turn. The rules use the statistic match in nth mode, so over a
// multiple of the pool size every address gets exactly its share; the
// test allows ±1 per address.
func TestSpreadRoundRobin(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	l.HostAddrAdd(t, "192.0.2.21/24", "eth0")
	for _, tt := range []struct {
		to, dst string
		conns   int
	}{
		{"192.0.2.21,192.0.2.22,192.0.2.23", "203.0.113.7", 90},
		{"2001:db8::22,2001:db8::23", "2001:db8:ffff::4", 40},
	} {
		mustES(t, l, "set", "--to", tt.to, "--spread", "--dst", tt.dst)
		pool := strings.Split(tt.to, ",")
		l.ResetSeen()
		client := map[string]int{}
		for range tt.conns {
			client[l.SourceSeen(t, tt.dst)]++
		}
		seen := l.Seen()
		t.Logf("%d connections to %s spread over %s: far side saw %v", tt.conns, tt.dst, tt.to, seen)
		if diff := cmp.Diff(seen, client); diff != "" {
			t.Errorf("what the far side counted and what the client was told differ (-far side +client):\n%s", diff)
		}
		share := tt.conns / len(pool)
		for _, a := range pool {
			if n := seen[a]; n < share-1 || n > share+1 {
				t.Errorf("%s got %d of %d connections, want %d±1", a, n, tt.conns, share)
			}
		}
		for a, n := range seen {
			if !slices.Contains(pool, a) {
				t.Errorf("%d connections left from %q, outside the pool %s", n, a, tt.to)
			}
		}
	}

	var got struct {
		Rules []spreadRow `json:"rules"`
	}
	out := mustES(t, l, "list", "--json")
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("list --json: %v\n%s", err, out)
	}
	want := []spreadRow{
		{"203.0.113.7/32", []string{"192.0.2.21", "192.0.2.22", "192.0.2.23"}, true},
		{"2001:db8:ffff::4/128", []string{"2001:db8::22", "2001:db8::23"}, true},
	}
	if diff := cmp.Diff(want, got.Rules); diff != "" {
		t.Errorf("list --json (-want +got):\n%s", diff)
	}
	// Other destinations are not spread.
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "2001:db8::1": "2001:db8::250"})
}

// moves returns rotate's report of one move, "DST: FROM -> TO".
func moves(stdout, dst string) [][2]string {
	var out [][2]string
	for line := range strings.Lines(stdout) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), dst+": ")
		if !ok {
			continue
		}
		from, to, ok := strings.Cut(rest, " -> ")
		if ok {
			out = append(out, [2]string{from, to})
		}
	}
	return out
}

// TestRotateConcurrent: rotations from parallel processes are serialized by
// the lock, so they end with exactly one rule for the destination, one
// jump, and no lost rotation: the moves the processes report chain up from
// the natural source to the address in force.
func TestRotateConcurrent(t *testing.T) {
	iptablesOnly(t, "it counts the jump and the chain's rules")
	t.Parallel()
	l := newLab(t)
	const dst, pool, procs = "198.51.100.4", "192.0.2.22,192.0.2.23", 10
	next := map[string]string{"192.0.2.250": "192.0.2.22", "192.0.2.22": "192.0.2.23", "192.0.2.23": "192.0.2.22"}
	current := "192.0.2.250"
	for _, round := range []struct {
		name string
		args []string
	}{
		{"default lock timeout", nil},
		// With a timeout too short to wait for the others, some give up
		// with the documented message and change nothing.
		{"1ms lock timeout", []string{"--lock-timeout", "1ms"}},
	} {
		results := make([]result, procs)
		var wg sync.WaitGroup
		for i := range procs {
			wg.Go(func() {
				args := append(slices.Clone(round.args), "rotate", "--pool", pool, "--dst", dst)
				stdout, stderr, code := l.RunErr(bin, args...)
				results[i] = result{stdout, stderr, code}
			})
		}
		wg.Wait()
		var done [][2]string
		busy := 0
		for i, r := range results {
			switch {
			case r.code == 0:
				m := moves(r.stdout, dst+"/32")
				if len(m) != 1 {
					t.Errorf("%s: process %d printed %q, want one move", round.name, i, r.stdout)
				}
				done = append(done, m...)
			case r.code == exitFailure && strings.Contains(r.stderr, "another egress-snat run is holding the lock"):
				busy++
			default:
				t.Errorf("%s: process %d: exit %d\nstdout:\n%s\nstderr:\n%s", round.name, i, r.code, r.stdout, r.stderr)
			}
		}
		// Walk the reported moves from the address in force before the round.
		for range len(done) {
			i := slices.IndexFunc(done, func(m [2]string) bool { return m[0] == current })
			if i < 0 {
				t.Fatalf("%s: no process moved %s away from %s, moves left %q: a rotation was lost or repeated", round.name, dst, current, done)
			}
			if done[i][1] != next[current] {
				t.Errorf("%s: a process moved %s from %s to %s, want %s", round.name, dst, current, done[i][1], next[current])
			}
			current = done[i][1]
			done = slices.Delete(done, i, i+1)
		}
		t.Logf("%s: %d of %d processes rotated, %d gave up on the lock; %s now leaves from %s", round.name, procs-busy, procs, busy, dst, current)
		if round.args == nil && busy > 0 {
			t.Errorf("%s: %d processes gave up on the lock, want none within the default 10s", round.name, busy)
		}

		rs := l.Ruleset(t)
		var mine []string
		for _, r := range chainRules(rs) {
			if strings.Contains(r, dst+"/32") {
				mine = append(mine, r)
			}
		}
		if len(mine) != 1 || len(chainRules(rs)) != 1 || !strings.Contains(mine[0], "--to-source "+current) {
			t.Errorf("%s: chain rules %q, want exactly one, for %s to %s", round.name, chainRules(rs), dst, current)
		}
		if n := strings.Count(rs, jumpRule+"\n"); n != 1 {
			t.Errorf("%s: the jump appears %d times, want once\nruleset:\n%s", round.name, n, rs)
		}
		wantJumpFirst(t, rs, 1)
		if got := parseList(t, mustES(t, l, "list", "--json")).Rules; len(got) != 1 || got[0].Dst != dst+"/32" || !slices.Equal(got[0].To, []string{current}) {
			t.Errorf("%s: list --json rules %+v, want %s -> %s", round.name, got, dst, current)
		}
		mustES(t, l, "check") // exit 0: in sync, the chain parses
		wantSeen(t, l, map[string]string{dst: current})
	}
}

// loadStats is what a stream of short connections observed.
type loadStats struct {
	ok, failed int
	client     map[string]int // source the far side reported, per connection
	firstErr   error
	took       time.Duration
}

// connStream opens short TCP connections from the lab's host to dst, one
// after another, until stop is closed, max connections were made or limit
// has passed. All sockets are made on one thread inside the host
// namespace, so it costs one namespace switch in all.
func connStream(l *lab.Lab, dst string, stop <-chan struct{}, max int, limit time.Duration) loadStats {
	st := loadStats{client: map[string]int{}}
	start := time.Now()
	err := lab.Do(l.Host, func() error {
		d := net.Dialer{Timeout: 2 * time.Second}
		addr := net.JoinHostPort(dst, fmt.Sprint(lab.TCPPort))
		for st.ok+st.failed < max && time.Since(start) < limit {
			select {
			case <-stop:
				return nil
			default:
			}
			src, err := oneConn(d, addr)
			if err != nil {
				st.failed++
				if st.firstErr == nil {
					st.firstErr = err
				}
				continue
			}
			st.ok++
			st.client[src]++
		}
		return nil
	})
	if err != nil && st.firstErr == nil {
		st.firstErr = err
	}
	st.took = time.Since(start)
	return st
}

func oneConn(d net.Dialer, addr string) (string, error) {
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// TestRotateUnderLoad: 60 rotations while new connections stream to the
// destination. Make-before-break means no connection may ever leave from
// an address outside the pool, the natural source included.
func TestRotateUnderLoad(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	const (
		dst       = "203.0.113.7"
		pool      = "192.0.2.22,192.0.2.23"
		rotations = 60
		maxConns  = 100000
		maxTime   = 90 * time.Second
	)
	rotate(t, l, pool, dst) // the rule exists before the first connection
	l.ResetSeen()

	stop := make(chan struct{})
	statsc := make(chan loadStats, 1)
	go func() { statsc <- connStream(l, dst, stop, maxConns, maxTime) }()
	// Let the stream get going so the first rotation happens under load.
	time.Sleep(100 * time.Millisecond)

	start := time.Now()
	perRotation := make([]int, 0, rotations)
	var errs []string
	for i := range rotations {
		before := total(l.Seen())
		stdout, stderr, code := l.RunErr(bin, "rotate", "--pool", pool, "--dst", dst)
		if code != 0 {
			errs = append(errs, fmt.Sprintf("rotation %d: exit %d\nstdout:\n%s\nstderr:\n%s", i+1, code, stdout, stderr))
			break
		}
		perRotation = append(perRotation, total(l.Seen())-before)
	}
	rotating := time.Since(start)
	time.Sleep(50 * time.Millisecond) // connections after the last rotation too
	close(stop)
	st := <-statsc
	seen := l.Seen()
	for _, e := range errs {
		t.Error(e)
	}

	t.Logf("backend %s: %d rotations in %v; %d connections in %v (%.0f/s), %d failed; far side saw %d in all: %v",
		backend(t), len(perRotation), rotating.Round(time.Millisecond), st.ok, st.took.Round(time.Millisecond),
		float64(st.ok)/st.took.Seconds(), st.failed, total(seen), seen)
	t.Logf("new connections during each rotation (min/median/max): %d/%d/%d", minMedMax(perRotation)[0], minMedMax(perRotation)[1], minMedMax(perRotation)[2])
	pooled := strings.Split(pool, ",")
	for _, a := range slices.Sorted(maps.Keys(seen)) {
		if !slices.Contains(pooled, a) {
			t.Errorf("the far side saw %d connections from %s, outside the pool %s", seen[a], a, pool)
		}
	}
	for _, a := range pooled {
		if seen[a] == 0 {
			t.Errorf("the far side saw no connection from %s: the stream did not overlap the rotations", a)
		}
	}
	for a, n := range st.client {
		if !slices.Contains(pooled, a) {
			t.Errorf("the client was told %d times that it came from %q, outside the pool", n, a)
		}
	}
	if st.ok < 10*rotations {
		t.Errorf("only %d connections during %d rotations; want at least %d for the test to mean something", st.ok, rotations, 10*rotations)
	}
	if st.failed > 0 {
		t.Errorf("%d connections failed during the rotations (first: %v); make-before-break should lose none", st.failed, st.firstErr)
	}
	if st.took >= maxTime {
		t.Errorf("the stream ran into its time limit %v: rotations too slow", maxTime)
	}
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func minMedMax(xs []int) [3]int {
	if len(xs) == 0 {
		return [3]int{}
	}
	s := slices.Sorted(slices.Values(xs))
	return [3]int{s[0], s[len(s)/2], s[len(s)-1]}
}
