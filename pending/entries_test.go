package pending

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/egress-snat/egress-snat/snat"
)

func TestPendingEntriesRoundTrip(t *testing.T) {
	a := netip.MustParseAddr
	p := netip.MustParsePrefix
	entries := []snat.Entry{
		{Match: snat.Match{Sender: snat.Host(), Dst: p("198.51.100.4/32"), Out: "eth0"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.22")}},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("198.51.100.5/32"), Out: "eth0"}, Natural: a("192.0.2.250")},
		{Match: snat.Match{Sender: snat.From(p("10.77.0.0/24")), Dst: p("0.0.0.0/0"), Out: "eth0"}, To: []netip.Addr{a("192.0.2.22"), a("192.0.2.23")}},
		{Match: snat.Match{Sender: snat.UID(0), Dst: p("203.0.113.7/32"), Out: "eth0"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.23")}},
		{Match: snat.Match{Sender: snat.Cgroup("system.slice/postfix.service"), Dst: p("2001:db8:ffff::/48"), Out: "eth0"}, Natural: a("2001:db8::250"), To: []netip.Addr{a("2001:db8::22")}},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("198.51.100.0/24"), Out: "eth1"}, Natural: a("203.0.113.130"), To: []netip.Addr{a("203.0.113.130")}, Routed: true, Via: a("203.0.113.129"), Replies: true},
		{Match: snat.Match{Sender: snat.From(p("10.50.0.0/24")), Dst: p("0.0.0.0/0"), Out: "eth0"}, To: []netip.Addr{a("192.0.2.100")}, Hold: true, Standby: true},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("2001:db8:ffff::/48"), Out: "eth0"}, Natural: a("2001:db8::250"), Pool: p("2001:db8:1::/64"), Sticky: snat.StickyConnection},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("203.0.113.0/24"), Out: "eth0"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.22")}, Ports: snat.Ports{Lo: 40000, Hi: 40099}},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("203.0.113.0/24"), Out: "eth1"}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.22")}, Spill: []netip.Addr{a("192.0.2.22"), a("192.0.2.23")}},
		{Match: snat.Match{Sender: snat.Host(), Dst: p("203.0.113.9/32"), Out: "eth0", Proto: "tcp", DPort: 443}, Natural: a("192.0.2.250"), To: []netip.Addr{a("192.0.2.23")}, Ports: snat.Ports{Lo: 40000, Hi: 40099}},
	}
	b, err := encodeEntries(entries)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeEntries(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, entries) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, entries)
	}
	// The record must keep every field, or a revert is not exact.
	if n := reflect.TypeFor[snat.Entry]().NumField(); n != 13 {
		t.Errorf("snat.Entry has %d fields: update savedEntry in pending/entries.go to keep them all", n)
	}
	if n := reflect.TypeFor[snat.Match]().NumField(); n != 5 {
		t.Errorf("snat.Match has %d fields: update savedEntry in pending/entries.go to keep them all", n)
	}
	if n := reflect.TypeFor[snat.Sender]().NumField(); n != 4 {
		t.Errorf("snat.Sender has %d fields: update savedEntry in pending/entries.go to keep them all", n)
	}
}
