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

// Intent is what the operator asks for: new connections of Sender to Dst
// (leaving by Out, or as routed when Out is empty) get source To. With
// Spread they are spread over all of To in turn; without it, To is an
// ordered failover list and the first address present on the host is used.
type Intent struct {
	Sender Sender
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

// Dedup drops repeated intents for the same match and refuses one match
// given two different sources: which one wins would be a guess.
func Dedup(intents []Intent) ([]Intent, error) {
	var errs []error
	out := make([]Intent, 0, len(intents))
	seen := make(map[Match]Intent, len(intents))
	for _, in := range intents {
		m := Match{Sender: in.Sender, Dst: in.Dst.Masked(), Out: in.Out}
		if prev, dup := seen[m]; dup {
			if !slices.Equal(prev.To, in.To) || prev.Spread != in.Spread {
				errs = append(errs, Invalid("%s is given twice, with sources %s and %s", describe(m), addrList(prev.To), addrList(in.To)))
			}
			continue
		}
		seen[m] = in
		out = append(out, in)
	}
	return out, errors.Join(errs...)
}

// describe names a match in messages: "destination 198.51.100.4/32", or
// "destination 198.51.100.4/32 from 10.77.0.0/24".
func describe(m Match) string {
	s := "destination " + m.Dst.String()
	if !m.Sender.IsHost() {
		s += " for " + m.Sender.String()
	}
	return s
}

// hostErr classifies an error of the host lookups: one that says the input
// cannot work here is bad input; a netlink failure is a runtime failure.
func hostErr(err error, format string, args ...any) error {
	wrapped := fmt.Errorf(format+": %w", append(args, err)...)
	if selector.IsInput(err) {
		return &InvalidError{wrapped}
	}
	return wrapped
}

func resolveOne(r Router, in Intent, lenient bool) (Entry, error) {
	dst := in.Dst.Masked()
	if !dst.IsValid() {
		return Entry{}, Invalid("destination %q is not a valid address or prefix", in.Dst)
	}
	if len(in.To) == 0 {
		return Entry{}, Invalid("%s: no source address given", describe(Match{Sender: in.Sender, Dst: dst}))
	}
	for _, to := range in.To {
		if to.Is4() != dst.Addr().Is4() {
			return Entry{}, Invalid("source %s and destination %s are of different address families", to, dst)
		}
	}
	if s := in.Sender; s.kind() == SenderFrom {
		switch {
		case !s.From.IsValid():
			return Entry{}, Invalid("--from: not a valid prefix")
		case s.From.Addr().Is4() != dst.Addr().Is4():
			return Entry{}, Invalid("--from %s and destination %s are of different address families", s.From, dst)
		case s.From.Masked() != s.From:
			return Entry{}, Invalid("--from %s has host bits set; did you mean %s?", s.From, s.From.Masked())
		}
	}
	iface, natural, err := r.Natural(dst, in.Out)
	if err != nil {
		return Entry{}, hostErr(err, "destination %s", dst)
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
			return Entry{}, hostErr(err, "source %s", a)
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
	e := Entry{Match: Match{Sender: in.Sender, Dst: dst, Out: iface}, To: to}
	if in.Sender.Local() {
		e.Natural = natural
	}
	return e, nil
}

func addrList(as []netip.Addr) string {
	return Entry{To: as}.ToString()
}
