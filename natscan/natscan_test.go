package natscan

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

func host(t *testing.T, dst, natural, out string) Traffic {
	t.Helper()
	return Traffic{Dst: pfx(dst), Src: netip.PrefixFrom(addr(natural), addr(natural).BitLen()), Out: out, Label: dst}
}

// The expressions nft(8) 1.0 writes, as the kernel lists them back.
func ip4Daddr(a string) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr(a).AsSlice()},
	}
}

func snatTo(a string) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: addr(a).AsSlice()},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	}
}

func TestDecode(t *testing.T) {
	sets := func(name string) (Match, bool) {
		if name == "__set0" {
			return Match{PrefixRange(pfx("203.0.113.0/24"))}, true
		}
		return nil, false
	}
	for _, tc := range []struct {
		name   string
		family nftables.TableFamily
		exprs  []expr.Any
		want   Decoded
	}{
		{"ip daddr host snat", nftables.TableFamilyIPv4, slices.Concat(ip4Daddr("198.51.100.4"), snatTo("192.0.2.23")),
			Decoded{NATRule: NATRule{Family: 4, Dst: Match{{addr("198.51.100.4"), addr("198.51.100.4")}}, Action: "snat to 192.0.2.23"}}},
		{"byte-aligned prefix as a short payload", nftables.TableFamilyIPv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 3},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{198, 51, 100}},
			&expr.Masq{},
		}, Decoded{NATRule: NATRule{Family: 4, Dst: Match{PrefixRange(pfx("198.51.100.0/24"))}, Action: "masquerade"}}},
		{"masked prefix", nftables.TableFamilyIPv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{255, 255, 240, 0}, Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{10, 66, 0, 0}},
			&expr.Masq{},
		}, Decoded{NATRule: NATRule{Family: 4, Src: Match{PrefixRange(pfx("10.66.0.0/20"))}, Action: "masquerade"}}},
		{"negated daddr narrows nothing", nftables.TableFamilyIPv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: addr("198.51.100.4").AsSlice()},
			&expr.Masq{},
		}, Decoded{NATRule: NATRule{Family: 4, Action: "masquerade", Unsure: true}}},
		{"inet with nfproto, anonymous set, oifname", nftables.TableFamilyINet, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("eth0\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: "__set0"},
			&expr.Masq{},
		}, Decoded{NATRule: NATRule{Family: 4, Out: "eth0", Dst: Match{PrefixRange(pfx("203.0.113.0/24"))}, Action: "masquerade"}}},
		{"inet without nfproto: both families, addresses unknown", nftables.TableFamilyINet, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr("198.51.100.4").AsSlice()},
			&expr.Masq{},
		}, Decoded{NATRule: NATRule{Action: "masquerade", Unsure: true}}},
		{"wildcard oifname narrows nothing", nftables.TableFamilyIPv4, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("eth")},
			&expr.Masq{},
		}, Decoded{NATRule: NATRule{Family: 4, Action: "masquerade", Unsure: true}}},
		{"unreadable set narrows nothing", nftables.TableFamilyIPv6, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 16},
			&expr.Lookup{SourceRegister: 1, SetName: "gone"},
			&expr.Masq{},
		}, Decoded{NATRule: NATRule{Family: 6, Action: "masquerade", Unsure: true}}},
		{"range", nftables.TableFamilyIPv4, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: addr("198.51.100.1").AsSlice(), ToData: addr("198.51.100.9").AsSlice()},
			&expr.Target{Name: "MASQUERADE"},
		}, Decoded{NATRule: NATRule{Family: 4, Dst: Match{{addr("198.51.100.1"), addr("198.51.100.9")}}, Action: "MASQUERADE (iptables-nft rule)"}}},
		{"jump", nftables.TableFamilyIPv4, append(ip4Daddr("198.51.100.4"), &expr.Verdict{Kind: expr.VerdictJump, Chain: "steal"}),
			Decoded{NATRule: NATRule{Family: 4, Dst: Match{{addr("198.51.100.4"), addr("198.51.100.4")}}}, Jump: "steal"}},
		{"a mark is not evaluated", nftables.TableFamilyIPv4, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0x40, 0, 0}},
			&expr.Verdict{Kind: expr.VerdictReturn},
		}, Decoded{NATRule: NATRule{Family: 4, Unsure: true}, Ends: true}},
		{"dnat is not ours to judge", nftables.TableFamilyIPv4, []expr.Any{&expr.NAT{Type: expr.NATTypeDestNAT}},
			Decoded{NATRule: NATRule{Family: 4}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Decode(tc.family, tc.exprs, sets)
			if diff := cmp.Diff(tc.want, got, addrEq, cmpopts.IgnoreFields(Decoded{}, "Conditional")); diff != "" {
				t.Errorf("Decode (-want +got):\n%s", diff)
			}
		})
	}
}

func TestSetMatch(t *testing.T) {
	// An interval set {198.51.100.0/24, 203.0.113.7} as the kernel dumps
	// it: descending, each interval closed by an IntervalEnd element with
	// the first address after it, and a leading end at 0.0.0.0.
	els := []nftables.SetElement{
		{Key: addr("203.0.113.8").AsSlice(), IntervalEnd: true},
		{Key: addr("203.0.113.7").AsSlice()},
		{Key: addr("198.51.101.0").AsSlice(), IntervalEnd: true},
		{Key: addr("198.51.100.0").AsSlice()},
		{Key: addr("0.0.0.0").AsSlice(), IntervalEnd: true},
	}
	want := Match{PrefixRange(pfx("198.51.100.0/24")), PrefixRange(pfx("203.0.113.7/32"))}
	if diff := cmp.Diff(want, SetMatch(els, true), addrEq); diff != "" {
		t.Errorf("interval set (-want +got):\n%s", diff)
	}
	plain := []nftables.SetElement{{Key: addr("198.51.100.4").AsSlice()}, {Key: addr("198.51.100.5").AsSlice()}}
	want = Match{PrefixRange(pfx("198.51.100.4/32")), PrefixRange(pfx("198.51.100.5/32"))}
	if diff := cmp.Diff(want, SetMatch(plain, false), addrEq); diff != "" {
		t.Errorf("plain set (-want +got):\n%s", diff)
	}
	if got := want.String(); got != "{ 198.51.100.4, 198.51.100.5 }" {
		t.Errorf("String = %q", got)
	}
	if got := (Range{addr("198.51.100.0"), addr("198.51.100.255")}).String(); got != "198.51.100.0/24" {
		t.Errorf("a prefix range prints as %q", got)
	}
}

func TestScanChains(t *testing.T) {
	ours := []Traffic{
		host(t, "198.51.100.4/32", "192.0.2.250", "eth0"),
		host(t, "203.0.113.0/24", "192.0.2.250", "eth0"),
		host(t, "2001:db8:ffff::/48", "2001:db8::250", "eth0"),
	}
	steal := NATRule{Family: 4, Dst: Match{PrefixRange(pfx("198.51.100.4/32"))}, Action: "snat to 192.0.2.23", Text: "daddr 198.51.100.4 snat to 192.0.2.23"}
	everything := NATRule{Family: 4, Action: "masquerade", Text: "masquerade"}
	docker := NATRule{Family: 4, Src: Match{PrefixRange(pfx("172.17.0.0/16"))}, Action: "masquerade", Text: "docker"}
	otherIf := NATRule{Family: 4, Out: "wg0", Action: "masquerade", Text: "wg0"}
	bothFamilies := NATRule{Action: "masquerade", Text: "inet masquerade"}
	in := Input{
		SkipIPTablesNFT: true,
		Promises:        ours,
		Chains: []Chain{
			{Family: "ip", Table: "thief", Name: "post", Priority: 50, Rules: []NATRule{steal}},
			{Family: "ip", Table: "late", Name: "post", Priority: 101, Rules: []NATRule{everything}},
			{Family: "ip", Table: "docker", Name: "post", Priority: 100, Rules: []NATRule{docker, otherIf}},
			{Family: "ip", Table: "nat", Name: "POSTROUTING", Priority: 100, Rules: []NATRule{everything}},
			{Family: "inet", Table: "fw", Name: "srcnat", Priority: 100, Rules: []NATRule{bothFamilies}},
			{Family: "ip", Table: "empty", Name: "post", Priority: -100},
			// A base chain added by hand to iptables-nft's table is not iptables-nft's.
			{Family: "ip", Table: "nat", Name: "early", Priority: 0, Rules: []NATRule{steal}},
		},
	}
	got := Scan(in)
	want := []Finding{
		{Kind: KindChainAhead, Family: "ip", Table: "nat", Chain: "early", Priority: 0, Rules: []string{steal.Text}, Shadows: []string{"198.51.100.4/32"}, To: []netip.Addr{addr("192.0.2.23")}},
		{Kind: KindChainAhead, Family: "ip", Table: "thief", Chain: "post", Priority: 50, Rules: []string{steal.Text}, Shadows: []string{"198.51.100.4/32"}, To: []netip.Addr{addr("192.0.2.23")}},
		{Kind: KindChainAhead, Family: "inet", Table: "fw", Chain: "srcnat", Priority: 100, SamePriority: true, Rules: []string{"inet masquerade"}, Shadows: []string{"198.51.100.4/32", "203.0.113.0/24", "2001:db8:ffff::/48"}},
	}
	if diff := cmp.Diff(want, got, addrEq); diff != "" {
		t.Errorf("Scan (-want +got):\n%s", diff)
	}
	if d := got[1].Detail(); !strings.Contains(d, "priority 50, ahead of ours at 100") || !strings.Contains(d, "198.51.100.4/32") {
		t.Errorf("Detail = %q", d)
	}
	if d := got[2].Detail(); !strings.Contains(d, "not defined") {
		t.Errorf("equal priority Detail = %q, want it to say the order is not defined", d)
	}

	// With the legacy backend iptables-nft's nat table is someone else's.
	in.SkipIPTablesNFT = false
	got = Scan(in)
	if !slices.ContainsFunc(got, func(f Finding) bool { return f.Table == "nat" && f.SamePriority }) {
		t.Errorf("legacy backend: iptables-nft's nat table not reported: %+v", got)
	}

	f, ok := Explains(Scan(Input{Chains: in.Chains[:1], Promises: ours}), addr("192.0.2.23"))
	if !ok || f.Table != "thief" {
		t.Errorf("Explains(192.0.2.23) = %+v, %v", f, ok)
	}
}

var addrEq = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })

// fakeLister serves fixed chains and rules, the way the kernel lists them.
type fakeLister struct {
	chains []*nftables.Chain
	rules  map[string][]*nftables.Rule // by table/chain
}

func (f fakeLister) ListChains() ([]*nftables.Chain, error) { return f.chains, nil }
func (f fakeLister) GetRules(t *nftables.Table, c *nftables.Chain) ([]*nftables.Rule, error) {
	return f.rules[t.Name+"/"+c.Name], nil
}
func (f fakeLister) GetSetByName(*nftables.Table, string) (*nftables.Set, error) {
	return nil, unix.ENOENT
}
func (f fakeLister) GetSetElements(*nftables.Set) ([]nftables.SetElement, error) { return nil, nil }

func TestReadNFTFollowsJumpsAndVerdicts(t *testing.T) {
	kp := &nftables.Table{Name: "kube-proxy", Family: nftables.TableFamilyIPv4}
	early := &nftables.Table{Name: "early", Family: nftables.TableFamilyIPv4}
	filter := &nftables.Table{Name: "filter", Family: nftables.TableFamilyINet}
	base := func(t *nftables.Table, name string, prio nftables.ChainPriority, typ nftables.ChainType) *nftables.Chain {
		return &nftables.Chain{Table: t, Name: name, Type: typ, Hooknum: nftables.ChainHookPostrouting, Priority: &prio}
	}
	l := fakeLister{
		chains: []*nftables.Chain{
			base(kp, "nat-postrouting", 100, nftables.ChainTypeNAT),
			{Table: kp, Name: "masquerading"},
			base(early, "post", -50, nftables.ChainTypeNAT),
			base(filter, "post", -50, nftables.ChainTypeFilter), // not a nat chain
		},
		rules: map[string][]*nftables.Rule{
			"kube-proxy/nat-postrouting": {{Handle: 1, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "masquerading"}}}},
			// kube-proxy masquerades only packets it marked: a conditional
			// return first, then an unconditional masquerade.
			"kube-proxy/masquerading": {
				{Handle: 2, Exprs: []expr.Any{
					&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
					&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{0, 0x40, 0, 0}, Xor: []byte{0, 0, 0, 0}},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0, 0, 0}},
					&expr.Verdict{Kind: expr.VerdictReturn},
				}},
				{Handle: 3, Exprs: []expr.Any{&expr.Masq{FullyRandom: true}}},
			},
			// An unconditional accept ends the chain: the masquerade after
			// it never runs.
			"early/post": {
				{Handle: 4, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}},
				{Handle: 5, Exprs: []expr.Any{&expr.Masq{}}},
			},
			"filter/post": {{Handle: 6, Exprs: []expr.Any{&expr.Masq{}}}},
		},
	}
	chains, err := ReadNFT(l)
	if err != nil {
		t.Fatal(err)
	}
	if len(chains) != 2 || chains[0].Table != "early" || len(chains[0].Rules) != 0 {
		t.Fatalf("chains %+v", chains)
	}
	kpc := chains[1]
	if len(kpc.Rules) != 1 || !kpc.Rules[0].Unsure || !strings.Contains(kpc.Rules[0].Text, "in chain masquerading") {
		t.Fatalf("kube-proxy's masquerade: %+v", kpc.Rules)
	}
	got := Scan(Input{Chains: chains, Promises: []Traffic{host(t, "198.51.100.4/32", "192.0.2.250", "eth0")}})
	if len(got) != 1 || !strings.Contains(got[0].Detail(), "may take less") || !got[0].SamePriority {
		t.Errorf("Scan = %+v", got)
	}
}
