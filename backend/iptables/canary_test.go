package iptables

import (
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/snat"
)

// TestQuickDrift: through the fake kernel, the canary finds nothing after
// a write, then each thing a foreign hand can undo: the mangle chains of
// a marked sender (read from the same save as the nat table), the jump,
// and the chain.
func TestQuickDrift(t *testing.T) {
	m, ft, _ := newFakeManager()
	marked := senderEntry(snat.UID(4242), "198.51.100.0/24", "192.0.2.250", "192.0.2.22")
	marked.Marked, marked.Replies = true, true
	want := []snat.Entry{marked, entry("203.0.113.4", "192.0.2.250", "192.0.2.23")}
	p := update(t, m, func(*snat.State) []snat.Entry { return want })
	if !anyMarked(snat.IPv4, p.Desired) {
		t.Fatalf("the plan marks nothing: %+v", p.Desired)
	}
	if d, err := m.QuickDrift(p); err != nil || d != "" {
		t.Fatalf("right after the write: %q, %v; want no drift", d, err)
	}
	snapshot := func() map[snat.Family]string {
		out := map[snat.Family]string{}
		for _, f := range snat.Families {
			out[f], _ = ft.Save(f)
		}
		return out
	}
	before := snapshot()
	for _, c := range []struct{ undo, want string }{
		{"*mangle\n-F " + MarkChainOut + "\nCOMMIT\n", "the ipv4 mangle chains differ"},
		{"*nat\n-D POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT\nCOMMIT\n", "the ipv4 chain or its jump differs"},
		{"*nat\n-F EGRESS-SNAT\nCOMMIT\n", "the ipv4 chain or its jump differs"},
	} {
		if err := ft.Restore(snat.IPv4, c.undo); err != nil {
			t.Fatal(err)
		}
		if d, err := m.QuickDrift(p); err != nil || !strings.Contains(d, c.want) {
			t.Errorf("after %q: %q, %v; want %q", c.undo, d, err, c.want)
		}
		update(t, m, func(*snat.State) []snat.Entry { return want })
		if got := snapshot(); got[snat.IPv4] != before[snat.IPv4] {
			t.Fatalf("the write did not repair %q:\n%s\nwant\n%s", c.undo, got[snat.IPv4], before[snat.IPv4])
		}
	}
}
