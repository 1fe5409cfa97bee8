package ha

// Example is one node of the example pair: the input of `egress-snat ha
// config -f`, from which the files shipped as examples are generated
// (make docs writes them under contrib/ha/NODE/, and the Debian package
// installs them under /usr/share/doc/egress-snat/examples/ha/).
type Example struct {
	Node string
	YAML string
}

// Examples are the two nodes of the example pair: the lab's addresses
// (internal/lab/ha.go) with the Debian packages' paths.
var Examples = []Example{
	{"gw-a", exampleYAML("gw-a", "150", "10.51.0.1", "gw-b", "100", "10.51.0.2")},
	{"gw-b", exampleYAML("gw-b", "100", "10.51.0.2", "gw-a", "150", "10.51.0.1")},
}

func exampleYAML(node, prio, sync, peer, peerPrio, peerSync string) string {
	return `# The settings of ` + node + `, one node of the egress gateway pair gw-a and gw-b.
#   egress-snat ha config -f THIS_FILE
# writes its keepalived.conf, conntrackd.conf, notify hook and sysctls
# (--dry-run prints them). The other node's file swaps node and peer.
node: {name: ` + node + `, priority: ` + prio + `, sync-addr: ` + sync + `}
peer: {name: ` + peer + `, priority: ` + peerPrio + `, sync-addr: ` + peerSync + `}

# The clients' default gateway, with the clients' prefix length.
client-vip: 10.50.0.1/24
client-interface: lan
# The address the clients' traffic leaves with: egress-snat's rule names it
# in to:, with standby: true.
egress-vips: [192.0.2.100/24]
egress-interface: uplink
# conntrackd's own link between the two nodes.
sync: {interface: sync}

# VRRP: both instances' virtual_router_ids, the same on both nodes (change
# them if other VRRP routers share these links), and the advert interval:
# the peer takes over ~0.35s after the master's last advert.
client-router-id: 50
egress-router-id: 51
advert-interval: 100ms
# Failback: the node of higher priority takes the role back 2s after it
# returns, time to fetch the connections made while it was away.
preempt: true
preempt-delay: 2s

# The nodes' own addresses on lan and uplink: their connections end on the
# node itself, and conntrackd leaves them out.
no-sync: [10.50.0.2/31, 192.0.2.2/31]
`
}
