package main

// End-to-end test of --to-ports: a small port range runs out on the wire.

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// holdConns opens n TCP connections from H to dst's flow port, one at a
// time, and keeps those that connect open until the test ends. It returns
// how many connected and the sources the far side saw for them.
func holdConns(t *testing.T, l *lab.Lab, dst string, n int) (ok int, sources map[string]int) {
	t.Helper()
	sources = map[string]int{}
	addr := net.JoinHostPort(dst, fmt.Sprint(lab.TCPFlowPort))
	for range n {
		var c net.Conn
		err := lab.Do(l.Host, func() (err error) {
			c, err = net.DialTimeout("tcp", addr, time.Second)
			return err
		})
		if err != nil {
			continue
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("?\n")); err != nil {
			continue
		}
		buf := make([]byte, 64)
		m, err := c.Read(buf)
		if err != nil {
			continue
		}
		ok++
		sources[strings.TrimSpace(string(buf[:m]))]++
	}
	return ok, sources
}

// TestToPortsRunOut: with --to-ports 40000-40007, eight connections to one
// far address and port hold the eight ports of the range, and the next
// ones fail: the kernel finds no free source port for the tuple. The
// rule shows its range in list and list --json, stats warns with the
// range, check finds nothing wrong, and a bad range exits 2 naming it.
func TestToPortsRunOut(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	r := es(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.7", "--to-ports", "40000-399")
	if r.code != 2 || !strings.Contains(r.stderr, `"40000-399"`) {
		t.Errorf("set --to-ports 40000-399: exit %d, stderr %q; want 2 naming the range", r.code, r.stderr)
	}
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.7", "--to-ports", "40000-40007")
	const tries = 12
	ok, sources := holdConns(t, l, "203.0.113.7", tries)
	t.Logf("%s: %d of %d connections held open to 203.0.113.7:%d connected, from %v", backend(t), ok, tries, lab.TCPFlowPort, sources)
	if ok != 8 || sources["192.0.2.22"] != 8 {
		t.Errorf("%d of %d connections connected (sources %v), want the 8 of the range, all from 192.0.2.22", ok, tries, sources)
	}
	if text := mustES(t, l, "list"); !strings.Contains(text, "192.0.2.22 ports 40000-40007") {
		t.Errorf("list:\n%s\nwant the port range shown", text)
	}
	var got struct {
		Rules []struct {
			Dst   string `json:"dst"`
			Ports string `json:"ports"`
		} `json:"rules"`
	}
	out := mustES(t, l, "list", "--json")
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("list --json: %v\n%s", err, out)
	}
	if len(got.Rules) != 1 || got.Rules[0].Ports != "40000-40007" {
		t.Errorf("list --json rules %+v, want one with ports 40000-40007", got.Rules)
	}
	// stats reads the range back and warns: the busiest tuple holds it all.
	var st struct {
		Addresses []struct {
			Address    string `json:"address"`
			PortRange  string `json:"port_range"`
			PortsInUse int    `json:"ports_in_use"`
			Warning    string `json:"warning"`
		} `json:"addresses"`
	}
	out = mustES(t, l, "stats", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, out)
	}
	found := false
	for _, a := range st.Addresses {
		if a.Address == "192.0.2.22" {
			found = true
			if a.PortRange != "40000-40007" || a.PortsInUse != 8 || a.Warning == "" {
				t.Errorf("stats for 192.0.2.22: %+v, want range 40000-40007, 8 in use, a warning", a)
			}
		}
	}
	if !found {
		t.Errorf("stats --json: no 192.0.2.22 in\n%s", out)
	}
	if r := es(t, l, "check"); r.code != 0 {
		t.Errorf("check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// Without the range, the next connection gets a port of the kernel's.
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "203.0.113.7")
	if ok, _ := holdConns(t, l, "203.0.113.7", 1); ok != 1 {
		t.Errorf("after set without --to-ports, a new connection failed")
	}
}
