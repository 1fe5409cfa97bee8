package main

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/natscan"
	"github.com/egress-snat/egress-snat/snat"
)

// foreignNAT finds the NAT that binds a source before egress-snat's and may
// take traffic of promises: nftables nat chains on the postrouting hook at
// a priority up to ours, and SNAT or MASQUERADE rules in POSTROUTING ahead
// of our jump.
func foreignNAT(e *env, promises []natscan.Traffic) ([]natscan.Finding, error) {
	in := natscan.Input{
		SkipIPTablesNFT: e.ipt != nil && e.flavour == iptables.FlavourNFT,
		Ahead:           map[int][]natscan.NATRule{},
		Promises:        promises,
	}
	if e.nft != nil {
		in.Priority = natscan.OurNFTPriority // no jump: our own chain, at 90
	}
	if len(promises) == 0 {
		return nil, nil
	}
	// Without a netlink handle the env is a test's fakes: no kernel to ask.
	if e.nl != nil {
		chains, err := readNFT()
		if err != nil {
			return nil, err
		}
		in.Chains = chains
	}
	for _, f := range snat.Families {
		if e.ipt == nil {
			continue // a test's fakes: no save to read
		}
		rules, err := e.ipt.RulesAhead(f)
		if err != nil {
			return nil, err
		}
		in.Ahead[int(f)] = rules
	}
	return natscan.Scan(in), nil
}

// readNFT reads the nftables nat chains of this network namespace. A
// kernel without nf_tables has none.
func readNFT() ([]natscan.Chain, error) {
	conn, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("opening nftables netlink: %w", err)
	}
	chains, err := natscan.ReadNFT(conn)
	if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	return chains, err
}

// promisesOf turns entries into the traffic they promise a source for.
func promisesOf(entries []snat.Entry) []natscan.Traffic {
	out := make([]natscan.Traffic, 0, len(entries))
	for _, en := range entries {
		t := natscan.Traffic{Dst: en.Dst, Out: en.Out, Label: fmt.Sprintf("%s -> %s", en.Match, en.ToString())}
		switch {
		case !en.Sender.Local():
			t.Src = en.Sender.From
		case en.Natural.IsValid():
			t.Src = netip.PrefixFrom(en.Natural, en.Natural.BitLen())
		}
		out = append(out, t)
	}
	return out
}

// packetPromise is the traffic of one packet, for explain and verify.
func packetPromise(p snat.Packet, label string) natscan.Traffic {
	return natscan.Traffic{
		Dst:   netip.PrefixFrom(p.Dst, p.Dst.BitLen()),
		Src:   netip.PrefixFrom(p.Src, p.Src.BitLen()),
		Out:   p.Out,
		Label: label,
	}
}

// foreignFindings are the findings of foreignNAT as check reports drift.
func foreignFindings(fs []natscan.Finding) []snat.Finding {
	out := make([]snat.Finding, 0, len(fs))
	for _, f := range fs {
		out = append(out, snat.Finding{Kind: f.Kind, Family: f.Family, Detail: f.Detail()})
	}
	return out
}

// foreignWarning is a finding as explain warns of it: what really happens
// to new connections first.
func foreignWarning(f natscan.Finding) string {
	s := f.Kind + ": " + f.Detail()
	if len(f.To) > 0 {
		to := make([]string, len(f.To))
		for i, a := range f.To {
			to[i] = a.String()
		}
		s += "; new connections may leave with " + strings.Join(to, " or ") + " instead"
	}
	return s
}
