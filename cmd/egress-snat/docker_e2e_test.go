package main

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// bridgeSender is a namespace plugged into one of Docker's bridges in H with
// an address of that network, the way a container is plugged in, but not
// made by Docker: it survives a dockerd restart (containers do not, without
// live-restore), so the test can watch, connection by connection, when
// its traffic falls back to Docker's MASQUERADE and when egress-snat has it
// back. On the wire it is a container of that network.
type bridgeSender struct {
	ns   string
	addr netip.Addr
}

// newBridgeSender plugs a namespace into bridge dev in H with addr/bits and
// a default route via gw. The namespace is deleted at t's cleanup.
func newBridgeSender(t *testing.T, l *lab.Lab, dev string, addr netip.Prefix, gw netip.Addr) *bridgeSender {
	t.Helper()
	// Named like the lab's client namespaces, so that a lab sweep removes
	// it if this process dies without cleaning up.
	s := &bridgeSender{ns: strings.TrimSuffix(l.Host, "-h") + "-c200", addr: addr.Addr()}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "delete", s.ns).Run() })
	run("netns", "add", s.ns)
	// Both ends are created inside the namespaces: nothing appears in the
	// root namespace.
	run("-n", s.ns, "link", "add", "eth0", "index", "1200", "type", "veth", "peer", "name", "vsend0", "netns", l.Host)
	run("-n", l.Host, "link", "set", "vsend0", "master", dev, "up")
	run("-n", s.ns, "addr", "add", addr.String(), "dev", "eth0")
	run("-n", s.ns, "link", "set", "lo", "up")
	run("-n", s.ns, "link", "set", "eth0", "up")
	run("-n", s.ns, "route", "add", "default", "via", gw.String())
	return s
}

// seen connects to G's probe at dst and returns the source it saw, or ""
// when the connection failed within timeout.
func (s *bridgeSender) seen(dst string, timeout time.Duration) string {
	addr := net.JoinHostPort(dst, fmt.Sprint(lab.TCPPort))
	var c net.Conn
	err := lab.Do(s.ns, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	if err != nil {
		return ""
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return ""
	}
	return strings.TrimSpace(line)
}

// sample is one connection of a sender during a dockerd restart.
type sample struct {
	at  time.Time
	src string
}

// pollSender connects from s to dst every interval until it is told, on
// done, when the event under test finished, and then until a connection
// started after that time leaves with want (at most limit after it). It
// returns every connection's source.
func pollSender(s *bridgeSender, dst, want string, interval, limit time.Duration, done <-chan time.Time) <-chan []sample {
	out := make(chan []sample, 1)
	go func() {
		var got []sample
		var finished time.Time
		for {
			at := time.Now()
			got = append(got, sample{at, s.seen(dst, 300*time.Millisecond)})
			if finished.IsZero() {
				select {
				case finished = <-done:
				default:
				}
			}
			last := got[len(got)-1]
			if !finished.IsZero() && (last.src == want && at.After(finished) || time.Since(finished) > limit) {
				out <- got
				return
			}
			time.Sleep(interval)
		}
	}()
	return out
}

// runs summarises samples as runs of one source: "192.0.2.23 x40, none x9,
// 192.0.2.250 x12, | restart finished, 192.0.2.23 x1".
func runs(samples []sample, mark time.Time) string {
	var parts []string
	n, marked := 0, false
	for i, s := range samples {
		n++
		next := i+1 < len(samples)
		crosses := next && !marked && samples[i+1].at.After(mark)
		if next && samples[i+1].src == s.src && !crosses {
			continue
		}
		src := s.src
		if src == "" {
			src = "none"
		}
		parts = append(parts, fmt.Sprintf("%s x%d", src, n))
		n = 0
		if crosses {
			parts = append(parts, "| restart finished")
			marked = true
		}
	}
	return strings.Join(parts, ", ")
}

// TestDockerFrom runs a real dockerd in H with two networks: its default
// bridge and a user-defined one. A --from rule for the default bridge's
// subnet makes its containers leave with its source, while the other
// network's containers and the host's own traffic keep theirs, and clear
// leaves Docker's rules exactly as Docker wrote them. Then watch -f keeps
// the rule while dockerd restarts: a restart puts the default bridge's
// MASQUERADE back at POSTROUTING 1, above egress-snat's jump (check says
// jump-not-first, and the containers fall back to the primary address), and
// watch must have the containers' source back within 2s of the restart.
// Not parallel: the repair time is a latency bound, and dockerd is heavy.
func TestDockerFrom(t *testing.T) {
	iptablesOnly(t, "it counts the nat tables holding EGRESS-SNAT beside Docker's (TestNFTNeighbours runs Docker beside the nftables table)")
	l := newLab(t)
	d := lab.StartDocker(t, l)
	const net1, net2 = "bridge", "es-net2" // Docker's default bridge, and a user-defined network
	net1Subnet := lab.DockerBridge
	d.NetworkCreate(t, net2, "10.89.2.0/24")
	baseline := l.Ruleset(t)

	if got := d.SourceSeen(t, net1, "198.51.100.4"); got != "192.0.2.250" {
		t.Fatalf("before any rule, a container on %s: far side saw %q, want 192.0.2.250 (Docker's MASQUERADE)", net1, got)
	}
	mustES(t, l, "set", "--to", "192.0.2.23", "--from", net1Subnet)
	for _, c := range []struct{ network, dst, want string }{
		{net1, "198.51.100.4", "192.0.2.23"},
		{net1, "203.0.113.7", "192.0.2.23"},
		{net2, "198.51.100.4", "192.0.2.250"},
	} {
		if got := d.SourceSeen(t, c.network, c.dst); got != c.want {
			t.Errorf("after set --from %s, a container on %s to %s: far side saw %q, want %q", net1Subnet, c.network, c.dst, got, c.want)
		}
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250", "203.0.113.7": "192.0.2.250"})
	wantJumpFirst(t, l.Ruleset(t), 1)

	mustES(t, l, "clear")
	if got := l.Ruleset(t); got != baseline {
		t.Errorf("clear: the ruleset differs from Docker's alone (-before +after):\n%s", cmp.Diff(baseline, got))
	}

	// watch keeps the rule through dockerd restarts.
	gw := netip.MustParsePrefix(net1Subnet).Addr().Next()
	sender := newBridgeSender(t, l, "docker0", netip.MustParsePrefix("172.30.255.250/16"), gw)
	file := relWrite(t, t.TempDir(), "snat.yaml", fmt.Sprintf("rules:\n  - to: 192.0.2.23\n    from: [%s]\n", net1Subnet))
	w := relStartWatch(t, l, file)
	if got := sender.seen("198.51.100.4", time.Second); got != "192.0.2.23" {
		t.Fatalf("watch -f: a sender on %s: far side saw %q, want 192.0.2.23", net1, got)
	}

	// With watch stopped, the restart's damage stays to be seen.
	w.freeze(t)
	d.Restart(t)
	if _, kinds := relCheck(t, l, file); !slices.Contains(kinds, "jump-not-first") {
		t.Errorf("after a dockerd restart, check -f: drift %v, want jump-not-first\n%s", kinds, l.Ruleset(t))
	}
	if got := sender.seen("198.51.100.4", time.Second); got != "192.0.2.250" {
		t.Errorf("after a dockerd restart with watch stopped, a sender on %s: far side saw %q, want 192.0.2.250 (Docker's MASQUERADE above our jump)", net1, got)
	}
	w.thaw(t)
	if _, ok := relWaitInSync(t, l, file, 5*time.Second); !ok {
		t.Fatalf("watch did not repair the restart's drift within 5s of thawing\nlog:\n%s", w.p.stderr.String())
	}

	// With watch running: how long until the sender is back on .23.
	done := make(chan time.Time, 1)
	polled := pollSender(sender, "198.51.100.4", "192.0.2.23", 20*time.Millisecond, 10*time.Second, done)
	d.Restart(t)
	restarted := time.Now()
	done <- restarted
	samples := <-polled
	last := samples[len(samples)-1]
	if last.src != "192.0.2.23" {
		t.Fatalf("watch did not bring a sender on %s back to 192.0.2.23 within 10s of the dockerd restart; last samples: %v\nlog:\n%s",
			net1, samples[max(0, len(samples)-5):], w.p.stderr.String())
	}
	repair := last.at.Sub(restarted)
	// The outage as the wire saw it: from the first connection that did
	// not leave with .23 to the first one after it that did.
	outage := "no connection off 192.0.2.23 seen"
	for i, s := range samples {
		if s.src == "192.0.2.23" {
			continue
		}
		for _, b := range samples[i:] {
			if b.src == "192.0.2.23" {
				outage = fmt.Sprintf("off 192.0.2.23 for %.2f s (first %q)", b.at.Sub(s.at).Seconds(), s.src)
				break
			}
		}
		break
	}
	t.Logf("repair after dockerd restart: %.2f s from the restart finishing (API answering) until a sender on %s left with 192.0.2.23 again; %s; connections polled every 20ms: %s",
		repair.Seconds(), net1, outage, runs(samples, restarted))
	if repair > relReconverge {
		t.Errorf("after a dockerd restart, a sender on %s was back on 192.0.2.23 only %.2f s after the restart finished, want within %s", net1, repair.Seconds(), relReconverge)
	}
	if got := d.SourceSeen(t, net1, "198.51.100.4"); got != "192.0.2.23" {
		t.Errorf("after the restart, a fresh container on %s: far side saw %q, want 192.0.2.23", net1, got)
	} else {
		t.Logf("a container on %s started after the restart saw 192.0.2.23 %.2f s after the restart finished (its start and exit included)", net1, time.Since(restarted).Seconds())
	}
	if got := d.SourceSeen(t, net2, "198.51.100.4"); got != "192.0.2.250" {
		t.Errorf("after the restart, a container on %s: far side saw %q, want 192.0.2.250", net2, got)
	}
	wantSeen(t, l, map[string]string{"198.51.100.4": "192.0.2.250"})
}
