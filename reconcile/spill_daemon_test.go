package reconcile_test

import (
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/snat"
)

// fakeFlows is a conntrack table the test sets.
type fakeFlows struct {
	mu sync.Mutex
	t  conntrack.Fake
}

func (f *fakeFlows) Flows(fam int) ([]conntrack.Flow, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.t.Flows(fam)
}

// set makes the table n TCP flows from the natural source 192.0.2.250 to
// dst, translated to to.
func (f *fakeFlows) set(n int, to, dst string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.t = nil
	d := netip.MustParseAddrPort(dst)
	for i := range n {
		src := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.250"), uint16(30000+i))
		f.t = append(f.t, conntrack.Flow{
			Orig:     conntrack.Tuple{Proto: conntrack.TCP, Src: src, Dst: d},
			Reply:    conntrack.Tuple{Proto: conntrack.TCP, Src: d, Dst: netip.AddrPortFrom(netip.MustParseAddr(to), uint16(40000+i))},
			TCPState: 3,
		})
	}
}

// TestDaemonSpill drives a spill through the daemon over the fakes: 8 of
// 10 ports of .22 toward 203.0.113.9:443 install a spill entry to .23
// ahead of the rule; the canary's repair of a flushed chain writes it
// back; a daemon that starts again with the tuple between the thresholds
// keeps it, from the entry installed; below 50% it goes.
func TestDaemonSpill(t *testing.T) {
	h := newFakeHost(t)
	h.write(t, "rules:\n  - to: [192.0.2.22, 192.0.2.23]\n    dst: [203.0.113.0/24]\n    to-ports: 40000-40009\n    spill: true\n")
	h.start(t)
	h.awaitHealth(t)
	rule := "203.0.113.0/24 -> 192.0.2.22 ports 40000-40009"
	spill := "203.0.113.9/32 -> 192.0.2.23 ports 40000-40009"
	h.wantInstalled(t, "at the start", []string{rule})

	h.flows.set(8, "192.0.2.22", "203.0.113.9:443")
	if !h.await(t, "converged", `"reason":"spill"`) {
		t.Fatalf("no spill written at 8 of 10 ports\nlog:\n%s", h.log)
	}
	h.wantInstalled(t, "spilling", []string{spill, rule})
	if n := h.count("spill started", "203.0.113.9:443/tcp"); n != 1 {
		t.Errorf("%d spill started lines; want 1\nlog:\n%s", n, h.log)
	}

	if err := h.tables.Restore(snat.IPv4, "*nat\n-F "+iptables.ChainName+"\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	if !h.await(t, "converged", `"reason":"drift: `) {
		t.Fatalf("a flushed chain was not repaired\nlog:\n%s", h.log)
	}
	h.wantInstalled(t, "after the repair", []string{spill, rule})

	// A restart between the thresholds keeps the spill.
	h.stop(t)
	h.flows.set(6, "192.0.2.22", "203.0.113.9:443")
	starts := h.count("spill started")
	h.start(t)
	if !h.await(t, "watch started") {
		t.Fatal("no second start")
	}
	h.awaitHealth(t)
	h.wantInstalled(t, "restarted at 6 of 10", []string{spill, rule})
	if h.count("spill started") != starts+1 || h.count("spill ended") != 0 {
		t.Errorf("restart: want one more spill started and none ended\nlog:\n%s", h.log)
	}

	h.flows.set(4, "192.0.2.22", "203.0.113.9:443")
	if !h.await(t, "spill ended", "203.0.113.9:443/tcp") {
		t.Fatalf("no spill ended at 4 of 10\nlog:\n%s", h.log)
	}
	for range 500 {
		st, err := h.mgr.Read()
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Entries()) == 1 {
			break
		}
		h.await(t, "never") // a bounded pause
	}
	h.wantInstalled(t, "cooled", []string{rule})
	if strings.Count(h.log.String(), `"msg":"spill started"`) != starts+1 {
		t.Errorf("the spill flapped\nlog:\n%s", h.log)
	}
}
