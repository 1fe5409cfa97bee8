package verify

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/egress-snat/egress-snat/conntrack"
)

// fakeStarter pretends to start a flow from a fixed local port and records
// it in a fake conntrack table with the source a NAT rule gave it.
type fakeStarter struct {
	table     *conntrack.Fake
	natural   netip.Addr
	leaveWith netip.Addr
	record    bool
	released  bool
}

func (f *fakeStarter) Start(proto uint8, dst netip.AddrPort) (conntrack.Tuple, func(), error) {
	orig := conntrack.Tuple{Proto: proto, Src: netip.AddrPortFrom(f.natural, 40000), Dst: dst}
	if f.record {
		*f.table = append(*f.table, conntrack.Flow{Orig: orig, Reply: conntrack.Tuple{Proto: proto, Src: dst, Dst: netip.AddrPortFrom(f.leaveWith, 40000)}})
	}
	return orig, func() { f.released = true }, nil
}

func TestCheck(t *testing.T) {
	a := netip.MustParseAddr
	dst := netip.MustParseAddrPort("198.51.100.4:33434")
	promise := Promise{Proto: conntrack.UDP, Dst: dst, Sources: []netip.Addr{a("192.0.2.22")}, By: "rule 198.51.100.4/32"}
	why := func(d, got netip.Addr) string { return "table ip thief SNATs " + d.String() + " to " + got.String() }

	var table conntrack.Fake
	s := &fakeStarter{table: &table, natural: a("192.0.2.250"), leaveWith: a("192.0.2.22"), record: true}
	r, err := Check(s, &table, promise, why)
	if err != nil || !r.Agree || r.Got != a("192.0.2.22") || !s.released {
		t.Fatalf("agreeing flow: %+v, %v (released %v)", r, err, s.released)
	}
	if !strings.HasPrefix(r.String(), "ok ") {
		t.Errorf("String = %q", r.String())
	}

	table = nil
	s = &fakeStarter{table: &table, natural: a("192.0.2.250"), leaveWith: a("192.0.2.23"), record: true}
	r, err = Check(s, &table, promise, why)
	if err != nil || r.Agree || r.Got != a("192.0.2.23") {
		t.Fatalf("differing flow: %+v, %v", r, err)
	}
	line := r.String()
	for _, want := range []string{"192.0.2.23", "192.0.2.22", "thief"} {
		if !strings.Contains(line, want) {
			t.Errorf("String %q does not name %s", line, want)
		}
	}

	spread := promise
	spread.Sources = []netip.Addr{a("192.0.2.22"), a("192.0.2.23")}
	table = nil
	if r, err := Check(s, &table, spread, why); err != nil || !r.Agree {
		t.Errorf("a spread rule's second address agrees: %+v, %v", r, err)
	}

	// A TCP flow tracked among others but gone: a reset deletes the
	// entry, so there is nothing to judge by.
	tcp := promise
	tcp.Proto = conntrack.TCP
	other := conntrack.Flow{Orig: conntrack.Tuple{Proto: conntrack.UDP, Src: netip.MustParseAddrPort("192.0.2.250:1"), Dst: dst}, Reply: conntrack.Tuple{Proto: conntrack.UDP, Src: dst, Dst: netip.MustParseAddrPort("192.0.2.250:1")}}
	table = conntrack.Fake{other}
	s = &fakeStarter{table: &table, natural: a("192.0.2.250")}
	if _, err := Check(s, &table, tcp, why); err == nil || !strings.Contains(err.Error(), "no conntrack entry") {
		t.Errorf("no entry: err = %v", err)
	}
	// A datagram that sent but left no entry among others' is not
	// tracked (conntrack unregistered, or notrack): it left as it was.
	if r, err := Check(s, &table, promise, why); err != nil || !r.Untracked || r.Got != a("192.0.2.250") || r.Agree {
		t.Errorf("untracked datagram among other entries: %+v, %v", r, err)
	}

	// Conntrack tracks nothing at all here: nothing translated the flow,
	// which left with its socket's source (a route-method rule's).
	table = nil
	s = &fakeStarter{table: &table, natural: a("192.0.2.22")}
	if r, err := Check(s, &table, promise, why); err != nil || !r.Agree || !r.Untracked || r.Got != a("192.0.2.22") {
		t.Errorf("untracked flow: %+v, %v; want it to agree with its socket's source", r, err)
	}
}
