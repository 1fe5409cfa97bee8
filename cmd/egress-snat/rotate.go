package main

import (
	"fmt"
	"math/rand/v2"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/internal/who"
	"github.com/egress-snat/egress-snat/permanent"
	"github.com/egress-snat/egress-snat/snat"
)

var rotateCommand = &cli.Command{
	Name:      "rotate",
	Usage:     "move destinations to the next source address of a pool (for cron)",
	UsageText: "egress-snat rotate --pool ADDR,ADDR[,...] [--dst ADDR|CIDR]... [--from CIDR... | --uid USER | --cgroup PATH] [--order next|random] [--flush-conntrack] [--permanent] [--dry-run]\n   egress-snat rotate --pool IPV6-PREFIX [--dst CIDR]... [--from CIDR... | --uid USER | --cgroup PATH] [--flush-conntrack] [--permanent] [--dry-run]",
	Description: `Moves each --dst (default: every destination of the pool's family) to the
pool member after the one it uses now. The address in use is read from the
installed rule itself, or is the natural source when there is none, so there
is no state file: the first call moves to the first member, the next call to
the second, and so on, wrapping around.

Pool members must be addresses of the interface the traffic leaves by. A
member no longer on the host is skipped with a warning; if none is left,
rotate fails and changes nothing. --order random picks a member other than
the current one at random.

Make-before-break: the old rule is replaced by the new one in one atomic
iptables-restore transaction, so every new connection leaves from the old
address or the new one, never from the natural source in between.

Existing connections keep the address they started with: conntrack holds
their NAT binding until they end. --flush-conntrack deletes the conntrack
entries of the old binding for these destinations (through netlink) and
says how many: only the rotated sender's, told by their original source
(the natural source for the host's own traffic, the --from prefix, the
sockets of the --uid or --cgroup), never another sender's flows to the
same destination. Their next packets are NATed afresh to the new address:
UDP flows move over; established TCP connections break (the far side sees
packets from an address it has no connection with, and answers with a
reset), so use it when the old address must stop being used at once.

A pool per period (set --to 2001:db8:1::/64 --sticky period): --pool
PREFIX starts a new period, one new address of the prefix, at random and
other than the one in use, for all of the sender's destinations of that
pool: a sender's period is one address. A --dst given joins the period
(its rule becomes the pool's per period); with neither such a rule nor
--dst, it makes one for every destination of IPv6.
--order does not apply: a /64 has no "next" worth keeping.
--flush-conntrack deletes the sender's flows to those destinations bound
to any other address of the pool, earlier periods' too. --permanent
writes the rule as the pool's per period; the address itself is not
written (after a reboot the first write starts a new period).

With --from, --uid or --cgroup, the rules of that sender rotate (each
--from prefix on its own); other senders' rules for the same destinations
are not touched.

Runs that overlap (cron and a manual set, or two rotations) wait for each
other, up to --lock-timeout.

Cron example (/etc/cron.d/egress-snat):
   */10 * * * * root egress-snat rotate --pool 192.0.2.22,192.0.2.23 --dst 198.51.100.0/24
   0 * * * *    root egress-snat rotate --pool 2001:db8:1::/64   # a new address each hour`,
	Flags: append([]cli.Flag{
		&cli.StringSliceFlag{Name: "pool", Usage: "(required) the source `ADDR`s to rotate over, in order (comma-separated), or an IPv6 PREFIX whose period starts anew"},
		&cli.StringSliceFlag{Name: "dst", Usage: "destination `ADDR|CIDR` to rotate (repeatable; default: every destination of the pool's family)"},
		enum(&cli.StringFlag{Name: "order", Value: "next", Usage: "next (pool order) or random"}, "next", "random"),
		permanentFlag,
		&cli.BoolFlag{Name: "flush-conntrack", Usage: "also delete the conntrack entries of the old address, so existing flows move too (breaks established TCP connections)"},
		dryRunFlag,
		jsonFlag,
	}, senderFlags()...),
	Action: func(c *cli.Context) error {
		if err := required(c, "pool"); err != nil {
			return err
		}
		if prefix, ok, err := parsePool(c, "pool"); ok || err != nil {
			if err != nil {
				return err
			}
			return rotatePeriod(c, prefix)
		}
		pool, err := parseAddrs("pool", c.StringSlice("pool"))
		if err != nil {
			return err
		}
		order := snat.Order(c.String("order"))
		if order != snat.OrderNext && order != snat.OrderRandom {
			return usageError("--order %q: want next or random", c.String("order"))
		}
		dsts, err := parseDsts(c.StringSlice("dst"))
		if err != nil {
			return err
		}
		if len(dsts) == 0 {
			dsts = []netip.Prefix{everything(pool[0])}
		}
		if err := sameFamily(pool[0], dsts); err != nil {
			return err
		}
		senders, err := parseSenders(c)
		if err != nil {
			return err
		}
		if err := fromFamily(senders, "--pool", pool[0], pool[0].Is4()); err != nil {
			return err
		}
		var targets []snat.Match
		for _, s := range senders {
			for _, d := range dsts {
				targets = append(targets, snat.Match{Sender: s, Dst: d})
			}
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
		return rotateWith(c, e, func(st *snat.State) ([]snat.Move, []snat.Intent, error) {
			return snat.PlanRotation(e.sel, st, pool, targets, order, rng)
		})
	},
}

// rotatePeriod is rotate --pool PREFIX: a new period of a pool per period
// (snat's PlanPeriodRotation).
func rotatePeriod(c *cli.Context, pool netip.Prefix) error {
	if c.IsSet("order") {
		return usageError("--order is for a list of addresses; a pool's next period takes a random address of %s", pool)
	}
	dsts, err := parseDsts(c.StringSlice("dst"))
	if err != nil {
		return err
	}
	if err := sameFamily(pool.Addr(), dsts); err != nil {
		return err
	}
	senders, err := parseSenders(c)
	if err != nil {
		return err
	}
	if err := fromFamily(senders, "--pool", pool, false); err != nil {
		return err
	}
	e, err := envFor(c)
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	return rotateWith(c, e, func(st *snat.State) ([]snat.Move, []snat.Intent, error) {
		return snat.PlanPeriodRotation(e.sel, st, pool, senders, dsts, "", rng)
	})
}

// rotateWith writes the rotation plan gives, under the lock, and reports
// its moves (and, with --flush-conntrack, the flows of the old addresses
// it deleted).
func rotateWith(c *cli.Context, e *env, rotation func(*snat.State) ([]snat.Move, []snat.Intent, error)) error {
	var moves []snat.Move
	_, plan, err := update(c, e, func(st *snat.State) ([]snat.Entry, error) {
		var intents []snat.Intent
		var err error
		moves, intents, err = rotation(st)
		if err != nil {
			return nil, err
		}
		resolved, err := snat.Resolve(e.sel, intents)
		if err != nil {
			return nil, err
		}
		return snat.Merge(st.Entries(), resolved), nil
	}, permanent.Rotate(&moves))
	if err != nil {
		return err
	}
	for _, m := range moves {
		for _, w := range m.Skipped {
			fmt.Fprintf(c.App.ErrWriter, "warning: pool member %s is not on this host any more: skipped\n", w)
		}
	}
	if c.Bool("flush-conntrack") && !c.Bool("dry-run") {
		for i, m := range moves {
			if m.From == m.To || !m.From.IsValid() && !m.Pool.IsValid() {
				continue
			}
			b, err := senderBinding(e, m)
			if err != nil {
				return fmt.Errorf("rules rotated, but finding the flows of %s bound to %s failed: %w", m.Match, m.From, err)
			}
			n, err := conntrack.DeleteBinding(e.nl, b)
			if err != nil {
				return fmt.Errorf("rules rotated, but deleting conntrack entries of %s for %s failed: %w", m.From, m.Match, err)
			}
			moves[i].ConntrackDeleted = &n
		}
	}
	if c.Bool("json") {
		if moves == nil {
			moves = []snat.Move{}
		}
		// The plan's fields, as every other write reports them, and
		// the moves.
		return writeJSON(e.out, struct {
			planReport
			Moves []snat.Move `json:"moves"`
		}{newPlanReport(plan, lingerNotes(plan), c.Bool("dry-run")), moves})
	}
	for _, m := range moves {
		from := m.From.String()
		if !m.From.IsValid() {
			from = "(no rule)" // a forwarded sender had none to move from
		}
		fmt.Fprintf(e.out, "%s: %s -> %s\n", m.Match, from, m.To)
		if m.ConntrackDeleted != nil {
			bound := m.From.String()
			if m.Pool.IsValid() {
				bound = "other addresses of pool " + m.Pool.String()
			}
			fmt.Fprintf(e.out, "%s: deleted %s bound to %s\n", m.Match, plural(*m.ConntrackDeleted, "conntrack entry", "conntrack entries"), bound)
		}
	}
	if c.Bool("dry-run") {
		// The exact program, as --dry-run of every other write prints it.
		printPlan(e.out, plan, true)
		return nil
	}
	if plan.Empty() {
		fmt.Fprintln(e.out, "nothing to change")
	}
	for _, n := range lingerNotes(plan) {
		fmt.Fprintln(e.out, n)
	}
	return nil
}

// senderBinding selects the flows of move m's sender to its destination
// that are bound to the address it moved away from: only that sender's,
// never another sender's flows to the same destination. The host's own
// traffic is told by its natural source, a --from sender by its prefix, a
// uid's or cgroup's by the endpoints of its sockets.
func senderBinding(e *env, m snat.Move) (conntrack.Binding, error) {
	b := conntrack.Binding{Dst: m.Match.Dst, To: m.From}
	if m.Pool.IsValid() {
		// Every earlier period's flows, not only the last one's.
		b.Pool, b.Except = m.Pool, m.To
	}
	is4 := m.To.Is4()
	switch s := m.Match.Sender; s.Kind {
	case snat.SenderFrom:
		b.From = s.From
	case snat.SenderUID:
		socks, err := who.Sockets(is4, who.OfUID(s.UID))
		if err != nil {
			return b, err
		}
		b.Sockets = append([]netip.AddrPort{}, socks...)
	case snat.SenderCgroup:
		own, err := who.OfCgroup(s.Cgroup)
		if err != nil {
			return b, err
		}
		socks, err := who.Sockets(is4, own)
		if err != nil {
			return b, err
		}
		b.Sockets = append([]netip.AddrPort{}, socks...)
	default:
		_, natural, err := e.sel.Natural(m.Match.Dst, m.Match.Out)
		if err != nil {
			return b, err
		}
		b.From = netip.PrefixFrom(natural, natural.BitLen())
	}
	return b, nil
}
