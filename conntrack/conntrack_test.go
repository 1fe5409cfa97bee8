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
