// Package snat is egress-snat's domain: what the operator asks for
// (Intent: who sends, to which destinations, from which source), resolved
// against the host into entries (Entry: the sender, destination and
// interface a rule matches, the natural source it rewrites, the sources it
// gives), normalized into the rules a chain needs, and the Manager that
// makes the kernel hold them: it reads what is installed, plans the change
// as a program of steps (make before break), runs it under a lock, and
// puts the host back if a step fails.
//
// The kernel objects are the backends' (snat.Backend): backend/iptables
// (iptables-nft or iptables-legacy, with ipset) and backend/nft (a native
// nftables table). The routes and ip rules of ours are package routes'.
// Which source the kernel picks naturally is package selector's.
//
// Precedence follows routing: the most specific match wins. A rule naming
// who sends comes before one naming only the destination, the longer
// prefix before the shorter (see compareEntryRefs), whatever the backend.
package snat
