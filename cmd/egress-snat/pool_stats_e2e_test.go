package main

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// poolStatsJSON is what stats --json says of pools (and of addresses,
// enough to see that a pool's have no row).
type poolStatsJSON struct {
	Addresses []struct {
		Address string `json:"address"`
	} `json:"addresses"`
	Pools []struct {
		Pool           string         `json:"pool"`
		Sticky         string         `json:"sticky"`
		Managed        bool           `json:"managed"`
		Flows          map[string]int `json:"flows"`
		Total          int            `json:"total_flows"`
		AddressesInUse int            `json:"addresses_in_use"`
		TopAddresses   []struct {
			Address string `json:"address"`
			Flows   int    `json:"flows"`
		} `json:"top_addresses"`
		Busiest *struct {
			Address string `json:"address"`
			Proto   string `json:"proto"`
			Dst     string `json:"dst"`
			Flows   int    `json:"flows"`
		} `json:"busiest_tuple"`
		PortRange  string `json:"port_range"`
		RangeSize  int    `json:"port_range_size"`
		PortsInUse int    `json:"ports_in_use"`
		Packets    uint64 `json:"rule_packets"`
	} `json:"pools"`
}

// poolConntrack counts H's conntrack entries whose replies go to an
// address of pool, and the distinct such addresses: conntrack -L's second
// dst= is the reply's destination, the translated source.
func poolConntrack(t *testing.T, l *lab.Lab, pool netip.Prefix) (flows int, addrs map[netip.Addr]int) {
	t.Helper()
	out := l.Run(t, "conntrack", "-L", "-f", "ipv6")
	addrs = map[netip.Addr]int{}
	for _, line := range strings.Split(out, "\n") {
		var dsts []string
		for _, w := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(w, "dst="); ok {
				dsts = append(dsts, v)
			}
		}
		if len(dsts) != 2 {
			continue
		}
		if a, err := netip.ParseAddr(dsts[1]); err == nil && pool.Contains(a) {
			flows++
			addrs[a]++
		}
	}
	return flows, addrs
}

// TestPoolStats: on the wire, stats reports a pool as one: after n
// connections through 2001:db8:1::/64 per connection, stats --json shows
// the pool with n flows (as conntrack lists them), the distinct addresses
// the far side saw (more than one), the busiest of them and the busiest
// tuple, the rules' n first packets, and no address row of the pool's;
// the text and the textfile say the same, the textfile without a series
// per address. Changed to per destination, the pool says so and keeps
// counting its flows. A /124 inside it keeps its own flows.
func TestPoolStats(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	routePool(t, l)
	pool := netip.MustParsePrefix(testPool)
	const n = 40
	mustES(t, l, "set", "--to", testPool, "--dst", "2001:db8:ffff::/48")
	seen := poolSources(t, l, "2001:db8:ffff::4", n)

	prom := filepath.Join(t.TempDir(), "egress_snat.prom")
	out := mustES(t, l, "stats", "--json", "--prometheus", prom)
	var got poolStatsJSON
	decodeJSON(t, "stats", out, &got, "addresses", "pools")
	if len(got.Pools) != 1 {
		t.Fatalf("stats --json: %d pools, want 1:\n%s", len(got.Pools), out)
	}
	p := got.Pools[0]
	held, addrs := poolConntrack(t, l, pool)
	t.Logf("%s: %d connections through %s per connection: stats counts %d flows from %d addresses; conntrack lists %d from %d; the far side saw %d",
		backend(t), n, testPool, p.Total, p.AddressesInUse, held, len(addrs), len(seen))
	if p.Pool != testPool || p.Sticky != "connection" || !p.Managed {
		t.Errorf("pool %q sticky %q managed %v, want %s, connection, true", p.Pool, p.Sticky, p.Managed, testPool)
	}
	if p.Total != n || held != n || p.Flows["tcp"] != n {
		t.Errorf("pool flows %d (%v), conntrack lists %d; want the %d connections made", p.Total, p.Flows, held, n)
	}
	if p.AddressesInUse != len(seen) || p.AddressesInUse != len(addrs) || p.AddressesInUse < 2 {
		t.Errorf("pool addresses in use %d, the far side saw %d, conntrack lists %d; want them equal, and more than one per connection", p.AddressesInUse, len(seen), len(addrs))
	}
	if len(p.TopAddresses) == 0 || len(p.TopAddresses) > 10 {
		t.Fatalf("top addresses %v: want 1 to 10", p.TopAddresses)
	}
	top := p.TopAddresses[0]
	if a, err := netip.ParseAddr(top.Address); err != nil || addrs[a] != top.Flows {
		t.Errorf("busiest address %s with %d flows; conntrack lists %d for it", top.Address, top.Flows, addrs[a])
	}
	for a, c := range addrs {
		if c > top.Flows {
			t.Errorf("%s has %d flows in conntrack, more than the busiest address listed, %s with %d", a, c, top.Address, top.Flows)
		}
	}
	wantDst := fmt.Sprintf("[2001:db8:ffff::4]:%d", lab.TCPPort)
	if b := p.Busiest; b == nil || b.Dst != wantDst || b.Proto != "tcp" || b.Flows != top.Flows || b.Address != top.Address || p.PortsInUse != b.Flows {
		t.Errorf("busiest tuple %+v, ports in use %d; want %s's tuple to %s, tcp, %d flows", b, p.PortsInUse, top.Address, wantDst, top.Flows)
	}
	if p.PortRange != "1024-65535" || p.RangeSize != 64512 {
		t.Errorf("port range %s (%d), want the kernel's 1024-65535", p.PortRange, p.RangeSize)
	}
	if p.Packets != n {
		t.Errorf("rule packets %d, want %d: one first packet per connection, over all of the pool's rules", p.Packets, n)
	}
	for _, a := range got.Addresses {
		if ad, err := netip.ParseAddr(a.Address); err == nil && pool.Contains(ad) {
			t.Errorf("address %s of the pool has a row of its own", a.Address)
		}
	}

	text := mustES(t, l, "stats")
	for _, want := range []string{"pool " + testPool + " (egress-snat, per connection)\n", fmt.Sprintf("  flows       %d tcp %d\n", n, n), fmt.Sprintf("  addresses   %d in use, the busiest:\n", p.AddressesInUse), fmt.Sprintf("  busiest     tcp %s from %s\n", wantDst, p.Busiest.Address), top.Address} {
		if !strings.Contains(text, want) {
			t.Errorf("stats:\n%s\nwant %q", text, want)
		}
	}

	b, err := os.ReadFile(prom)
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("the textfile does not parse: %v\n%s", err, b)
	}
	sum := 0.0
	for _, m := range families["egress_snat_pool_flows"].GetMetric() {
		sum += m.GetGauge().GetValue()
	}
	if sum != n {
		t.Errorf("egress_snat_pool_flows sums to %v, want %d\n%s", sum, n, b)
	}
	if m := families["egress_snat_pool_addresses_in_use"].GetMetric(); len(m) != 1 || m[0].GetGauge().GetValue() != float64(p.AddressesInUse) {
		t.Errorf("egress_snat_pool_addresses_in_use: %v, want one series of %d\n%s", m, p.AddressesInUse, b)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest := strings.ReplaceAll(line, fmt.Sprintf("pool=%q", testPool), ""); strings.Contains(rest, "2001:db8:1:") && !strings.HasPrefix(line, "#") {
			t.Errorf("textfile line %q names an address of the pool", line)
		}
	}

	// Per destination: the pool's rule changes, its flows stay its own.
	mustES(t, l, "set", "--to", testPool, "--sticky", "destination", "--dst", "2001:db8:ffff::/48")
	if s := poolSources(t, l, "2001:db8:ffff::4", 5); len(s) != 1 {
		t.Errorf("per destination: 5 connections left from %v, want one address", s)
	}
	out = mustES(t, l, "stats", "--json")
	got = poolStatsJSON{}
	decodeJSON(t, "stats", out, &got, "addresses", "pools")
	held, _ = poolConntrack(t, l, pool)
	if len(got.Pools) != 1 || got.Pools[0].Sticky != "destination" || got.Pools[0].Total != held || held != n+5 {
		t.Errorf("per destination, stats --json:\n%s\nwant one pool, per destination, with the %d flows conntrack lists (%d made)", out, held, n+5)
	}

	// A /124 inside the /64, per connection (on the iptables backends 15
	// rules of one address each, which iptables-save prints without a
	// range): its flows are its own, not the /64's.
	const small = "2001:db8:1:0:1::/124"
	gwAddrAdd(t, l, "2001:db8:ffff::6/128")
	mustES(t, l, "set", "--to", small, "--dst", "2001:db8:ffff::6")
	smallSeen := poolSources(t, l, "2001:db8:ffff::6", 30)
	out = mustES(t, l, "stats", "--json")
	got = poolStatsJSON{}
	decodeJSON(t, "stats", out, &got, "addresses", "pools")
	smallHeld, smallAddrs := poolConntrack(t, l, netip.MustParsePrefix(small))
	t.Logf("%s: 30 connections through %s per connection: conntrack lists %d from %d addresses; the far side saw %d", backend(t), small, smallHeld, len(smallAddrs), len(smallSeen))
	if len(got.Pools) != 2 {
		t.Fatalf("stats --json: %d pools, want the /64 and the /124:\n%s", len(got.Pools), out)
	}
	big, p124 := got.Pools[0], got.Pools[1]
	if big.Pool != testPool || big.Total != n+5 {
		t.Errorf("the /64: %s with %d flows, want %s with %d: the /124's are not its", big.Pool, big.Total, testPool, n+5)
	}
	if p124.Pool != small || p124.Sticky != "connection" || p124.Total != 30 || smallHeld != 30 || p124.AddressesInUse != len(smallSeen) || p124.AddressesInUse != len(smallAddrs) || p124.AddressesInUse < 2 || p124.Packets != 30 {
		t.Errorf("the /124: %+v; want per connection, the 30 flows conntrack lists (%d), the %d addresses the far side saw (%d in conntrack), 30 rule packets", p124, smallHeld, len(smallSeen), len(smallAddrs))
	}
	for _, a := range got.Addresses {
		if ad, err := netip.ParseAddr(a.Address); err == nil && pool.Contains(ad) {
			t.Errorf("address %s of a pool has a row of its own", a.Address)
		}
	}
}
