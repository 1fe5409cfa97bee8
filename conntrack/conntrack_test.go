package conntrack

import (
	"errors"
	"net/netip"
	"testing"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestFind(t *testing.T) {
	orig := Tuple{UDP, ap("192.0.2.250:40001"), ap("198.51.100.4:7001")}
	table := Fake{
		{Orig: Tuple{UDP, ap("192.0.2.250:40002"), ap("198.51.100.4:7001")}, Reply: Tuple{UDP, ap("198.51.100.4:7001"), ap("192.0.2.22:40002")}},
		{Orig: orig, Reply: Tuple{UDP, ap("198.51.100.4:7001"), ap("192.0.2.23:40001")}},
		{Orig: Tuple{TCP, ap("192.0.2.250:40001"), ap("198.51.100.4:7001")}, Reply: Tuple{TCP, ap("198.51.100.4:7001"), ap("192.0.2.22:40001")}},
		{Orig: Tuple{UDP, ap("[2001:db8::250]:40001"), ap("[2001:db8:ffff::4]:7001")}, Reply: Tuple{UDP, ap("[2001:db8:ffff::4]:7001"), ap("[2001:db8::22]:40001")}},
	}
	f, err := Find(table, orig)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.TranslatedSource(); got != ap("192.0.2.23:40001") {
		t.Errorf("translated source %s, want 192.0.2.23:40001", got)
	}
	v6 := Tuple{UDP, ap("[2001:db8::250]:40001"), ap("[2001:db8:ffff::4]:7001")}
	if f, err := Find(table, v6); err != nil || f.TranslatedSource().Addr() != netip.MustParseAddr("2001:db8::22") {
		t.Errorf("IPv6: %v, %v", f, err)
	}
	_, err = Find(table, Tuple{UDP, ap("192.0.2.250:1"), ap("198.51.100.4:7001")})
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("missing entry: err = %v, want ErrNotFound", err)
	}
}

// TestBindingPool: a pool's binding takes the flows translated to any
// address of the pool but the one excepted, of its destinations and
// sources alone; without a pool, the one address.
func TestBindingPool(t *testing.T) {
	flow := func(src, dst, translated string) Flow {
		return Flow{Orig: Tuple{TCP, ap(src), ap(dst)}, Reply: Tuple{TCP, ap(dst), ap(translated)}}
	}
	b := Binding{Dst: netip.MustParsePrefix("2001:db8:ffff::/48"), To: netip.MustParseAddr("2001:db8:1::5"),
		Pool: netip.MustParsePrefix("2001:db8:1::/64"), Except: netip.MustParseAddr("2001:db8:1::9")}
	for _, tt := range []struct {
		f    Flow
		want bool
	}{
		{flow("[2001:db8::250]:40000", "[2001:db8:ffff::4]:80", "[2001:db8:1::5]:40000"), true},  // the last period
		{flow("[2001:db8::250]:40001", "[2001:db8:ffff::4]:80", "[2001:db8:1::77]:40001"), true}, // an earlier one
		{flow("[2001:db8::250]:40002", "[2001:db8:ffff::4]:80", "[2001:db8:1::9]:40002"), false}, // the new period's
		{flow("[2001:db8::250]:40003", "[2001:db8:ffff::4]:80", "[2001:db8:2::5]:40003"), false}, // another prefix
		{flow("[2001:db8::250]:40004", "[2001:db8:fffe::4]:80", "[2001:db8:1::5]:40004"), false}, // another destination
	} {
		if got := b.Takes(tt.f); got != tt.want {
			t.Errorf("pool binding takes %v: %v, want %v", tt.f, got, tt.want)
		}
	}
	one := Binding{Dst: b.Dst, To: b.To}
	if !one.Takes(flow("[2001:db8::250]:40000", "[2001:db8:ffff::4]:80", "[2001:db8:1::5]:40000")) ||
		one.Takes(flow("[2001:db8::250]:40001", "[2001:db8:ffff::4]:80", "[2001:db8:1::77]:40001")) {
		t.Error("an address's binding: want its own address's flows alone")
	}
}
