package main

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/permanent"
	"github.com/egress-snat/egress-snat/snat"
)

var setCommand = &cli.Command{
	Name:      "set",
	Usage:     "make new connections to destinations leave with a chosen source address",
	UsageText: "egress-snat set --to ADDR [--dst ADDR|CIDR]... [--out IFACE] [--permanent] [--dry-run]\n   egress-snat set --to ADDR --from CIDR [--from CIDR]... [--dst CIDR]...\n   egress-snat set --to ADDR --uid USER|UID [--dst CIDR]...\n   egress-snat set --to ADDR --cgroup PATH [--dst CIDR]...\n   egress-snat set --to ADDR,ADDR[,...] --spread [--dst CIDR]...\n   egress-snat set --to ADDR=WEIGHT,ADDR=WEIGHT[,...] --spread [--dst CIDR]...\n   egress-snat set --to IPV6-PREFIX [--sticky connection|destination|sender|period] [--dst CIDR]...\n   egress-snat set --to ADDR-ON-ANOTHER-NIC --dst CIDR... [--via GW]\n   egress-snat set --to ADDR --dst CIDR... --method route|snat|auto\n   egress-snat set --to ADDR[,ADDR...] --dst CIDR... --to-ports LO-HI\n   egress-snat set --to ADDR,ADDR[,...] --spill [--spread] [--dst CIDR]... [--to-ports LO-HI]",
	Description: `Installs SNAT rules so that new connections to each --dst leave with --to
instead of the kernel's natural source. Without --dst, it applies to every
destination of --to's family (0.0.0.0/0 or ::/0: whatever uses the default
route).

The most specific --dst wins, as in routing: "set --to A" for everything and
"set --to B --dst 198.51.100.0/24" send that /24 from B and the rest from A.
Setting the same --dst again replaces its source; repeating an identical set
changes nothing. When the natural source already is --to, no rule is needed
and none is installed, unless a broader rule would otherwise rewrite it.

Checked before anything changes: --to must be an address of this host on
the interface the traffic leaves by, of the same family as --dst, and --out
must exist. A refused set changes nothing.

Rules only rewrite traffic that would leave with the natural source, so an
application that binds another address keeps it, and forwarded traffic is
untouched. (An application that binds the natural source itself cannot be
told apart on the wire and is rewritten like the rest.) Connections that already exist keep their source: conntrack holds
their NAT binding until they end.

With --spread and several --to addresses, new connections are spread over
them in turn (round-robin, per connection). A weight after an address,
--to 192.0.2.22=3,192.0.2.23=1, shares them out in that ratio, exactly:
three connections leave from .22 for each one from .23, by turns (for
addresses of different reputation or uplinks). A weight is a whole number
from 1 to 100, an address without one weighs 1, and only --spread takes
weights. The kernel counts the turns one by one: the iptables backend
writes a rule per turn (the weights divided by their greatest common
divisor, added up; at most 256), the nftables backend a map element.

A pool: --to 2001:db8:1::/64, an IPv6 prefix of /64 to /124 that the
upstream router routes to this host (not on-link: see below), gives new
connections addresses of the whole prefix, in the kernel, for every
application. None of them is configured on the host: egress-snat installs
the prefix as an AnyIP route of its own (local PREFIX dev lo, table 7420,
proto 83) so the host takes packets to any address of it, and removes it
with the last rule of the pool. --sticky says which connections share an
address: connection (the default) gives each new connection its own,
destination the same one for the same sender and destination, sender the
same one for every destination of a sender, period one address for all of
a sender's connections until the next rotate (rotate --pool PREFIX: the
cron case). A period's address is chosen at random when its rule is first
written, and kept by set, apply and watch's repairs that name the pool
again; list shows it. What the kernel does, measured:
the nftables backend draws a random address per connection (numgen) or
hashes the addresses (jhash) over all the host bits; the iptables backends
write SNAT to a range with --random (--persistent per sender), where the
kernel hashes the source and destination addresses, never the ports, so
per connection they take 16 slices of the prefix by turns: one sender
talking to one destination gets 16 addresses in turn, not one per
connection. Refused, with exit status 2: a prefix larger than a /64 or
smaller than a /124, one that holds an address of this host, and one that
is on-link on an interface without neighbour proxying (proxy_ndp), where
the router would ask for each address by neighbour discovery and replies
would never arrive.

--to-ports 40000-40999 gives new TCP and UDP connections source ports of
that range (default: the kernel's own choice), for an upstream firewall
that lets only some through. The kernel needs a free port of the range for
each address, destination, destination port and protocol: a connection
that finds none fails (stats warns at 80% of the range). Other protocols
(ICMP) keep the kernel's choice. Not for a pool, nor --method route.

--spill, with several --to addresses, lets egress-snat watch act before
source ports run out: when an address the rule gives holds 80% of its
ports (the --to-ports range, else the kernel's 1024-65535) toward one
destination, destination port and protocol, watch installs a rule of its
own for that destination port, ahead of this one, that gives new
connections there the list's other addresses; it removes it once the
address falls below 50%. Connections that exist keep their address, and
other destinations keep the rule's. Without --spread the list's first
address is the rule's and the others are only spilled to. Without watch
running (and following a file with the rule: add --permanent), a spill
rule is the same as without --spill: the first address, or all of them
in turn with --spread. list shows a spill in force as "spill of" its
rule. Not for a pool, nor --method route.

Who sends: --from CIDR chooses the source of traffic forwarded through this
host from those sources (Docker or libvirt networks, VPN or LAN clients);
it wins over their MASQUERADE because egress-snat's jump is first. --uid and
--cgroup choose it for the host's own traffic of one user or one service
(a cgroup v2 path such as system.slice/postfix.service; the cgroup must
exist). Without them, set is about the host's own traffic by destination.

Another interface: when --to is an address of another interface than the
one the kernel routes --dst by (a second NIC), new connections to --dst
leave by --to's interface, through --via (default: the gateway of the one
route the host already has through that interface, such as a backup
default route), from --to. Traffic that already leaves with --to (replies
to connections that came in on that interface, applications bound to it)
is sent that way too, so strict rp_filter and the upstream accept it. This
is done with routes and ip rules of egress-snat's own (table 7420, rules
7419-7423, proto 83), not NAT. With --from, --uid or --cgroup, that
sender's traffic is marked in the mangle table (chains EGRESS-SNAT-FWD and
EGRESS-SNAT-OUT), an ip rule of ours routes the mark out of --to's
interface, and the nat chain gives it --to.

--method: snat (the default) rewrites the source in the nat chain, for any
sender. route installs a route with src instead, the article's method one:
no NAT and no conntrack binding, and the application's socket itself
carries the address (getsockname), which matters for protocols that embed
it and for IPsec policies; it works only for the host's own traffic by
destination, to one source. auto uses a route where it can, SNAT elsewhere.

Precedence follows routing: the most specific match wins. A rule naming who
sends (--from, --cgroup, --uid) is more specific than one naming only the
destination; among --from rules the longer source prefix wins, then the
longer destination; a cgroup rule wins over a uid rule. --from rules apply
only to forwarded traffic: the host's own traffic is never rewritten by
them, even from an address inside a --from prefix.

Examples:
   egress-snat set --to 192.0.2.22 --dst 198.51.100.4
   egress-snat set --to 192.0.2.23                      # everything else
   egress-snat set --to 2001:db8::22 --dst 2001:db8:ffff::/48
   egress-snat set --to 192.0.2.22,192.0.2.23 --spread --dst 203.0.113.0/24
   egress-snat set --to 192.0.2.22=3,192.0.2.23=1 --spread      # 3 of every 4 from .22
   egress-snat set --to 2001:db8:1::/64 --dst ::/0              # a routed /64 as the pool
   egress-snat set --to 2001:db8:1::/64 --sticky destination --dst 2001:db8:ffff::/48
   egress-snat set --to 2001:db8:1::/64 --sticky period        # one address until the next rotate
   egress-snat set --to 192.0.2.22 --dst 203.0.113.9 --to-ports 40000-40999
   egress-snat set --to 192.0.2.22,192.0.2.23 --spill --dst 203.0.113.0/24 --permanent
   egress-snat set --to 192.0.2.23 --from 172.17.0.0/16         # Docker's containers
   egress-snat set --to 192.0.2.22 --uid postfix --dst 0.0.0.0/0  # mail from .22`,
	Flags: append([]cli.Flag{
		&cli.StringSliceFlag{Name: "to", Usage: "(required) source `ADDR` new connections should leave with (several, comma-separated, with --spread; ADDR=WEIGHT shares them in that ratio), or an IPv6 PREFIX (/64 to /124) routed to this host: a pool"},
		&cli.StringSliceFlag{Name: "dst", Usage: "destination `ADDR|CIDR` (repeatable; default: every destination of --to's family)"},
		&cli.StringFlag{Name: "out", Usage: "outgoing `IFACE` (default: the interface the kernel routes the destination by)"},
		&cli.BoolFlag{Name: "spread", Usage: "spread new connections over all --to addresses in turn (by their weights, when given)"},
		enum(&cli.StringFlag{Name: "sticky", Value: "connection", Usage: "with --to PREFIX: which connections share an address: connection (a new address each), destination (one per sender and destination), sender (one per sender) or period (one until the next rotate --pool PREFIX)"}, "connection", "destination", "sender", "period"),
		&cli.BoolFlag{Name: "spill", Usage: "with several --to addresses: egress-snat watch sends new connections to a destination port where an address holds 80% of its source ports from the list's other addresses, until it falls below 50% (without watch: as without --spill)"},
		&cli.StringFlag{Name: "to-ports", Usage: "source ports `LO-HI` SNAT gives new TCP and UDP connections (default: the kernel's choice); a connection finding none free for its destination fails"},
		permanentFlag,
		&cli.StringFlag{Name: "via", Usage: "gateway `GW` when --to is on another interface than the destination's route (default: that interface's one gateway)"},
		enum(&cli.StringFlag{Name: "method", Value: "snat", Usage: "`METHOD`: snat (nat chain), route (a route with src, no NAT: the host's own traffic only) or auto"}, "snat", "route", "auto"),
		dryRunFlag,
		jsonFlag,
	}, senderFlags()...),
	Action: func(c *cli.Context) error {
		if err := required(c, "to"); err != nil {
			return err
		}
		ports, err := snat.ParsePorts(c.String("to-ports"))
		if err != nil {
			return usageError("--to-%v", err)
		}
		if pool, ok, err := parsePool(c, "to"); ok || err != nil {
			if err != nil {
				return err
			}
			if c.IsSet("to-ports") {
				return usageError("--to %s is a pool, whose addresses do not run out of ports: leave out --to-ports", pool)
			}
			if c.Bool("spill") {
				return usageError("--to %s is a pool, whose addresses do not run out of ports: leave out --spill", pool)
			}
			return setPool(c, pool)
		}
		if c.IsSet("sticky") {
			return usageError("--sticky is for a pool: --to PREFIX (an IPv6 /64 to /124)")
		}
		to, weighted, err := parseTo(c.StringSlice("to"))
		if err != nil {
			return err
		}
		if weighted && !c.Bool("spread") {
			return usageError("--to %s gives weights, which share new connections out over the addresses: add --spread", strings.Join(c.StringSlice("to"), ","))
		}
		if len(to) > 1 && !c.Bool("spread") && !c.Bool("spill") {
			return usageError("--to %s names %d addresses: add --spread to spread connections over them, or --spill to spill a busy destination port over them, or give one", c.StringSlice("to"), len(to))
		}
		if distinct, _, _ := snat.Weights(to); c.Bool("spill") && len(distinct) < 2 {
			return usageError("--spill needs two --to addresses or more to spill over; --to %s is one", strings.Join(c.StringSlice("to"), ","))
		}
		dsts, err := parseDsts(c.StringSlice("dst"))
		if err != nil {
			return err
		}
		if len(dsts) == 0 {
			dsts = []netip.Prefix{everything(to[0])}
		}
		if err := sameFamily(to[0], dsts); err != nil {
			return err
		}
		senders, err := parseSenders(c)
		if err != nil {
			return err
		}
		method, err := snat.ParseMethod(c.String("method"))
		if err != nil {
			return usageError("--%v", err)
		}
		if c.Bool("spill") && method == snat.MethodRoute {
			return usageError("--spill needs --method snat: a route does not translate ports")
		}
		if !ports.IsZero() && method == snat.MethodRoute {
			return usageError("--to-ports %s needs --method snat: a route does not translate ports", ports)
		}
		var via netip.Addr
		if c.IsSet("via") {
			if via, err = netip.ParseAddr(c.String("via")); err != nil || via.Zone() != "" {
				return usageError("--via %q is not an IP address", c.String("via"))
			}
			if via.Is4() != to[0].Is4() {
				return usageError("--via %s and --to %s are of different address families", via, to[0])
			}
		}
		if err := fromFamily(senders, "--to", to[0], to[0].Is4()); err != nil {
			return err
		}
		var intents []snat.Intent
		for _, s := range senders {
			for _, d := range dsts {
				intents = append(intents, snat.Intent{Sender: s, Dst: d, To: to, Out: c.String("out"), Spread: c.Bool("spread"), Via: via, Method: method, Ports: ports, Spill: c.Bool("spill")})
			}
		}
		return setIntents(c, intents)
	},
}

// setIntents adds or replaces the intents' destinations, keeping every other
// installed entry, and reports what changed.
func setIntents(c *cli.Context, intents []snat.Intent) error {
	e, err := envFor(c)
	if err != nil {
		return err
	}
	var resolved []snat.Entry
	_, plan, err := update(c, e, func(st *snat.State) ([]snat.Entry, error) {
		resolved, err = snat.Resolve(e.sel, intents)
		if err != nil {
			return nil, err
		}
		return snat.Merge(st.Entries(), resolved), nil
	}, permanent.Put(intents))
	if err != nil {
		return err
	}
	notes := sourceNotes(e, resolved)
	for _, r := range resolved {
		if r.Sender.Local() && len(r.To) == 1 && r.To[0] == r.Natural && !plan.Has(r.Match) {
			notes = append(notes, fmt.Sprintf("%s already leaves with %s, its natural source via %s: no rule needed", r.Match, r.Natural, r.Out))
		}
	}
	return reportPlan(c, e.out, plan, notes)
}

// sourceNotes says of each deprecated source of entries that it works,
// and which sources stand by (a gateway pair's, on the peer).
func sourceNotes(e *env, entries []snat.Entry) []string {
	var notes []string
	seen := map[netip.Addr]bool{}
	for _, en := range entries {
		for _, a := range en.HostSources() {
			if !seen[a] && e.sel.Deprecated(a) {
				notes = append(notes, fmt.Sprintf("source %s is deprecated (its preferred lifetime ended): the kernel no longer picks it by itself, but the rule gives it, and connections from it work", a))
			}
			seen[a] = true
		}
	}
	has := func(a netip.Addr) bool { _, err := e.sel.Owner(a); return err == nil }
	for _, s := range snat.StandingBy(entries, has) {
		notes = append(notes, standingLine(s))
	}
	return notes
}

// parsePool reads flag (set's --to, rotate's --pool) as a pool when it is
// a prefix: ok says it is one (then err is about the pool).
func parsePool(c *cli.Context, flag string) (netip.Prefix, bool, error) {
	vals := c.StringSlice(flag)
	var items []string
	for _, v := range vals {
		items = append(items, strings.Split(v, ",")...)
	}
	if !slices.ContainsFunc(items, snat.IsPoolSyntax) {
		return netip.Prefix{}, false, nil
	}
	if len(items) > 1 {
		return netip.Prefix{}, true, usageError("--%s %s: a pool is one prefix, alone", flag, strings.Join(vals, ","))
	}
	p, err := snat.ParsePool(items[0])
	if err != nil {
		return netip.Prefix{}, true, usageError("--%s: %v", flag, err)
	}
	return p, true, nil
}

// setPool is set with --to PREFIX: new connections to each --dst take an
// address of the pool, as --sticky says (snat's pool.go).
func setPool(c *cli.Context, pool netip.Prefix) error {
	if c.Bool("spread") {
		return usageError("--to %s is a pool, which spreads by itself (--sticky says how); --spread is for a list of addresses", pool)
	}
	if c.IsSet("via") {
		return usageError("--to %s is a pool: traffic leaves by the destination's route; --via is for an address of another interface", pool)
	}
	sticky, err := snat.ParseSticky(c.String("sticky"))
	if err != nil {
		return usageError("--%v", err)
	}
	dsts, err := parseDsts(c.StringSlice("dst"))
	if err != nil {
		return err
	}
	if len(dsts) == 0 {
		dsts = []netip.Prefix{everything(pool.Addr())}
	}
	if err := sameFamily(pool.Addr(), dsts); err != nil {
		return err
	}
	senders, err := parseSenders(c)
	if err != nil {
		return err
	}
	method, err := snat.ParseMethod(c.String("method"))
	if err != nil {
		return usageError("--%v", err)
	}
	if method == snat.MethodRoute {
		return usageError("--to %s is a pool, which needs --method snat: a route's src must be an address the host has", pool)
	}
	if err := fromFamily(senders, "pool", pool, false); err != nil {
		return err
	}
	var intents []snat.Intent
	for _, s := range senders {
		for _, d := range dsts {
			intents = append(intents, snat.Intent{Sender: s, Dst: d, Out: c.String("out"), Pool: pool, Sticky: sticky})
		}
	}
	return setIntents(c, intents)
}
