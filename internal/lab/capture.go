package lab

import (
	"bufio"
	"bytes"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Arrivals runs fn and returns how many packets matching filter (a pcap
// filter expression, as tcpdump takes it) arrived at each of G's interfaces
// towards H ("eth0", and "eth1" with WithSecondNIC) while fn ran. It is the
// lab's answer to "which way did it come": the source address a probe
// reports says who sent, not by which link.
//
// One tcpdump per interface runs in G, capturing inbound packets only; fn
// starts once each reports that it is listening, and the captures stop
// shortly after fn returns. A missing tcpdump skips the test, or fails it
// under CI (see Require).
func (l *Lab) Arrivals(t testing.TB, filter string, fn func()) map[string]int {
	t.Helper()
	if _, err := exec.LookPath("tcpdump"); err != nil {
		skipOrFail(t, "lab.Arrivals needs tcpdump")
	}
	type capture struct {
		cmd *exec.Cmd
		out bytes.Buffer
	}
	var caps []*capture
	stop := func() {
		for _, c := range caps {
			c.cmd.Process.Signal(syscall.SIGINT)
		}
		for _, c := range caps {
			done := make(chan struct{})
			go func() { c.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				c.cmd.Process.Kill()
				<-done
			}
		}
	}
	for _, dev := range l.devs {
		c := &capture{}
		// -Q in: what G received; --immediate-mode and -l: no packet waits
		// in a buffer when the capture is stopped.
		c.cmd = exec.Command("ip", "netns", "exec", l.Gateway, "tcpdump", "-i", dev, "-n", "-l", "-q",
			"-Q", "in", "--immediate-mode", filter)
		c.cmd.Stdout = &c.out
		stderr, err := c.cmd.StderrPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.cmd.Start(); err != nil {
			stop()
			t.Fatalf("lab: tcpdump on %s in %s: %v", dev, l.Gateway, err)
		}
		caps = append(caps, c)
		// tcpdump says "listening on DEV" once its filter is attached.
		ready := make(chan string, 1)
		go func() {
			r := bufio.NewReader(stderr)
			var seen strings.Builder
			for {
				line, err := r.ReadString('\n')
				seen.WriteString(line)
				if strings.Contains(line, "listening on") {
					ready <- ""
					io.Copy(io.Discard, r)
					return
				}
				if err != nil {
					ready <- seen.String()
					return
				}
			}
		}()
		select {
		case msg := <-ready:
			if msg != "" {
				stop()
				t.Fatalf("lab: tcpdump -i %s %q in %s did not start:\n%s", dev, filter, l.Gateway, msg)
			}
		case <-time.After(5 * time.Second):
			stop()
			t.Fatalf("lab: tcpdump -i %s in %s not listening after 5s", dev, l.Gateway)
		}
	}
	fn()
	// The packets are in the capture's ring as soon as G received them;
	// give tcpdump a moment to read them out before it stops.
	time.Sleep(50 * time.Millisecond)
	stop()
	got := map[string]int{}
	for i, c := range caps {
		n := 0
		for line := range strings.Lines(c.out.String()) {
			if strings.TrimSpace(line) != "" {
				n++
			}
		}
		got[l.devs[i]] = n
	}
	return got
}
