package snat

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/selector"
)

// oneNIC is a Router for a host with one interface, eth0, which holds
// addrs and routes everything through 203.0.113.1.
type oneNIC struct{ addrs []netip.Addr }

func (r oneNIC) Natural(dst netip.Prefix, out string) (string, netip.Addr, error) {
	return "eth0", addr("203.0.113.10"), nil
}
func (r oneNIC) Path(dst netip.Prefix, out string) (string, netip.Addr, netip.Addr, error) {
	return "eth0", addr("203.0.113.1"), addr("203.0.113.10"), nil
}
func (r oneNIC) Owner(a netip.Addr) (string, error) {
	for _, h := range r.addrs {
		if h == a {
			return "eth0", nil
		}
	}
	return "", selector.ErrNotLocal
}
func (r oneNIC) Gateways(string, bool, func(int) bool) ([]netip.Addr, error) { return nil, nil }
func (r oneNIC) OnLink(string, netip.Addr) (bool, error)                     { return true, nil }
func (r oneNIC) PrefixUse(netip.Prefix, func(int) bool) (selector.PrefixUse, error) {
	return selector.PrefixUse{}, nil
}

func TestStandby(t *testing.T) {
	vip := addr("192.0.2.100")
	in := Intent{Sender: From(pfx("10.50.0.0/24")), Dst: pfx("0.0.0.0/0"), To: []netip.Addr{vip}, Standby: true}

	// On the host that lacks the address: held, not an error, not skipped.
	for _, lenient := range []bool{false, true} {
		got, skipped, err := resolve(oneNIC{}, []Intent{in}, lenient)
		if err != nil || len(skipped) > 0 || len(got) != 1 {
			t.Fatalf("lenient %v: %v, skipped %v, err %v", lenient, got, skipped, err)
		}
		if e := got[0]; !e.Hold || !e.Standby || e.Out != "eth0" || e.To[0] != vip {
			t.Errorf("lenient %v: %+v, want held SNAT to %s out of eth0", lenient, e, vip)
		}
	}
	// On the host that has it: active, and still standby (the daemon may hold it).
	got, err := Resolve(oneNIC{addrs: []netip.Addr{vip}}, []Intent{in})
	if err != nil || len(got) != 1 || got[0].Hold || !got[0].Standby {
		t.Fatalf("present: %+v, %v; want an active standby entry", got, err)
	}
	HoldWhile(got, func(a netip.Addr) bool { return a == vip })
	if !got[0].Hold || !slices.Equal(Holding(got), []netip.Addr{vip}) {
		t.Errorf("HoldWhile: %+v, want it held", got[0])
	}

	// Without standby the missing address is what it always was.
	plain := in
	plain.Standby = false
	if _, err := Resolve(oneNIC{}, []Intent{plain}); !errors.Is(err, selector.ErrNotLocal) {
		t.Errorf("no standby: %v, want ErrNotLocal", err)
	}

	// Only forwarded traffic, only by SNAT: each refusal names why.
	host := Intent{Dst: pfx("198.51.100.0/24"), To: []netip.Addr{vip}, Standby: true}
	route := in
	route.Method = MethodRoute
	for _, c := range []struct {
		in   Intent
		want string
	}{{host, "forwarded traffic"}, {route, "method snat"}} {
		_, err := Resolve(oneNIC{}, []Intent{c.in})
		var bad *InvalidError
		if !errors.As(err, &bad) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want an InvalidError about %q", c.in, err, c.want)
		}
	}

	// A held entry differs from the active one: toggling the hold is a change.
	held, active := got[0], got[0]
	active.Hold = false
	if held.Equal(active) || !strings.Contains(held.String(), "standing by") {
		t.Errorf("held %v equals active %v", held, active)
	}
	// Checking the host against its own rules keeps the standby.
	if ins := IntentsOf([]Entry{held}); len(ins) != 1 || !ins[0].Standby {
		t.Errorf("IntentsOf(held) = %+v, want standby", ins)
	}
}
