package main

import (
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/verify"
)

var verifyEveryFlag = &cli.DurationFlag{Name: "verify-every", Usage: "every `DURATION`, also start a real flow per rule (as verify does) and log a mismatch as an error; 0 never"}

// verifyTicker ticks every verifyEvery; a nil channel (never ready) when
// it is off.
func (w *watcher) verifyTicker() (<-chan time.Time, func()) {
	if w.verifyEvery <= 0 {
		return nil, func() {}
	}
	t := time.NewTicker(w.verifyEvery)
	return t.C, t.Stop
}

// verifyCanary checks what the rules' traffic really leaves with. The
// other canary sees our chain; this one sees the wire's truth, which a
// foreign nat chain ahead of ours changes without touching our chain.
func (w *watcher) verifyCanary() {
	st, err := w.e.mgr.Read()
	if err != nil {
		w.log.Warn("verify: reading the rules failed", "err", err)
		return
	}
	w.e.sel.Forget()
	host := verifyHost(w.e)
	probes, skipped, err := verify.RuleProbes(host, st.Entries(), w.probes)
	if err != nil {
		w.log.Warn("verify: picking destinations failed", "err", err)
		return
	}
	v := verify.Verifier{Host: host, State: st, Proto: conntrack.UDP, Port: verify.DefaultPort}
	bad := 0
	if len(skipped) > 0 && !w.verifySkipSaid {
		// Said once: the rules and --probe decide it, not time.
		w.verifySkipSaid = true
		w.log.Warn("verify: rules not verified: no documentation address inside them takes their route; name one with --probe", "rules", len(skipped), "first", skipped[0])
	}
	for _, p := range probes {
		r, err := v.Check(p)
		switch {
		case err != nil:
			w.log.Warn("verify: could not check a flow", "sender", verify.SenderName(p.Packet), "dst", p.Packet.Dst, "err", err)
		case !r.Agree:
			bad++
			w.log.Error("verify: a flow left with another source than the rules promise",
				"dst", r.Dst, "promised", r.Promised, "by", r.By, "left_with", r.Got, "cause", r.Cause)
		}
	}
	w.log.Debug("verify: flows checked", "flows", len(probes), "mismatches", bad)
}
