package iptables

import (
	"os/exec"
	"time"

	"github.com/egress-snat/egress-snat/snat"
)

// ChainIn reports whether the managed chain exists in the nat table of
// backend b, which may not be the one in use: rules there still act on
// packets but the host's iptables does not show them. It reads with the
// backend's iptables-save, not `iptables -t nat -S` (go-iptables'
// ChainExists): with the legacy backend, naming a table loads it into the
// namespace, and a probe must not change the host.
func ChainIn(b Flavour, f snat.Family, wait time.Duration) (bool, error) {
	t := ExecTables{Flavour: b, Wait: wait}
	name := map[snat.Family]string{snat.IPv4: "iptables", snat.IPv6: "ip6tables"}[f] + "-" + string(b) + "-save"
	if _, err := exec.LookPath(name); err != nil {
		return false, nil // that backend is not installed, so it holds nothing of ours
	}
	text, err := t.Save(f)
	if err != nil {
		return false, err
	}
	in, err := ParseSave(f, text, nil)
	return in.ChainExists || len(in.Jumps) > 0, err
}
