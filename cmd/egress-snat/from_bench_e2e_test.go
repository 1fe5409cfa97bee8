package main

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// BenchmarkFromRules measures what the number of --from rules costs new
// connections: with 50 --from rules installed, two clients routed through H
// connect in turn, one matched by the chain's first rule and one by its last
// (the 48 rules between are /25s of other subnets, ordered by the product's
// precedence: longer prefixes first). Only the first packet of a connection
// crosses the nat table, and the chain stops at the first match, so the
// first client's connections cost what they would with a single rule; the
// second's pay for all 50. Alternating them connection by connection keeps
// the comparison fair on a loaded machine. Each op is one connection of
// each: dial G's probe, read the source it saw (it must be the rule's),
// close. Reported: the rate of each (connections per second of connecting
// time, one at a time). Benchmarks never run in `make test`; run it bounded
// with
//
//	go test -run '^$' -bench BenchmarkFromRules -benchtime 2000x ./cmd/egress-snat
//
// (EGRESS_SNAT_IPTABLES=legacy for the other backend).
func BenchmarkFromRules(b *testing.B) {
	const n = 50
	l := lab.New(b)
	l.StartProbe(b)
	first := l.AddClient(b, lab.ClientOptions{})
	last := l.AddClient(b, lab.ClientOptions{})
	// The first client's rule is a /25 of its /24 holding its address, and
	// sorts before the other /25s by address; the last client's is its /24.
	firstFrom := netip.PrefixFrom(first.Subnet4.Addr(), 25)
	froms := []string{firstFrom.String()}
	for i := range n - 2 {
		froms = append(froms, fmt.Sprintf("10.90.%d.0/25", i))
	}
	froms = append(froms, last.Subnet4.String())
	file := fmt.Sprintf("rules:\n  - to: 192.0.2.23\n    from: [%s]\n", strings.Join(froms, ", "))
	path := b.TempDir() + "/snat.yaml"
	if err := os.WriteFile(path, []byte(file), 0o644); err != nil {
		b.Fatal(err)
	}
	if stdout, stderr, code := l.RunErr(bin, "apply", "-f", path); code != 0 {
		b.Fatalf("apply: exit %d\n%s%s", code, stdout, stderr)
	}
	var rules []string
	for _, r := range strings.Split(l.Run(b, iptablesCmd(4), "-t", "nat", "-S", "EGRESS-SNAT"), "\n") {
		if strings.HasPrefix(r, "-A EGRESS-SNAT") {
			rules = append(rules, r)
		}
	}
	if len(rules) != n || !strings.Contains(rules[0], "-s "+firstFrom.String()) || !strings.Contains(rules[n-1], "-s "+last.Subnet4.String()) {
		b.Fatalf("want %d chain rules, %s first and %s last, got:\n%s", n, firstFrom, last.Subnet4, strings.Join(rules, "\n"))
	}

	var took [2]time.Duration
	each := [2][]time.Duration{make([]time.Duration, 0, b.N), make([]time.Duration, 0, b.N)}
	b.ResetTimer()
	for i := range b.N {
		for j, c := range []*lab.Client{first, last} {
			var d time.Duration
			err := lab.Do(c.NS, func() error {
				start := time.Now()
				err := connectOnce("198.51.100.4", "192.0.2.23")
				d = time.Since(start)
				return err
			})
			if err != nil {
				b.Fatalf("connection %d from %s: %v", i, c.Addr4, err)
			}
			took[j] += d
			each[j] = append(each[j], d)
		}
	}
	b.StopTimer()
	rate1, rateN := float64(b.N)/took[0].Seconds(), float64(b.N)/took[1].Seconds()
	b.ReportMetric(rate1, "conn/s-rule1")
	b.ReportMetric(rateN, fmt.Sprintf("conn/s-rule%d", n))
	b.ReportMetric(rateN/rate1, "ratio")
	// Medians resist the load spikes of a shared machine better than sums.
	med := func(ds []time.Duration) float64 {
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Microseconds())
	}
	b.ReportMetric(med(each[0]), "µs-median-rule1")
	b.ReportMetric(med(each[1]), fmt.Sprintf("µs-median-rule%d", n))
}

// connectOnce opens one TCP connection to G's probe at dst, checks that it
// saw want as the source, and closes with SO_LINGER 0 (RST), so no TIME_WAIT
// piles up in the client over thousands of connections.
func connectOnce(dst, want string) error {
	c, err := net.DialTimeout("tcp", net.JoinHostPort(dst, fmt.Sprint(lab.TCPPort)), 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if got := strings.TrimSpace(line); got != want {
		if a, err := netip.ParseAddr(got); err == nil {
			return fmt.Errorf("far side saw source %s, want %s", a, want)
		}
		return fmt.Errorf("far side answered %q, want %s", got, want)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		if raw, err := tc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				syscall.SetsockoptLinger(int(fd), syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1, Linger: 0})
			})
		}
	}
	return nil
}
