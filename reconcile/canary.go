package reconcile

import (
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/verify"
)

// canary is the periodic check: does the kernel still hold what the last
// reconcile wrote? It catches what netlink does not report: iptables and
// ipset changes by other programs. Most ticks cost two netlink requests:
//
//   - every tick, the backend's generations and our ip rules;
//   - when they moved, and at least every quickEvery, the quick drift check
//     (the chains, the jump, the sets' entry counts), or, while the last
//     plan keeps something for live connections, a reconcile that looks
//     whether they have ended;
//   - every fullEvery, a full read, set members included.
//
// It returns the reason to reconcile, or "".
func (d *Daemon) canary() string {
	now := time.Now()
	if now.Sub(d.lastFull) >= d.fullEvery {
		d.lastFull, d.lastQuick = now, now
		return d.fullCheck()
	}
	gens, err := d.m.Generations()
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	rulesMoved, err := d.rulesDiffer()
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	if !rulesMoved && maps.Equal(gens, d.gens) && now.Sub(d.lastQuick) < d.quickEvery {
		return ""
	}
	if len(d.plan.Lingering()) > 0 {
		// What is kept for live connections goes once they end: look
		// whether they have, on the quick tier's schedule.
		d.lastQuick = now
		return "lingering: " + strings.Join(d.plan.Lingering(), "; ")
	}
	d.gens, d.lastQuick = gens, now
	drift, err := d.m.QuickDrift(d.plan)
	switch {
	case err != nil:
		return "canary read failed: " + err.Error()
	case drift != "":
		return "drift: " + drift
	}
	return ""
}

// rulesDiffer compares our ip rules with what the last reconcile wrote.
func (d *Daemon) rulesDiffer() (bool, error) {
	if d.m.Routing == nil {
		return false, nil
	}
	for _, f := range snat.Families {
		have, err := d.m.Routing.Rules(f == snat.IPv4)
		if err != nil {
			return false, err
		}
		if !slices.Equal(have, d.wantRules[f]) {
			return true, nil
		}
	}
	return false, nil
}

// fullCheck reads everything, set members included, and plans.
func (d *Daemon) fullCheck() string {
	st, err := d.m.Read()
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	p, err := d.m.Plan(st, d.plan.Desired)
	if err != nil {
		return "canary read failed: " + err.Error()
	}
	if !p.Empty() {
		for _, f := range d.m.Diagnose(st, d.plan.Desired) {
			return "drift: " + f.Kind + ": " + f.Detail
		}
		return "drift"
	}
	return ""
}

// verifyTicker ticks every verifyEvery; a nil channel (never ready) when
// it is off.
func (d *Daemon) verifyTicker() (<-chan time.Time, func()) {
	if d.verifyEvery <= 0 {
		return nil, func() {}
	}
	t := time.NewTicker(d.verifyEvery)
	return t.C, t.Stop
}

// verifyCanary checks what the rules' traffic really leaves with. The
// other canary sees our chain; this one sees the wire's truth, which a
// foreign nat chain ahead of ours changes without touching our chain.
func (d *Daemon) verifyCanary() {
	st, err := d.m.Read()
	if err != nil {
		d.log.Warn("verify: reading the rules failed", "err", err)
		return
	}
	d.router.Forget()
	probes, skipped, err := verify.RuleProbes(d.verify, st.Entries(), d.probes)
	if err != nil {
		d.log.Warn("verify: picking destinations failed", "err", err)
		return
	}
	v := verify.Verifier{Host: d.verify, State: st, Proto: conntrack.UDP, Port: verify.DefaultPort}
	bad := 0
	if len(skipped) > 0 && !d.verifySkipSaid {
		// Said once: the rules and --probe decide it, not time.
		d.verifySkipSaid = true
		d.log.Warn("verify: rules not verified: no documentation address inside them takes their route; name one with --probe", "rules", len(skipped), "first", skipped[0])
	}
	for _, p := range probes {
		r, err := v.Check(p)
		switch {
		case err != nil:
			d.log.Warn("verify: could not check a flow", "sender", verify.SenderName(p.Packet), "dst", p.Packet.Dst, "err", err)
		case !r.Agree:
			bad++
			d.log.Error("verify: a flow left with another source than the rules promise",
				"dst", r.Dst, "promised", r.Promised, "by", r.By, "left_with", r.Got, "cause", r.Cause)
		}
	}
	d.log.Debug("verify: flows checked", "flows", len(probes), "mismatches", bad)
}
