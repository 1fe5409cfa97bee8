package lab

import (
	"strconv"
	"strings"
	"testing"
)

// NewScratch creates an empty namespace with loopback up and one veth
// pair per name in links: the end called name, up, and its peer ("p" +
// name), also up, both inside the namespace. It is for running a program
// that wants some interfaces to exist (keepalived -t, a conntrackd that
// binds its sync link) without a whole lab. The namespace is deleted at
// t's cleanup; it calls Require first.
func NewScratch(t testing.TB, links ...string) string {
	t.Helper()
	Require(t)
	sweepStaleHA()
	ns := uniqueName() + haSuffix + "x"
	t.Cleanup(func() {
		if out, err := deleteNetns(ns); err != nil &&
			!strings.Contains(string(out), "No such file") {
			t.Errorf("lab: delete netns %s: %v: %s", ns, err, out)
		}
	})
	ip(t, "netns", "add", ns)
	cmds := []string{"link set lo up"}
	for i, l := range links {
		// Distinct ifindexes, see New.
		cmds = append(cmds, "link add "+l+" index "+strconv.Itoa(100+2*i)+" type veth peer name p"+l+" index "+strconv.Itoa(101+2*i),
			"link set "+l+" up", "link set p"+l+" up")
	}
	ipBatch(t, ns, cmds)
	return ns
}

// ScratchAddr adds cidr to dev in the namespace ns.
func ScratchAddr(t testing.TB, ns, cidr, dev string) {
	t.Helper()
	ip(t, "-n", ns, "addr", "add", cidr, "dev", dev)
}
