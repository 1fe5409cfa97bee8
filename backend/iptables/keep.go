package iptables

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
)

// The keep chain holds conntrack for connections whose SNAT rules went
// (see snat/linger.go): conntrack stays registered in a namespace only
// while something uses it, and every SNAT rule does, so removing the last
// one would leave live NAT'd connections untranslated. It sits in the
// family's nat table, referenced by no jump, so it sees no packet:
//
//	nat EGRESS-SNAT-KEEP
//	-m conntrack --ctstate ESTABLISHED -m comment --comment "egress-snat: kept for connections translated to 192.0.2.22"
//
// Each rule's conntrack match holds conntrack; its comment names an
// address whose translated connections it is kept for: the kernel is the
// only state. It is written in the same iptables-restore transaction that
// removes the rules, which takes the new rules' hold before it lets the
// old ones go (legacy replaces the table in one blob; nft commits the
// batch before it destroys what it replaced). With iptables-nft, the nat
// table (whose chains hold the NAT hooks) is deleted only once the keep
// chain is gone.

// KeepChain is the keep chain's name. Never rename it: see the package
// comment.
const KeepChain = "EGRESS-SNAT-KEEP"

// keepComment starts the comment of each keep rule; the address follows.
const keepComment = "egress-snat: kept for connections translated to "

// KeepSpec is the keep chain's rule for address a, as iptables arguments.
func KeepSpec(a netip.Addr) []string {
	return []string{"-m", "conntrack", "--ctstate", "ESTABLISHED", "-m", "comment", "--comment", keepComment + a.String()}
}

// parseKeep reads a keep chain rule back: the address it is kept for.
func parseKeep(spec []string) (netip.Addr, bool) {
	var a netip.Addr
	state := false
	for i := 0; i+1 < len(spec); i++ {
		switch spec[i] {
		case "--ctstate":
			state = spec[i+1] == "ESTABLISHED"
		case "--comment":
			v, ok := strings.CutPrefix(spec[i+1], keepComment)
			if !ok {
				return a, false
			}
			var err error
			if a, err = netip.ParseAddr(v); err != nil {
				return a, false
			}
		}
	}
	return a, state && a.IsValid() && len(spec) == len(KeepSpec(a))
}

// keepFor returns the addresses f's keep chain must hold conntrack for
// after a plan whose chain for f is c: those it holds it for already, and
// the sources of f's installed SNAT rules when c has none left, that live
// flows are translated to. A chain with rules needs no keep chain: its own
// rules hold conntrack. Without live it keeps what is.
func keepFor(st *Snapshot, f snat.Family, c Chain, live *snat.Liveness) []netip.Addr {
	in := st.Installed[f]
	if live == nil {
		return in.Keep
	}
	if len(c.Rules) > 0 {
		return nil
	}
	cands := slices.Clone(in.Keep)
	for _, e := range in.Entries {
		cands = append(cands, e.To...)
	}
	var out []netip.Addr
	for _, a := range cands {
		if live.Translated[a] > 0 && !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}
