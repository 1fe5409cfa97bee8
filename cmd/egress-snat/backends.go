package main

import (
	"time"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/backend/nft"
	"github.com/egress-snat/egress-snat/snat"
)

// The backends --backend names. nft and legacy are the names of the two
// iptables flavours before there was a native nftables backend; they keep
// working.
const (
	backendAuto           = "auto"
	backendNFTables       = "nftables"
	backendIPTablesNFT    = "iptables-nft"
	backendIPTablesLegacy = "iptables-legacy"
)

var backendNames = []string{backendAuto, backendNFTables, backendIPTablesNFT, backendIPTablesLegacy}

// openedBackend is the backend a run uses.
type openedBackend struct {
	kind    string
	flavour iptables.Flavour
	ipt     *iptables.Backend
	nft     *nft.Backend
}

func (b openedBackend) backend() snat.Backend {
	if b.nft != nil {
		return b.nft
	}
	return b.ipt
}

// openBackend opens the backend name names. auto is the backend that
// holds egress-snat's rules (the nftables table when it exists and no
// iptables chain of ours does), else the iptables flavour the host's
// iptables command uses: what operators and other tools on the host look
// at (see the README's "Which backend").
func openBackend(name string, wait time.Duration) (openedBackend, error) {
	var b openedBackend
	switch name {
	case backendNFTables:
		return openNFT()
	case backendIPTablesNFT, "nft":
		b.flavour = iptables.FlavourNFT
	case backendIPTablesLegacy, "legacy":
		b.flavour = iptables.FlavourLegacy
	case backendAuto, "":
		f, err := iptables.DetectFlavour("auto")
		if err != nil {
			// No iptables at all: only the native backend can serve.
			if n, nerr := openNFT(); nerr == nil {
				return n, nil
			}
			return b, err
		}
		if ours, err := nftHoldsOurs(f, wait); err == nil && ours {
			return openNFT()
		}
		b.flavour = f
	default:
		return b, usageError("--backend %q: want %s (or nft, legacy)", name, orList(backendNames))
	}
	tables, err := iptables.NewExecTables(b.flavour, wait)
	if err != nil {
		return b, err
	}
	b.kind = "iptables-" + string(b.flavour)
	b.ipt = &iptables.Backend{Tables: tables, Sets: iptables.ExecIPSets{}}
	return b, nil
}

func openNFT() (openedBackend, error) {
	c, err := nft.Open()
	if err != nil {
		return openedBackend{}, err
	}
	return openedBackend{kind: backendNFTables, nft: &nft.Backend{Conn: c}}, nil
}

// nftHoldsOurs reports whether the nftables table of ours exists and no
// iptables chain of ours does, in either flavour: a host moved to the
// native backend, which auto then keeps to.
func nftHoldsOurs(f iptables.Flavour, wait time.Duration) (bool, error) {
	c, err := nft.Open()
	if err != nil {
		return false, err
	}
	defer c.Close()
	shape, _, err := c.ReadShape()
	if err != nil || shape == nil {
		return false, err
	}
	for _, fl := range []iptables.Flavour{f, f.Other()} {
		for _, fam := range snat.Families {
			if in, err := iptables.ChainIn(fl, fam, wait); err != nil || in {
				return false, err
			}
		}
	}
	return true, nil
}

// backendName names the backend in use for JSON, logs and a child's
// --backend: "nftables", or the iptables flavour ("nft", "legacy"), as
// list --json always said.
func (e *env) backendName() string {
	if e.nft != nil {
		return backendNFTables
	}
	return string(e.flavour)
}
