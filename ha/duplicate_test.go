package ha_test

import (
	"net/netip"
	"os/exec"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/ha"
	"github.com/egress-snat/egress-snat/internal/lab"
)

// TestOtherHolders: an ARP probe for an address finds the other link that
// holds it too (a split brain's second master) and nothing while only the
// prober's link does.
func TestOtherHolders(t *testing.T) {
	ns := lab.NewScratch(t, "ha0")
	// pha0 answers only for its own addresses, as a second host would.
	if out, err := exec.Command("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.pha0.arp_ignore=1").CombinedOutput(); err != nil {
		t.Fatalf("sysctl: %v: %s", err, out)
	}
	lab.ScratchAddr(t, ns, "192.0.2.100/24", "ha0")
	probe := func() int {
		t.Helper()
		var n int
		err := lab.Do(ns, func() error {
			others, err := ha.OtherHolders("ha0", netip.MustParseAddr("192.0.2.100"), 300*time.Millisecond)
			n = len(others)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := probe(); n != 0 {
		t.Errorf("alone: %d other holders, want none", n)
	}
	lab.ScratchAddr(t, ns, "192.0.2.100/24", "pha0")
	if n := probe(); n != 1 {
		t.Errorf("held twice: %d other holders, want 1", n)
	}
}
