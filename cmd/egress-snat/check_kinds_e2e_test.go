package main

import (
	"slices"
	"testing"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// TestCheckKinds makes the host drift in each way check names and that no
// other test provokes, and asserts the kind with check alone (the host
// against its own rules) and with check -f (against a file saying what was
// set). Each case starts from one rule, 198.51.100.4 from 192.0.2.22, in a
// lab of its own.
func TestCheckKinds(t *testing.T) {
	iptablesOnly(t, "its drift kinds are iptables' (jump, chain, set)")
	t.Parallel()
	file := "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n"
	for _, tc := range []struct {
		name, kind string
		drift      func(t *testing.T, l *lab.Lab)
	}{
		{"a second jump", "jump-duplicated", func(t *testing.T, l *lab.Lab) {
			relRestore(t, l, 4, "-A POSTROUTING -m comment --comment egress-snat -j EGRESS-SNAT\n")
		}},
		{"a foreign rule in our chain", "chain-altered", func(t *testing.T, l *lab.Lab) {
			relRestore(t, l, 4, "-I EGRESS-SNAT 1 -d 198.51.100.9/32 -j RETURN\n")
		}},
		{"a route gives another natural source", "natural-source-changed", func(t *testing.T, l *lab.Lab) {
			l.Run(t, "ip", "route", "add", "198.51.100.4/32", "via", "192.0.2.1", "dev", "eth0", "src", "192.0.2.23")
		}},
		{"a route makes the rule's source the natural one", "redundant", func(t *testing.T, l *lab.Lab) {
			l.Run(t, "ip", "route", "add", "198.51.100.4/32", "via", "192.0.2.1", "dev", "eth0", "src", "192.0.2.22")
		}},
		{"the destination becomes unreachable", "no-route", func(t *testing.T, l *lab.Lab) {
			l.Run(t, "ip", "route", "add", "unreachable", "198.51.100.4/32")
		}},
		{"our chain in the other backend too", "chain-in-other-backend", func(t *testing.T, l *lab.Lab) {
			other := map[string]string{"nft": "legacy", "legacy": "nft"}[backend(t)]
			l.Run(t, "iptables-"+other, "-w", "5", "-t", "nat", "-N", "EGRESS-SNAT")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t)
			path := relWrite(t, t.TempDir(), "rules.yaml", file)
			mustES(t, l, "apply", "-f", path)
			for _, f := range []string{"", path} {
				if code, kinds := relCheck(t, l, f); code != checkInSync {
					t.Fatalf("check -f %q before the drift: exit %d, kinds %v; want in sync", f, code, kinds)
				}
			}
			tc.drift(t, l)
			for _, f := range []string{"", path} {
				if code, kinds := relCheck(t, l, f); code != checkDrift || !slices.Contains(kinds, tc.kind) {
					t.Errorf("check (-f %q) after %s: exit %d, kinds %v; want exit %d naming %q", f, tc.name, code, kinds, checkDrift, tc.kind)
				}
			}
		})
	}
}
