package stats

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// MaxAddresses bounds the addresses written to the textfile, so a host
// with many addresses cannot blow up the scrape: with TopN destinations
// each, the file holds at most a few thousand series.
const MaxAddresses = 256

// MaxPools bounds the pools written to the textfile. A pool is one set of
// series labelled by its prefix (egress_snat_pool_*), never one per
// address of it: a /64 per connection uses as many addresses as it has
// connections.
const MaxPools = 256

// LastRunMetric is the time the file was written, in Unix seconds: the
// node_exporter textfile convention, so that an alert can tell a stale file
// (the cron job or timer stopped) from a fresh one that reports nothing.
const LastRunMetric = "egress_snat_last_run_timestamp_seconds"

// WriteProm writes the report, taken at the time at, in the Prometheus text
// exposition format (what node_exporter's textfile collector reads). Label
// values are only addresses, pools' prefixes, protocol names and
// address:port pairs, so the cardinality is bounded by MaxAddresses, TopN
// and MaxPools: a pool's addresses are no label.
//
// pair, when the host is a node of a gateway pair, adds its role and its
// sync's health (egress_snat_ha_*).
func WriteProm(w io.Writer, r Report, at time.Time, pair *Pair) error {
	report := r.Addresses
	if len(report) > MaxAddresses {
		report = report[:MaxAddresses]
	}
	pools := r.Pools
	if len(pools) > MaxPools {
		pools = pools[:MaxPools]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# HELP %s Unix time at which egress-snat stats wrote this file.\n# TYPE %s gauge\n%s %s\n",
		LastRunMetric, LastRunMetric, LastRunMetric, strconv.FormatFloat(float64(at.UnixMilli())/1e3, 'f', 3, 64))
	metric := func(name, typ, help string, each func(a Address)) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
		for _, a := range report {
			each(a)
		}
	}
	metric("egress_snat_flows", "gauge", "Conntrack entries whose replies go to the egress address, by protocol.", func(a Address) {
		for _, p := range []string{"tcp", "udp", "icmp", "icmpv6"} {
			if n, ok := a.Flows[p]; ok || p == "tcp" || p == "udp" {
				fmt.Fprintf(&b, "egress_snat_flows{address=%q,proto=%q} %d\n", a.Address.String(), p, n)
			}
		}
		other := a.Total
		for _, p := range []string{"tcp", "udp", "icmp", "icmpv6"} {
			other -= a.Flows[p]
		}
		if other > 0 {
			fmt.Fprintf(&b, "egress_snat_flows{address=%q,proto=\"other\"} %d\n", a.Address.String(), other)
		}
	})
	metric("egress_snat_destination_flows", "gauge", fmt.Sprintf("Flows of the %d busiest destination tuples of each egress address.", TopN), func(a Address) {
		for _, d := range a.Top {
			fmt.Fprintf(&b, "egress_snat_destination_flows{address=%q,proto=%q,destination=%q} %d\n", a.Address.String(), d.Proto, d.Dst.String(), d.Flows)
		}
	})
	metric("egress_snat_nat_port_range_size", "gauge", "Ports in the SNAT port range of the egress address.", func(a Address) {
		fmt.Fprintf(&b, "egress_snat_nat_port_range_size{address=%q} %d\n", a.Address.String(), a.RangeSize)
	})
	metric("egress_snat_nat_ports_in_use", "gauge", "Ports held by the busiest (destination, port, protocol) tuple of the egress address.", func(a Address) {
		fmt.Fprintf(&b, "egress_snat_nat_ports_in_use{address=%q} %d\n", a.Address.String(), a.PortsInUse)
	})
	metric("egress_snat_nat_port_use_ratio", "gauge", "ports_in_use / port_range_size; above 0.8 new flows are close to failing.", func(a Address) {
		fmt.Fprintf(&b, "egress_snat_nat_port_use_ratio{address=%q} %g\n", a.Address.String(), a.Ratio)
	})
	metric("egress_snat_rule_packets_total", "counter", "Packets counted by the SNAT rules to the egress address (first packets of new flows).", func(a Address) {
		fmt.Fprintf(&b, "egress_snat_rule_packets_total{address=%q} %d\n", a.Address.String(), a.Packets)
	})
	metric("egress_snat_rule_bytes_total", "counter", "Bytes counted by the SNAT rules to the egress address.", func(a Address) {
		fmt.Fprintf(&b, "egress_snat_rule_bytes_total{address=%q} %d\n", a.Address.String(), a.Bytes)
	})
	poolMetric := func(name, typ, help string, each func(p Pool, label string)) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
		for _, p := range pools {
			each(p, fmt.Sprintf("pool=%q", p.Pool.String()))
		}
	}
	if len(pools) > 0 {
		poolMetric("egress_snat_pool_flows", "gauge", "Conntrack entries whose replies go to an address of the pool, by protocol.", func(p Pool, l string) {
			other := p.Total
			for _, proto := range []string{"tcp", "udp", "icmp", "icmpv6"} {
				if n, ok := p.Flows[proto]; ok || proto == "tcp" || proto == "udp" {
					fmt.Fprintf(&b, "egress_snat_pool_flows{%s,proto=%q} %d\n", l, proto, n)
				}
				other -= p.Flows[proto]
			}
			if other > 0 {
				fmt.Fprintf(&b, "egress_snat_pool_flows{%s,proto=\"other\"} %d\n", l, other)
			}
		})
		poolMetric("egress_snat_pool_addresses_in_use", "gauge", "Distinct addresses of the pool that flows in conntrack left with.", func(p Pool, l string) {
			fmt.Fprintf(&b, "egress_snat_pool_addresses_in_use{%s} %d\n", l, p.AddressesInUse)
		})
		poolMetric("egress_snat_pool_busiest_address_flows", "gauge", "Flows of the pool's busiest address (the address itself is no label: see stats --json).", func(p Pool, l string) {
			n := 0
			if len(p.TopAddresses) > 0 {
				n = p.TopAddresses[0].Flows
			}
			fmt.Fprintf(&b, "egress_snat_pool_busiest_address_flows{%s} %d\n", l, n)
		})
		poolMetric("egress_snat_pool_nat_port_range_size", "gauge", "Ports in the SNAT port range of the pool's rules.", func(p Pool, l string) {
			fmt.Fprintf(&b, "egress_snat_pool_nat_port_range_size{%s} %d\n", l, p.RangeSize)
		})
		poolMetric("egress_snat_pool_nat_ports_in_use", "gauge", "Ports held by the pool's busiest (address, destination, port, protocol) tuple.", func(p Pool, l string) {
			fmt.Fprintf(&b, "egress_snat_pool_nat_ports_in_use{%s} %d\n", l, p.PortsInUse)
		})
		poolMetric("egress_snat_pool_nat_port_use_ratio", "gauge", "ports_in_use / port_range_size of the pool; above 0.8 new flows are close to failing.", func(p Pool, l string) {
			fmt.Fprintf(&b, "egress_snat_pool_nat_port_use_ratio{%s} %g\n", l, p.Ratio)
		})
		poolMetric("egress_snat_pool_rule_packets_total", "counter", "Packets counted by the pool's SNAT rules (first packets of new flows).", func(p Pool, l string) {
			fmt.Fprintf(&b, "egress_snat_pool_rule_packets_total{%s} %d\n", l, p.Packets)
		})
		poolMetric("egress_snat_pool_rule_bytes_total", "counter", "Bytes counted by the pool's SNAT rules.", func(p Pool, l string) {
			fmt.Fprintf(&b, "egress_snat_pool_rule_bytes_total{%s} %d\n", l, p.Bytes)
		})
	}
	if pair != nil {
		gauge := func(name, help string, v any) {
			fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s gauge\n%s{node=%q} %v\n", name, help, name, name, pair.Node, v)
		}
		gauge("egress_snat_ha_master", "1 when this node is the pair's master (the role its notify hook recorded last).", b2i(pair.Role == "MASTER"))
		gauge("egress_snat_ha_sync_healthy", "1 when conntrackd's sync link is up and the peer was heard.", b2i(pair.SyncHealthy))
		gauge("egress_snat_ha_split_brain", "1 when this node is master and another host answers for its virtual addresses.", b2i(pair.SplitBrain))
		gauge("egress_snat_ha_external_cache_connections", "The peer's connections this node holds, ready to commit when it takes over.", pair.ExternalCache)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Pair is a gateway pair node's part of the textfile.
type Pair struct {
	Node, Role              string
	SyncHealthy, SplitBrain bool
	ExternalCache           uint64
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// CheckPromDir refuses a textfile path whose directory does not exist or is
// not a directory, naming it: checked before anything is read, so that a
// typo in the path is told as such instead of as a failed temporary file.
func CheckPromDir(path string) error {
	dir := filepath.Dir(path)
	st, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("the directory %s does not exist: create it, or point at node_exporter's --collector.textfile.directory", dir)
	case err != nil:
		return fmt.Errorf("the directory %s: %w", dir, err)
	case !st.IsDir():
		return fmt.Errorf("%s is not a directory", dir)
	}
	return nil
}

// WritePromFile writes the textfile, taken at the time at, atomically: a
// temporary file in the same directory, then a rename over path, so the
// collector never reads a half-written file.
func WritePromFile(path string, report Report, at time.Time, pair *Pair) error {
	if err := CheckPromDir(path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	if err := WriteProm(tmp, report, at, pair); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
