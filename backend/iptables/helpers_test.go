package iptables

import (
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// stateOf is a snat.State holding s and no routing of ours.
func stateOf(s *Snapshot) *snat.State {
	return &snat.State{NAT: s, Routing: map[snat.Family]routes.State{}}
}

// fakeManager is a Manager over fake tables and sets, for plans made
// without a kernel.
func fakeManager() *snat.Manager {
	return &snat.Manager{Backend: &Backend{Tables: NewFakeTables(), Sets: NewFakeIPSets()}}
}

// snapshot is the iptables part of st.
func snapshot(st *snat.State) *Snapshot { return st.NAT.(*Snapshot) }
