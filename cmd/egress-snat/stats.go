package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/stats"
)

var statsCommand = &cli.Command{
	Name:      "stats",
	Usage:     "per egress address and per pool: flows in conntrack, busiest destinations, NAT port use, rule counters",
	UsageText: "egress-snat stats [--json] [--prometheus FILE]",
	Description: `For every address a SNAT rule of the nat table translates to (egress-snat's
and others'), reports:

   - the flows in conntrack leaving with it, by protocol;
   - its 10 busiest destination address:port tuples;
   - NAT port use: SNAT needs a free source port per (address,
     destination, destination port, protocol), so the busiest tuple's flow
     count is compared with the rule's port range (--to-source ADDR:LO-HI,
     else 1024-65535); at 80% it warns;
   - the packet and byte counters of the rules translating to it (the
     first packets of new flows: NAT rules see nothing else).

A pool (set --to 2001:db8:1::/64) translates to many addresses of its
prefix, one per connection at most, so it is reported as one, and its
addresses get no report of their own: the flows whose translated source
lies in the prefix (in the longest pool's, when pools nest; an address a
rule names by itself keeps its own report), how many distinct addresses
they use and the 10 busiest, the busiest (address, destination,
destination port, protocol) tuple with its NAT port use against the port
range, warning at 80%, and the counters of all the pool's rules.

--json prints {"addresses": [...], "pools": [...]}, both lists always
present. An address: address, managed (egress-snat's rule), flows (by
protocol), total_flows, top_destinations [{proto, dst, flows}],
port_range, port_range_size, ports_in_use, port_use_ratio, warning (when
there is one), rule_packets, rule_bytes. A pool: pool (the prefix),
sticky (connection, destination, sender or period; comma-separated when its rules
differ), managed, flows, total_flows, addresses_in_use, top_addresses
[{address, flows}], busiest_tuple {address, proto, dst, flows} (left
out without flows), port_range, port_range_size, ports_in_use,
port_use_ratio, warning, rule_packets, rule_bytes.

--prometheus FILE also writes the node_exporter textfile format, atomically
(a temporary file renamed over FILE), with bounded cardinality: at most 256
addresses with 10 destinations each, at most 256 pools with one set of
series each, labelled by the prefix and never by an address of it
(egress_snat_pool_flows by proto, egress_snat_pool_addresses_in_use,
egress_snat_pool_busiest_address_flows, egress_snat_pool_nat_port_range_size,
egress_snat_pool_nat_ports_in_use, egress_snat_pool_nat_port_use_ratio,
egress_snat_pool_rule_packets_total, egress_snat_pool_rule_bytes_total), and
egress_snat_last_run_timestamp_seconds, the time it was written, so that a
stale file can be told from a fresh one
(time() - egress_snat_last_run_timestamp_seconds > 600 in an alert). Point
node_exporter's --collector.textfile.directory at FILE's directory, which
must exist (exit 2 naming it otherwise), and run stats from cron or a
systemd timer.

On a node of a gateway pair (egress-snat ha config) it also shows the node's
role and conntrackd's sync, as ha status does (--json: pair), and the
textfile gets egress_snat_ha_master, egress_snat_ha_sync_healthy,
egress_snat_ha_split_brain and egress_snat_ha_external_cache_connections.`,
	Flags: []cli.Flag{
		jsonFlag,
		&cli.StringFlag{Name: "prometheus", TakesFile: true, Usage: "also write the node_exporter textfile `FILE`"},
	},
	Action: func(c *cli.Context) error {
		if path := c.String("prometheus"); path != "" {
			// Bad input, told before anything is read.
			if err := stats.CheckPromDir(path); err != nil {
				return usageError("--prometheus %s: %v", path, err)
			}
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		rules, err := snatCounters(e)
		if err != nil {
			return err
		}
		table := conntrack.Netlink{Handle: e.nl}
		var flows []conntrack.Flow
		for _, fam := range []int{4, 6} {
			fl, err := table.Flows(fam)
			if err != nil {
				return err
			}
			flows = append(flows, fl...)
		}
		report := stats.Compute(rules, flows)
		pair := pairStatus(c)
		if path := c.String("prometheus"); path != "" {
			if err := stats.WritePromFile(path, report, time.Now(), promPair(pair)); err != nil {
				return err
			}
		}
		for _, a := range report.Addresses {
			if a.Warning != "" {
				fmt.Fprintln(c.App.ErrWriter, "WARNING "+a.Warning)
			}
		}
		for _, p := range report.Pools {
			if p.Warning != "" {
				fmt.Fprintln(c.App.ErrWriter, "WARNING "+p.Warning)
			}
		}
		if c.Bool("json") {
			// Lists are [], not null, when empty.
			if report.Addresses == nil {
				report.Addresses = []stats.Address{}
			}
			if report.Pools == nil {
				report.Pools = []stats.Pool{}
			}
			for i := range report.Addresses {
				if report.Addresses[i].Top == nil {
					report.Addresses[i].Top = []stats.Destination{}
				}
			}
			for i := range report.Pools {
				if report.Pools[i].TopAddresses == nil {
					report.Pools[i].TopAddresses = []stats.PoolAddress{}
				}
			}
			return writeJSON(e.out, struct {
				Addresses []stats.Address `json:"addresses"`
				Pools     []stats.Pool    `json:"pools"`
				Pair      *haStatusReport `json:"pair,omitempty"`
			}{report.Addresses, report.Pools, pair})
		}
		if pair != nil {
			fmt.Fprintln(e.out, pairLine(pair))
		}
		printStats(e, report)
		return nil
	},
}

// promPair is the pair's part of the textfile, nil without a pair.
func promPair(r *haStatusReport) *stats.Pair {
	if r == nil {
		return nil
	}
	return &stats.Pair{Node: r.Node, Role: r.Role, SyncHealthy: r.Sync.Healthy, SplitBrain: r.SplitBrain, ExternalCache: r.Sync.ExternalCache}
}

func printStats(e *env, report stats.Report) {
	w := e.out
	if len(report.Addresses) == 0 && len(report.Pools) == 0 {
		fmt.Fprintln(w, "no SNAT rules: no egress addresses to report")
	}
	for _, a := range report.Addresses {
		mark := ""
		if a.Ours {
			mark = " (egress-snat)"
		}
		fmt.Fprintf(w, "%s%s\n", a.Address, mark)
		fmt.Fprintf(w, "  flows       %d %s\n", a.Total, protoCounts(a.Flows))
		fmt.Fprintf(w, "  nat ports   %d of %d in use by the busiest tuple (%.0f%%), range %s\n", a.PortsInUse, a.RangeSize, 100*a.Ratio, a.PortRange)
		fmt.Fprintf(w, "  rules       %s, %s\n", plural(a.Packets, "packet", "packets"), plural(a.Bytes, "byte", "bytes"))
		for _, d := range a.Top {
			fmt.Fprintf(w, "  %-5s %-40s %s\n", d.Proto, d.Dst, plural(d.Flows, "flow", "flows"))
		}
	}
	for _, p := range report.Pools {
		var what []string
		if p.Ours {
			what = append(what, "egress-snat")
		}
		if p.Sticky != "" {
			what = append(what, "per "+p.Sticky)
		}
		mark := ""
		if len(what) > 0 {
			mark = " (" + strings.Join(what, ", ") + ")"
		}
		fmt.Fprintf(w, "pool %s%s\n", p.Pool, mark)
		fmt.Fprintf(w, "  flows       %d %s\n", p.Total, protoCounts(p.Flows))
		fmt.Fprintf(w, "  nat ports   %d of %d in use by the busiest tuple (%.0f%%), range %s\n", p.PortsInUse, p.RangeSize, 100*p.Ratio, p.PortRange)
		if b := p.Busiest; b != nil {
			fmt.Fprintf(w, "  busiest     %s %s from %s\n", b.Proto, b.Dst, b.Address)
		}
		fmt.Fprintf(w, "  rules       %s, %s\n", plural(p.Packets, "packet", "packets"), plural(p.Bytes, "byte", "bytes"))
		list := ""
		if len(p.TopAddresses) > 0 {
			list = ", the busiest:"
		}
		fmt.Fprintf(w, "  addresses   %d in use%s\n", p.AddressesInUse, list)
		for _, a := range p.TopAddresses {
			fmt.Fprintf(w, "  %-46s %s\n", a.Address, plural(a.Flows, "flow", "flows"))
		}
	}
}

// protoCounts is "tcp 2, udp 1": the flows by protocol, in a fixed order.
func protoCounts(flows map[string]int) string {
	var protos []string
	for _, p := range []string{"tcp", "udp", "icmp", "icmpv6"} {
		if n := flows[p]; n > 0 {
			protos = append(protos, fmt.Sprintf("%s %d", p, n))
		}
	}
	return strings.Join(protos, ", ")
}

// snatCounters are the counters of the SNAT rules of the host: ours, and
// every other tool's in the iptables nat tables. With the native nftables
// backend ours are its rules' counters, and the host's iptables (of the
// flavour its iptables command uses) holds only other tools' rules.
func snatCounters(e *env) ([]stats.RuleCounters, error) {
	if e.nft == nil {
		return e.ipt.SNATCounters()
	}
	rules, err := e.nft.SNATCounters()
	if err != nil {
		return nil, err
	}
	f, err := iptables.DetectFlavour("auto")
	if err != nil {
		return rules, nil // no iptables on the host: no other SNAT rules there
	}
	tables, err := iptables.NewExecTables(f, e.lockTimeout)
	if err != nil {
		return nil, err
	}
	others, err := (&iptables.Backend{Tables: tables}).SNATCounters()
	if err != nil {
		return nil, err
	}
	return append(rules, others...), nil
}
