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
// Out, or as routed when Out is empty) get source To, spread over To in turn
// when it holds several addresses.
type Intent struct {
	Dst netip.Prefix
	To  []netip.Addr
	Out string
}

// Resolve validates intents against the host and turns them into entries,
// learning each destination's outgoing interface and natural source from
// the kernel. It changes nothing. Every problem is reported, each naming the
// value at fault, so the operator fixes a file in one pass.
func Resolve(r Router, intents []Intent) ([]Entry, error) {
	var errs []error
	var out []Entry
	seen := map[netip.Prefix]Intent{}
	for _, in := range intents {
		e, err := resolveOne(r, in)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if prev, dup := seen[e.Dst]; dup {
			if !slices.Equal(prev.To, in.To) {
				errs = append(errs, Invalid("destination %s is given twice, with sources %s and %s", e.Dst, addrList(prev.To), addrList(in.To)))
			}
			continue
		}
		seen[e.Dst] = in
		out = append(out, e)
	}
	return out, errors.Join(errs...)
}

func resolveOne(r Router, in Intent) (Entry, error) {
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
	for _, to := range in.To {
		owner, err := r.Owner(to)
		if err != nil {
			return Entry{}, Invalid("source %s: %w", to, err)
		}
		if owner != iface {
			return Entry{}, Invalid("source %s is on %s, but traffic to %s leaves by %s: the source must be an address of the outgoing interface", to, owner, dst, iface)
		}
	}
	return Entry{Dst: dst, Out: iface, Natural: natural, To: slices.Clone(in.To)}, nil
}

func addrList(as []netip.Addr) string {
	return Entry{To: as}.ToString()
}
