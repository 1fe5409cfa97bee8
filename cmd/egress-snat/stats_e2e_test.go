package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/stats"
)

// udpFlows sends one datagram from n fresh sockets of H to dst: n flows.
func udpFlows(t *testing.T, l *lab.Lab, dst string, n int) {
	t.Helper()
	if err := lab.Do(l.Host, func() error {
		for range n {
			c, err := net.Dial("udp", dst)
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("stats\n"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

func conntrackCount(t *testing.T, l *lab.Lab, replyDst string) int {
	t.Helper()
	out, _, _ := l.RunErr("conntrack", "-L", "--reply-dst", replyDst)
	return strings.Count(out, "\n")
}

func TestStats(t *testing.T) {
	iptablesOnly(t, "it reads a foreign iptables SNAT rule's port range beside ours")
	l := newLab(t)
	if out := mustES(t, l, "stats"); !strings.Contains(out, "no SNAT rules") {
		t.Errorf("stats without rules:\n%s", out)
	}
	mustES(t, l, "set", "--to", "192.0.2.22", "--dst", "198.51.100.4")
	// A small port range, written by hand. Flows to one tuple need a port
	// each; near exhaustion the kernel's search for a free one may give up
	// and drop a flow's first packet, so the test sends 88 and holds at
	// least 80% with what conntrack really took.
	foreign(t, l, 4, "-t", "nat", "-A", "POSTROUTING", "-d", "198.51.100.5", "-p", "udp", "-j", "SNAT", "--to-source", "192.0.2.23:40000-40099")
	udpFlows(t, l, "198.51.100.4:7001", 5)
	udpFlows(t, l, "198.51.100.4:9", 1) // "1 flow", not "1 flows"
	udpFlows(t, l, "198.51.100.4:10", 1)
	udpFlows(t, l, "198.51.100.5:53", 88)

	missing := filepath.Join(t.TempDir(), "textfile_collector")
	if r := es(t, l, "stats", "--prometheus", filepath.Join(missing, "egress_snat.prom")); r.code != exitUsage || !strings.Contains(r.stderr, "the directory "+missing+" does not exist") {
		t.Errorf("stats --prometheus into a missing directory: exit %d, stderr %q; want exit %d naming the directory", r.code, r.stderr, exitUsage)
	}

	prom := filepath.Join(t.TempDir(), "egress_snat.prom")
	before := time.Now()
	r := es(t, l, "stats", "--json", "--prometheus", prom)
	after := time.Now()
	if r.code != 0 {
		t.Fatalf("stats: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	var got struct {
		Addresses []struct {
			Address    string         `json:"address"`
			Flows      map[string]int `json:"flows"`
			Total      int            `json:"total_flows"`
			PortsInUse int            `json:"ports_in_use"`
			RangeSize  int            `json:"port_range_size"`
			Packets    uint64         `json:"rule_packets"`
			Managed    bool           `json:"managed"`
			Top        []struct {
				Dst   string `json:"dst"`
				Flows int    `json:"flows"`
			} `json:"top_destinations"`
		} `json:"addresses"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, r.stdout)
	}
	if len(got.Addresses) != 2 {
		t.Fatalf("stats reports %d addresses, want 2:\n%s", len(got.Addresses), r.stdout)
	}
	a22, a23 := got.Addresses[0], got.Addresses[1]
	if want := conntrackCount(t, l, "192.0.2.22"); a22.Total != want || want != 7 || a22.Flows["udp"] != 7 {
		t.Errorf("192.0.2.22: %d flows (%v), conntrack -L lists %d, the test made 7", a22.Total, a22.Flows, want)
	}
	held := conntrackCount(t, l, "192.0.2.23")
	if a23.Total != held || held < 80 || held > 88 {
		t.Errorf("192.0.2.23: %d flows, conntrack -L lists %d, the test made 88", a23.Total, held)
	}
	if !a22.Managed || a22.Packets != 7 || a22.Top[0].Dst != "198.51.100.4:7001" || a22.Top[0].Flows != 5 {
		t.Errorf("192.0.2.22: %+v", a22)
	}
	if a23.Managed || a23.RangeSize != 100 || a23.PortsInUse != held {
		t.Errorf("192.0.2.23: %+v", a23)
	}
	if !strings.Contains(r.stderr, "WARNING") || !strings.Contains(r.stderr, fmt.Sprintf("%d of 100", held)) || strings.Contains(r.stderr, "192.0.2.22:") {
		t.Errorf("the exhaustion warning is missing or wrong:\n%s", r.stderr)
	}

	b, err := os.ReadFile(prom)
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("the textfile does not parse: %v\n%s", err, b)
	}
	flows := 0.0
	for _, m := range families["egress_snat_flows"].GetMetric() {
		flows += m.GetGauge().GetValue()
	}
	if flows != float64(7+held) {
		t.Errorf("egress_snat_flows sums to %v, want %d\n%s", flows, 7+held, b)
	}
	if m := families[stats.LastRunMetric].GetMetric(); len(m) != 1 {
		t.Errorf("no %s in the textfile:\n%s", stats.LastRunMetric, b)
	} else if v := m[0].GetGauge().GetValue(); v < float64(before.Unix()) || v > float64(after.Unix()+1) {
		t.Errorf("%s = %v, want the time of the run, %d to %d", stats.LastRunMetric, v, before.Unix(), after.Unix())
	}
	text := mustES(t, l, "stats")
	if !strings.Contains(text, "192.0.2.22 (egress-snat)") || !strings.Contains(text, fmt.Sprintf("%d of 100", held)) {
		t.Errorf("stats text:\n%s", text)
	}
	if !regexp.MustCompile(`198\.51\.100\.4:9 +1 flow\n`).MatchString(text) || strings.Contains(text, " 1 flows") {
		t.Errorf("stats text: want \"1 flow\" for 198.51.100.4:9, and no \"1 flows\":\n%s", text)
	}
}
