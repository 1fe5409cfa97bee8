package snat

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/egress-snat/egress-snat/selector"
)

// InvalidError is bad input from the operator: a value that can never work
// on this host as it is. The CLI gives it its own exit status.
type InvalidError struct{ Err error }

func (e *InvalidError) Error() string { return e.Err.Error() }
func (e *InvalidError) Unwrap() error { return e.Err }

// Invalid formats an InvalidError.
func Invalid(format string, args ...any) error {
	return &InvalidError{fmt.Errorf(format, args...)}
}

// Router is what resolving needs from the host: the kernel's route choice
// and which interface holds an address. *selector.Selector implements it.
type Router interface {
	Natural(dst netip.Prefix, out string) (iface string, natural netip.Addr, err error)
	Owner(a netip.Addr) (iface string, err error)
}

var _ Router = (*selector.Selector)(nil)

// Intent is what the operator asks for: new connections to Dst (leaving by
// Out, or as routed when Out is empty) get source To. With Spread they are
// spread over all of To in turn; without it, To is an ordered failover list
// and the first address present on the host is used.
type Intent struct {
	Dst    netip.Prefix
	To     []netip.Addr
	Out    string
	Spread bool
}

// Resolve validates intents against the host and turns them into entries,
// learning each destination's outgoing interface and natural source from
// the kernel. It changes nothing. Every problem is reported, each naming the
// value at fault, so the operator fixes a file in one pass.
func Resolve(r Router, intents []Intent) ([]Entry, error) {
	out, _, err := resolve(r, intents, false)
	return out, err
}

// ResolveAvailable is Resolve for a host that changes under a long-running
// reconciler: an intent none of whose sources is on the host any more, or
// whose destination has no route, is left out and reported in skipped
// instead of failing the whole state, so its traffic is not sent from an
// address the host lacks. Spread intents keep the sources still present.
func ResolveAvailable(r Router, intents []Intent) (entries []Entry, skipped []error, err error) {
	return resolve(r, intents, true)
}

func resolve(r Router, intents []Intent, lenient bool) ([]Entry, []error, error) {
	intents, err := Dedup(intents)
	if err != nil {
		return nil, nil, err
	}
	var errs, skipped []error
	out := make([]Entry, 0, len(intents))
	for _, in := range intents {
		e, err := resolveOne(r, in, lenient)
		if err != nil {
			if lenient && (errors.Is(err, selector.ErrNotLocal) || errors.Is(err, selector.ErrNoRoute)) {
				skipped = append(skipped, err)
				continue
			}
			errs = append(errs, err)
			continue
		}
		out = append(out, e)
	}
	return out, skipped, errors.Join(errs...)
}

// Dedup drops repeated intents for the same destination and refuses one
// destination given two different sources: which one wins would be a guess.
func Dedup(intents []Intent) ([]Intent, error) {
	var errs []error
	out := make([]Intent, 0, len(intents))
	seen := make(map[netip.Prefix]Intent, len(intents))
	for _, in := range intents {
		dst := in.Dst.Masked()
		if prev, dup := seen[dst]; dup {
			if !slices.Equal(prev.To, in.To) || prev.Spread != in.Spread {
				errs = append(errs, Invalid("destination %s is given twice, with sources %s and %s", dst, addrList(prev.To), addrList(in.To)))
			}
			continue
		}
		seen[dst] = in
		out = append(out, in)
	}
	return out, errors.Join(errs...)
}

func resolveOne(r Router, in Intent, lenient bool) (Entry, error) {
	dst := in.Dst.Masked()
	if !dst.IsValid() {
		return Entry{}, Invalid("destination %q is not a valid address or prefix", in.Dst)
	}
	if len(in.To) == 0 {
		return Entry{}, Invalid("destination %s: no source address given", dst)
	}
	for _, to := range in.To {
		if to.Is4() != dst.Addr().Is4() {
			return Entry{}, Invalid("source %s and destination %s are of different address families", to, dst)
		}
	}
	iface, natural, err := r.Natural(dst, in.Out)
	if err != nil {
		return Entry{}, Invalid("destination %s: %w", dst, err)
	}
	var to []netip.Addr
	var missing error
	for _, a := range in.To {
		owner, err := r.Owner(a)
		switch {
		case errors.Is(err, selector.ErrNotLocal):
			if missing == nil {
				missing = Invalid("source %s for %s: %w", a, dst, err)
			}
			continue
		case err != nil:
			return Entry{}, Invalid("source %s: %w", a, err)
		case owner != iface:
			return Entry{}, Invalid("source %s is on %s, but traffic to %s leaves by %s: the source must be an address of the outgoing interface", a, owner, dst, iface)
		}
		to = append(to, a)
		if !in.Spread {
			break // failover list: the first present address
		}
	}
	if len(to) == 0 || (missing != nil && in.Spread && !lenient) {
		return Entry{}, missing
	}
	return Entry{Dst: dst, Out: iface, Natural: natural, To: to}, nil
}

func addrList(as []netip.Addr) string {
	return Entry{To: as}.ToString()
}
