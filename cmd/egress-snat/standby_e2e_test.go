package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// TestStandbyRule: one file for both gateways of a pair. On the host that
// lacks the rule's address (the peer holds it) apply succeeds and says the
// rule stands by, check exits 0 and says so, list shows it, and a client's
// new connection is dropped, not sent from its own address; when the
// address arrives apply activates the rule, and the client leaves with it;
// when it leaves the rule stands by again; clear leaves the ruleset as it
// was. Without standby: the same file is refused, as always.
func TestStandbyRule(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	c := l.AddClient(t, lab.ClientOptions{})
	before := l.Ruleset(t)
	rule := fmt.Sprintf("rules:\n  - to: 192.0.2.100\n    from: [%s]\n", c.Subnet4)
	file := writeFile(t, rule+"    standby: true\n")

	r := es(t, l, "apply", "-f", writeFile(t, rule))
	if r.code != exitUsage || !strings.Contains(r.stderr, "192.0.2.100") {
		t.Errorf("apply without standby: exit %d, stderr %q; want %d naming 192.0.2.100", r.code, r.stderr, exitUsage)
	}

	out := mustES(t, l, "apply", "-f", file)
	if !strings.Contains(out, "standing by: 192.0.2.100 (1 rule) is on the peer") {
		t.Errorf("apply: %q, want it to say the rule stands by", out)
	}
	wantStandby(t, l, file, `[{"address":"192.0.2.100","rules":1,"here":false}]`)
	if out := mustES(t, l, "list"); !strings.Contains(out, "no, standing by") {
		t.Errorf("list: %q, want the rule standing by", out)
	}
	wantHeld(t, l, c, "standing by")
	if out := mustES(t, l, "apply", "-f", file); !strings.Contains(out, "nothing to change") {
		t.Errorf("apply again: %q, want nothing to change", out)
	}

	// The address arrives: apply (the one-shot run) activates at once.
	l.HostAddrAdd(t, "192.0.2.100/24", "eth0")
	mustES(t, l, "apply", "-f", file)
	wantStandby(t, l, file, `[]`)
	if got := c.SourceSeen(t, "198.51.100.4"); got != "192.0.2.100" {
		t.Errorf("active: the client left with %q, want 192.0.2.100", got)
	}

	// It leaves: standing by again.
	l.HostAddrDel(t, "192.0.2.100/24", "eth0")
	mustES(t, l, "apply", "-f", file)
	wantStandby(t, l, file, `[{"address":"192.0.2.100","rules":1,"here":false}]`)
	wantHeld(t, l, c, "standing by again")

	mustES(t, l, "clear")
	// iptables-legacy cannot unload the nat and filter tables it loaded:
	// they stay, empty.
	if diff := cmp.Diff(withoutEmptyTables(before), withoutEmptyTables(l.Ruleset(t))); diff != "" {
		t.Errorf("clear left the ruleset changed (-before +after):\n%s", diff)
	}
}

// wantHeld wants a client's new connection to get nowhere: no packet of
// it reaches G, from any source (not the client's own: that would be a
// leak).
func wantHeld(t *testing.T, l *lab.Lab, c *lab.Client, when string) {
	t.Helper()
	arrived := l.Arrivals(t, "tcp port 7000", func() {
		if got := c.SourceSeen(t, "198.51.100.4"); got != "" {
			t.Errorf("%s: the client's new connection got through from %q", when, got)
		}
	})
	for dev, n := range arrived {
		if n > 0 {
			t.Errorf("%s: %d packets of the client's new connection reached G on %s, want none", when, n, dev)
		}
	}
}

// wantStandby runs check -f file --json and wants it in sync, exit 0,
// with standby as given.
func wantStandby(t *testing.T, l *lab.Lab, file, standby string) {
	t.Helper()
	r := es(t, l, "check", "-f", file, "--json")
	var got struct {
		InSync  bool            `json:"in_sync"`
		Standby json.RawMessage `json:"standby"`
	}
	var compact bytes.Buffer
	err := json.Unmarshal([]byte(r.stdout), &got)
	if err == nil {
		err = json.Compact(&compact, got.Standby)
	}
	if err != nil || r.code != 0 || !got.InSync || compact.String() != standby {
		t.Errorf("check --json: exit %d, %s (%v); want in sync, exit 0, standby %s\nstderr: %s", r.code, r.stdout, err, standby, r.stderr)
	}
}

// withoutEmptyTables drops from an iptables-save text the tables that hold
// no rule and only built-in chains that accept.
func withoutEmptyTables(ruleset string) string {
	var out strings.Builder
	for _, block := range strings.SplitAfter(ruleset, "COMMIT\n") {
		empty := strings.HasPrefix(block, "*")
		for _, line := range strings.Split(strings.TrimSpace(block), "\n")[1:] {
			if line != "COMMIT" && !(strings.HasPrefix(line, ":") && strings.HasSuffix(line, " ACCEPT [0:0]")) {
				empty = false
			}
		}
		if !empty {
			out.WriteString(block)
		}
	}
	return out.String()
}
