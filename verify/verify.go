package verify

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/snat"
)

// Promise is what the rules say a flow leaves with.
type Promise struct {
	Proto uint8
	Dst   netip.AddrPort
	// Sources are the addresses the flow may leave with: the rule's (any
	// of them for a spread rule), or the natural source when no rule
	// applies.
	Sources []netip.Addr
	// Pool, when valid, promises any address of it (a pool's rule).
	Pool netip.Prefix
	// By says where the promise comes from, for people.
	By string
}

// keeps reports whether leaving with a keeps the promise.
func (p Promise) keeps(a netip.Addr) bool {
	return slices.Contains(p.Sources, a) || snat.InPool(p.Pool, a)
}

// Result is one verified flow.
type Result struct {
	Proto    string       `json:"proto"`
	Dst      string       `json:"dst"`
	Promised []netip.Addr `json:"promised"`
	// PromisedPool is a pool's rule's prefix: any address of it agrees.
	PromisedPool string `json:"promised_pool,omitempty"`
	By           string `json:"by"`
	// Sent is the flow's source before NAT, Got what it left with.
	Sent  netip.AddrPort `json:"sent_from"`
	Got   netip.Addr     `json:"left_with"`
	Agree bool           `json:"agree"`
	// Untracked says conntrack tracks nothing in the namespace, so Got is
	// the flow's own source: nothing translated it.
	Untracked bool `json:"untracked,omitempty"`
	// Cause is the likely reason when they differ.
	Cause string `json:"cause,omitempty"`
}

// Explainer names the likely reason a flow to dst left with got.
type Explainer func(dst netip.Addr, got netip.Addr) string

// lookupWait bounds how long the conntrack entry may take to appear. It is
// confirmed when the first packet passes POSTROUTING, normally before the
// send returns; the wait covers queued packets.
const lookupWait = time.Second

// Check starts the promised flow with s, reads its conntrack entry from t
// and compares. An error means the check could not be made, not that it
// failed.
func Check(s Starter, t conntrack.Table, p Promise, why Explainer) (Result, error) {
	r := Result{Proto: conntrack.ProtoName(p.Proto), Dst: p.Dst.String(), Promised: p.Sources, By: p.By}
	if p.Pool.IsValid() {
		r.PromisedPool = p.Pool.String()
	}
	orig, done, err := s.Start(p.Proto, p.Dst)
	if err != nil {
		return r, err
	}
	defer done()
	r.Sent = orig.Src
	// The flow is ours and ends here: its entry must not stay behind for
	// half a minute, where it would look like traffic to keep.
	if d, ok := t.(interface{ Delete(conntrack.Tuple) error }); ok {
		defer d.Delete(orig)
	}
	deadline := time.Now().Add(lookupWait)
	var flow conntrack.Flow
	none := false // conntrack tracks nothing at all
	for {
		flow, err = conntrack.Find(t, orig)
		if err == nil || !errors.Is(err, conntrack.ErrNotFound) || time.Now().After(deadline) {
			break
		}
		// An entry is confirmed as the first packet leaves, before the
		// send returns: an empty table now means nothing is tracked.
		if none = untracked(t, orig); none {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if errors.Is(err, conntrack.ErrNotFound) && (none || p.Proto == conntrack.UDP) {
		// Conntrack does not track the flow: it is not registered in
		// the namespace (nothing uses it: no NAT, no stateful rule) or
		// a notrack rule exempts it. Nothing can have translated it
		// then, so it left with its socket's own source, as a rule
		// carried by a route promises. (A dropped datagram fails its
		// send instead; a TCP entry may be gone for a reset, below.)
		r.Got, r.Untracked = orig.Src.Addr(), true
		r.Agree = p.keeps(r.Got)
		if !r.Agree && why != nil {
			r.Cause = why(p.Dst.Addr(), r.Got)
		}
		return r, nil
	}
	if err != nil {
		if errors.Is(err, conntrack.ErrNotFound) && p.Proto == conntrack.TCP {
			return r, fmt.Errorf("the flow %s left no conntrack entry: if nothing listens on port %d, the far side's reset deletes the entry at once (conntrack drops a connection whose only reply is a reset); use UDP, the default, or a listening port", orig, p.Dst.Port())
		}
		if errors.Is(err, conntrack.ErrNotFound) {
			return r, fmt.Errorf("the flow %s left no conntrack entry within %s: it was dropped before POSTROUTING (a filter rule?) or conntrack does not track it (a notrack rule?)", orig, lookupWait)
		}
		return r, err
	}
	r.Got = flow.TranslatedSource().Addr()
	r.Agree = p.keeps(r.Got)
	if !r.Agree && why != nil {
		r.Cause = why(p.Dst.Addr(), r.Got)
	}
	return r, nil
}

// untracked reports whether the table holds no entry at all of orig's
// family: conntrack is not hooked in this namespace, and no flow is
// tracked or translated.
func untracked(t conntrack.Table, orig conntrack.Tuple) bool {
	fam := 4
	if orig.Dst.Addr().Is6() {
		fam = 6
	}
	flows, err := t.Flows(fam)
	return err == nil && len(flows) == 0
}

// String is the result as one line.
func (r Result) String() string {
	want := addrList(r.Promised)
	if r.Agree {
		return fmt.Sprintf("ok      %s %s left with %s, as promised (%s)", r.Proto, r.Dst, r.Got, r.By)
	}
	s := fmt.Sprintf("DIFFER  %s %s left with %s, but %s promises %s", r.Proto, r.Dst, r.Got, r.By, want)
	if r.Cause != "" {
		s += "\n        likely cause: " + r.Cause
	}
	return s
}

func addrList(as []netip.Addr) string {
	s := ""
	for i, a := range as {
		if i > 0 {
			s += " or "
		}
		s += a.String()
	}
	return s
}
