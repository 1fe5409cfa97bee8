package config

import "strings"

// Key is one key a rule of the desired-state file may have. RuleKeys is the
// one list of them: the decoder accepts exactly these (any other key is an
// error that lists them), and the man page's FILE FORMAT section is
// generated from it (egress-snat gen-docs), so the two cannot disagree. A
// test checks it against Rule's fields.
type Key struct {
	Name string
	// Type says what the value may be.
	Type string
	// Meaning is a paragraph for the operator.
	Meaning string
	// Example is the key as it would stand in a rule.
	Example string
}

// RuleKeys are the keys of a rule, in the order the man page lists them.
var RuleKeys = []Key{
	{
		Name: "to", Type: "address, or a list of addresses of one family (ADDRESS=WEIGHT with spread), or an IPv6 prefix (a pool)",
		Meaning: "The source address new connections leave with; required. A list is a failover " +
			"list (the first address the host has is used, the rule is left out while it has none), " +
			"or, with spread, the addresses to spread new connections over; there an address may carry " +
			"a weight, a whole number from 1 to 100 (192.0.2.22=3: three connections for each one of an " +
			"address of weight 1, exactly, by turns; no weight is 1). Each must be an address " +
			"of the host on the interface the traffic leaves by, or of another interface (then traffic " +
			"leaves by that one: see via). An IPv6 prefix of /64 to /124, alone, is a pool: see sticky.",
		Example: "to: [192.0.2.24, 192.0.2.25]",
	},
	{
		Name: "sticky", Type: "connection, destination, sender or period",
		Meaning: "When to is a pool, an IPv6 prefix of /64 to /124 that the upstream router routes to the host " +
			"(to: 2001:db8:1::/64), which connections share an address of it: connection (the default) gives each new " +
			"connection its own, destination the same one to the same destination from the same sender, sender the " +
			"same one to every destination, period one for all of a sender's connections until the next rotate " +
			"(egress-snat rotate --pool PREFIX; the address is chosen at random and kept while the rule is installed). egress-snat installs the prefix as a local route of its own (table 7420, " +
			"proto 83) so that the host takes packets to any of its addresses; it refuses a prefix that is on-link on " +
			"an interface without neighbour proxying, or that holds an address of the host.",
		Example: "sticky: destination",
	},
	{
		Name: "to-ports", Type: "port range LO-HI, or one port",
		Meaning: "The source ports SNAT gives new TCP and UDP connections, from 1 to 65535 (default: the kernel's own " +
			"choice). The kernel needs a free port of the range for each address, destination, destination port and " +
			"protocol: a connection that finds none fails. For an upstream firewall that lets only some ports " +
			"through. Other protocols (ICMP) keep the kernel's choice. Not for a pool, nor method route.",
		Example: "to-ports: 40000-40999",
	},
	{
		Name: "spill", Type: "true or false",
		Meaning: "With a list of addresses in to: when an address the rule gives holds 80% of its source ports " +
			"(the to-ports range, else the kernel's 1024-65535) toward one destination, port and protocol, " +
			"egress-snat watch sends new connections there from the list's other addresses, by a rule of " +
			"its own for that destination port ahead of this one, until it falls below 50%. Connections " +
			"that exist keep their address. Without watch running, the rule is as without spill: the " +
			"first address of the list, or all of them in turn with spread.",
		Example: "spill: true",
	},
	{
		Name: "dst", Type: "address or prefix, or a list of them",
		Meaning: "The destinations, of to's family; a bare address is one host. The most specific " +
			"destination wins, as in routing. A rule about the host's own traffic needs dst or " +
			"dst-file; one with from, uid or cgroup without them is about every destination.",
		Example: "dst: [198.51.100.0/24, 203.0.113.7]",
	},
	{
		Name: "dst-file", Type: "path",
		Meaning: "A file of destinations, one address or prefix a line, '#' starting a comment, " +
			"relative to the desired-state file's directory; for long lists (a million lines fit).",
		Example: "dst-file: partners.txt",
	},
	{
		Name: "from", Type: "prefix or address, or a list of them",
		Meaning: "The rule is about traffic forwarded through the host from these sources " +
			"(containers, VMs, VPN or LAN clients), never the host's own. One of from, uid and cgroup at most.",
		Example: "from: [172.17.0.0/16]",
	},
	{
		Name: "uid", Type: "user name or number",
		Meaning: "The rule is about the host's own traffic of sockets owned by this user (-m owner). " +
			"The user must exist.",
		Example: "uid: postfix",
	},
	{
		Name: "cgroup", Type: "cgroup v2 path",
		Meaning: "The rule is about the host's own traffic of sockets in this cgroup, a path " +
			"relative to the cgroup2 root (-m cgroup). The cgroup must exist.",
		Example: "cgroup: system.slice/postfix.service",
	},
	{
		Name: "out", Type: "interface name",
		Meaning: "The interface the traffic leaves by (default: the one the kernel routes each destination by).",
		Example: "out: eth0",
	},
	{
		Name: "spread", Type: "true or false",
		Meaning: "Spread new connections over every address of to in turn (round-robin, per " +
			"connection, in the ratio of their weights when to gives them) instead of using the first " +
			"one the host has.",
		Example: "spread: true",
	},
	{
		Name: "via", Type: "address",
		Meaning: "The gateway, when to is an address of another interface than the one the " +
			"destination's route uses (default: that interface's one gateway). It must be " +
			"reachable directly on that interface.",
		Example: "via: 203.0.113.129",
	},
	{
		Name: "method", Type: "snat, route or auto",
		Meaning: "How the rule is made. snat (the default): an SNAT rule in the nat chain, for any " +
			"sender. route: a route with src in egress-snat's table, no NAT, the socket itself " +
			"carries the address; only for the host's own traffic by destination, to one address. " +
			"auto: route where it does the same, snat elsewhere.",
		Example: "method: route",
	},
	{
		Name: "standby", Type: "true or false",
		Meaning: "The address of to may legitimately be on the other gateway of a pair (egress-snat ha). " +
			"While this host lacks it the rule stands by instead of being an error: its SNAT rule is " +
			"installed, and the clients' packets that belong to no known connection are dropped, so " +
			"nothing leaves untranslated when the address arrives. The rule is activated when the " +
			"daemon is told (the HA hook, after conntrackd committed the peer's connections) or after " +
			"watch --activate-after. Only with from; without standby, a missing address is an error " +
			"(apply) or drift (check).",
		Example: "standby: true",
	},
}

// isRuleKey reports whether name is a key of RuleKeys.
func isRuleKey(name string) bool {
	for _, k := range RuleKeys {
		if k.Name == name {
			return true
		}
	}
	return false
}

// ruleKeyList names the keys for an error message: "to, from, ... method".
func ruleKeyList() string {
	names := make([]string, len(RuleKeys))
	for i, k := range RuleKeys {
		names[i] = k.Name
	}
	return strings.Join(names, ", ")
}

// ExampleFile is a desired-state file that shows each key, for the man page
// (a test decodes it).
const ExampleFile = `rules:
  - to: 192.0.2.22
    dst: [198.51.100.0/24, 203.0.113.7]
    out: eth0                      # optional
  - to: 2001:db8::23
    dst: [2001:db8:ffff::/48]
  - to: 192.0.2.23
    dst-file: partners.txt         # one address or prefix a line
  - to: [192.0.2.22, 192.0.2.23]
    spread: true                   # round-robin over both
    dst: [203.0.113.0/24]
  - to: [192.0.2.22=3, 192.0.2.23=1]
    spread: true                   # three connections from .22 for each from .23
    dst: [198.51.100.128/25]
  - to: [192.0.2.24, 192.0.2.25]   # failover: the first one the host has
    dst: [198.18.0.0/16]
  - to: 192.0.2.23
    from: [172.17.0.0/16]          # forwarded traffic (containers)
  - to: 192.0.2.22
    uid: postfix                   # or cgroup: system.slice/postfix.service
  - to: 203.0.113.130              # an address of a second NIC:
    dst: [198.51.100.4]            # leave by that NIC,
    via: 203.0.113.129             # through this gateway
  - to: 192.0.2.22
    dst: [198.51.100.9]
    method: route                  # a route with src instead of SNAT
  - to: 192.0.2.100
    from: [10.50.0.0/24]
    standby: true                  # a gateway pair's address: may be on the peer
  - to: 2001:db8:1::/64            # a pool: a prefix routed to this host
    sticky: destination            # one address per destination (default: per connection)
    dst: [2001:db8:ffff::/48]
  - to: 192.0.2.22
    dst: [203.0.113.9]
    to-ports: 40000-40999          # TCP and UDP source ports from this range
  - to: [192.0.2.22, 192.0.2.23]
    dst: [203.0.113.0/24]
    spill: true                    # watch spills a busy destination port to .23
`
