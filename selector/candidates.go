package selector

import (
	"encoding/binary"
	"net/netip"
)

// maxCandidates bounds the lookups spent finding a representative address of
// a prefix. Prefixes carved up by many more specific routes are rare; when
// none of the candidates takes a covering route, Lookup says so.
const maxCandidates = 64

// candidates returns host addresses inside p to look up in turn, the host
// itself for a host prefix. They are spread over the prefix by a fixed
// sequence (deterministic, so explain is repeatable) and avoid addresses the
// kernel treats specially: 0.0.0.0/8 (looked up as a local address),
// loopback, multicast, limited broadcast and IPv6 link-local.
func candidates(p netip.Prefix) []netip.Addr {
	if p.IsSingleIP() {
		return []netip.Addr{p.Addr()}
	}
	base := p.Addr().As16()
	hostBits := p.Addr().BitLen() - p.Bits()
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	x := uint64(0x9E3779B97F4A7C15)
	for i := 0; len(out) < maxCandidates && i < 4*maxCandidates; i++ {
		var offset [16]byte
		switch i {
		case 0: // the first host after the network address
			offset[15] = 1
		default:
			// xorshift: cheap, fixed, well spread over the host bits.
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			binary.BigEndian.PutUint64(offset[8:], x)
			binary.BigEndian.PutUint64(offset[:8], x*0xBF58476D1CE4E5B9)
		}
		a := netip.AddrFrom16(or(base, mask(offset, hostBits)))
		if p.Addr().Is4() {
			a = a.Unmap()
		}
		if !p.Contains(a) || special(a) || seen[a] {
			continue
		}
		seen[a] = true
		out = append(out, a)
	}
	return out
}

func special(a netip.Addr) bool {
	if a.Is4() {
		b := a.As4()
		return b[0] == 0 || a.IsLoopback() || a.IsMulticast() || b == [4]byte{255, 255, 255, 255} || b[0] >= 240
	}
	return a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsUnspecified() || a.Is4In6()
}

// mask keeps the low n bits of b.
func mask(b [16]byte, n int) [16]byte {
	for i := 15; i >= 0; i-- {
		switch {
		case n >= 8:
			n -= 8
		case n > 0:
			b[i] &= byte(1<<n - 1)
			n = 0
		default:
			b[i] = 0
		}
	}
	return b
}

func or(a, b [16]byte) [16]byte {
	for i := range a {
		a[i] |= b[i]
	}
	return a
}
