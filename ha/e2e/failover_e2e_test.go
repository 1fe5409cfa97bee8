// Package e2e runs an egress gateway pair for real: keepalived and
// conntrackd with the configuration package ha generates, and
// `egress-snat watch` on both gateways, in the namespaces of
// internal/lab's HA lab. It kills, drains and splits the pair under load
// and judges each move by what the far side saw.
package e2e

import (
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// scenario is one way of moving the egress role.
type scenario struct {
	name string
	// from and to pick the gateways: the move goes from from to to.
	from, to func(h *lab.HA) *lab.Gateway
	// act causes the move and returns when it did.
	act func(t *testing.T, h *lab.HA) time.Time
	// settled waits until to holds the role.
	settled func(t *testing.T, h *lab.HA)
}

func gwA(h *lab.HA) *lab.Gateway { return h.A }
func gwB(h *lab.HA) *lab.Gateway { return h.B }

// The scenarios of issue 22, in the order a round runs them: each starts
// where the one before left the pair.
var (
	kill = scenario{"kill", gwA, gwB,
		func(t *testing.T, h *lab.HA) time.Time { return h.A.Kill(t) },
		func(t *testing.T, h *lab.HA) { h.WaitMaster(t, h.B, 10*time.Second) }}
	failback = scenario{"failback", gwB, gwA,
		func(t *testing.T, h *lab.HA) time.Time { return h.A.Revive(t) },
		func(t *testing.T, h *lab.HA) { h.WaitRoles(t, h.A, 20*time.Second) }}
	drain = scenario{"drain", gwA, gwB,
		func(t *testing.T, h *lab.HA) time.Time { return h.A.Drain(t) },
		func(t *testing.T, h *lab.HA) { h.WaitRoles(t, h.B, 10*time.Second) }}
	undrain = scenario{"undrain", gwB, gwA,
		func(t *testing.T, h *lab.HA) time.Time { return h.A.Undrain(t) },
		func(t *testing.T, h *lab.HA) { h.WaitRoles(t, h.A, 20*time.Second) }}
	// stop and start are the other graceful way out and back: keepalived
	// stopped cleanly (adverts of priority 0), then started again.
	stop = scenario{"stop", gwA, gwB,
		func(t *testing.T, h *lab.HA) time.Time { return h.A.StopKeepalived(t) },
		func(t *testing.T, h *lab.HA) { h.WaitRoles(t, h.B, 10*time.Second) }}
	start = scenario{"start", gwB, gwA,
		func(t *testing.T, h *lab.HA) time.Time { at := time.Now(); h.A.StartKeepalived(t); return at },
		func(t *testing.T, h *lab.HA) { h.WaitRoles(t, h.A, 20*time.Second) }}
	split = scenario{"split-brain", gwA, gwB,
		func(t *testing.T, h *lab.HA) time.Time { return h.SplitBrain(t) },
		func(t *testing.T, h *lab.HA) { h.WaitMaster(t, h.B, 10*time.Second) }}
	heal = scenario{"heal", gwB, gwA,
		func(t *testing.T, h *lab.HA) time.Time { return h.Heal(t) },
		func(t *testing.T, h *lab.HA) { h.WaitRoles(t, h.A, 20*time.Second) }}
)

// move runs one scenario under load: the load starts and flows through
// from, the scenario acts, and the move is measured once every connection
// flows again (or 15s later) plus a second.
func move(t *testing.T, h *lab.HA, sc scenario) lab.Move {
	t.Helper()
	from, to := sc.from(h), sc.to(h)
	h.Sniffer.Reset()
	ctFrom, ctTo := from.WatchConntrack(t), to.WatchConntrack(t)
	load := h.StartLoad(t, lab.LoadOptions{})
	if load.WaitFlowing(time.Now(), 10*time.Second).IsZero() {
		t.Fatalf("%s: the load does not flow before the move: %+v", sc.name, load.Stats())
	}
	time.Sleep(time.Second)
	guard := h.GuardDrops(t)
	event := sc.act(t, h)
	sc.settled(t, h)
	recovered := load.WaitFlowing(time.Now(), 15*time.Second)
	time.Sleep(time.Second)
	st := load.Stop()
	ct := append(ctFrom.Stop(), ctTo.Stop()...)
	m := h.Measure(sc.name, from, to, event, recovered, h.Sniffer.Packets(), st, ct)
	if guard != nil {
		m.GuardDrops = h.GuardDrops(t)
		for g, n := range guard {
			m.GuardDrops[g] -= n
		}
	}
	return m
}

// TestHAFailover moves the egress role under load through one round of
// issue 22's moves: the master killed (keepalived kill -9, links down),
// failback (preemption by the revived node), a graceful drain and its
// undrain, a split brain (VRRP cut, both master) and its heal. In every
// move no packet leaves either gateway from any source but the egress
// address; in every move but the heal every established connection
// survives. After a heal the connections made during the split on the
// other master may be lost (both masters translated into one address's
// ports independently: see the README's "Two gateways"); their count is
// logged, not judged, and so are the packets of such a connection that
// reach the healed master before conntrackd brought its entry over
// (Move.Orphans: the kernel translates no packet it cannot track, so they
// leave with the client's source; a gateway's forward filter that drops
// invalid packets stops them). Figures (blackouts) are logged, not judged: the
// harness in rounds_e2e_test.go measures them.
func TestHAFailover(t *testing.T) {
	h := lab.NewHA(t, lab.HAOptions{})
	for _, sc := range []scenario{kill, failback, drain, undrain, split, heal} {
		m := move(t, h, sc)
		t.Log(m.Summary())
		if m.Kept != m.Conns && sc.name != heal.name {
			t.Errorf("%s: %d of %d established connections survived:\n%s", sc.name, m.Kept, m.Conns, m.Details())
		}
		if m.CaptureDrops != 0 {
			t.Errorf("%s: the far side's capture dropped %d packets: the leak count is incomplete", sc.name, m.CaptureDrops)
		}
		leaks := len(m.Leaks)
		if sc.name == heal.name && len(m.Orphans) > 0 {
			t.Logf("%s: %d packets of connections the other master opened during the split left untranslated (not judged):\n%s", sc.name, len(m.Orphans), m.Details())
			leaks -= len(m.Orphans)
		}
		if leaks != 0 {
			t.Errorf("%s: %d packets left a gateway with a source other than %s:\n%s", sc.name, leaks, lab.HAEgressVIP.Addr(), m.Details())
		}
	}
}
