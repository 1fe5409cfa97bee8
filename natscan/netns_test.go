package natscan_test

import (
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/natscan"
)

func readChains(t *testing.T, l *lab.Lab) []natscan.Chain {
	t.Helper()
	ns, err := netns.GetFromName(l.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	conn, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	chains, err := natscan.ReadNFT(conn)
	if err != nil {
		t.Fatal(err)
	}
	return chains
}

func TestReadNFTInNamespace(t *testing.T) {
	l := lab.New(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatal("nft(8) is needed to build the foreign tables")
	}
	cmd := exec.Command("ip", "netns", "exec", l.Host, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(`
table ip thief {
  chain post { type nat hook postrouting priority 50; policy accept; ip daddr 198.51.100.4 snat to 192.0.2.23; }
}
table inet fw {
  set partners { type ipv4_addr; flags interval; elements = { 203.0.113.0/25, 198.18.0.0/16 } }
  chain steal { ip daddr @partners masquerade; }
  chain post { type nat hook postrouting priority srcnat - 10; oifname "eth0" jump steal; }
}
table ip late {
  chain post { type nat hook postrouting priority 200; masquerade; }
}
table ip6 six {
  chain post { type nat hook postrouting priority 0; ip6 daddr { 2001:db8:ffff::/48 } snat to 2001:db8::23; }
}
`)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v\n%s", err, out)
	}
	// iptables-nft's own nat table, which must be told apart.
	l.Run(t, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "10.66.0.0/16", "-j", "MASQUERADE")

	chains := readChains(t, l)
	var names []string
	for _, c := range chains {
		names = append(names, c.Family+" "+c.Table+" "+c.Name)
	}
	want := []string{"ip6 six post", "ip thief post", "inet fw post", "ip nat POSTROUTING", "ip late post"}
	if !slices.Equal(names, want) {
		t.Fatalf("chains by priority: %q, want %q", names, want)
	}
	natural4 := netip.MustParsePrefix("192.0.2.250/32")
	promises := []natscan.Traffic{
		{Dst: netip.MustParsePrefix("198.51.100.4/32"), Src: natural4, Out: "eth0", Label: "198.51.100.4"},
		{Dst: netip.MustParsePrefix("203.0.113.7/32"), Src: natural4, Out: "eth0", Label: "203.0.113.7"},
		{Dst: netip.MustParsePrefix("203.0.113.200/32"), Src: natural4, Out: "eth0", Label: "203.0.113.200"},
		{Dst: netip.MustParsePrefix("2001:db8:ffff::4/128"), Src: netip.MustParsePrefix("2001:db8::250/128"), Out: "eth0", Label: "2001:db8:ffff::4"},
	}
	got := natscan.Scan(natscan.Input{Chains: chains, SkipIPTablesNFT: true, Promises: promises})
	summary := map[string]string{}
	for _, f := range got {
		summary[f.Table] = strings.Join(f.Shadows, ",")
	}
	wantSummary := map[string]string{"thief": "198.51.100.4", "fw": "203.0.113.7", "six": "2001:db8:ffff::4"}
	if !maps.Equal(summary, wantSummary) {
		t.Errorf("findings %v, want %v\n%+v", summary, wantSummary, got)
	}
	for _, f := range got {
		if f.Table == "thief" && (len(f.To) != 1 || f.To[0] != netip.MustParseAddr("192.0.2.23")) {
			t.Errorf("thief SNATs to %v, want 192.0.2.23", f.To)
		}
		if f.Table == "fw" && !strings.Contains(f.Rules[0], "in chain steal") {
			t.Errorf("fw's rule does not say it is in chain steal: %q", f.Rules[0])
		}
	}
}
