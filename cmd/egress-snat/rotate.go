package main

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"

	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netlink"

	"github.com/egress-snat/egress-snat/snat"
)

var rotateCommand = &cli.Command{
	Name:      "rotate",
	Usage:     "move destinations to the next source address of a pool (for cron)",
	UsageText: "egress-snat rotate --pool ADDR,ADDR[,...] [--dst ADDR|CIDR]... [--from CIDR... | --uid USER | --cgroup PATH] [--order next|random] [--flush-conntrack] [--permanent] [--dry-run]",
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
says how many. Their next packets are NATed afresh to the new address:
UDP flows move over; established TCP connections break (the far side sees
packets from an address it has no connection with, and answers with a
reset), so use it when the old address must stop being used at once.

With --from, --uid or --cgroup, the rules of that sender rotate (each
--from prefix on its own); other senders' rules for the same destinations
are not touched.

Runs that overlap (cron and a manual set, or two rotations) wait for each
other, up to --lock-timeout.

Cron example (/etc/cron.d/egress-snat):
   */10 * * * * root egress-snat rotate --pool 192.0.2.22,192.0.2.23 --dst 198.51.100.0/24`,
	Flags: append([]cli.Flag{
		&cli.StringSliceFlag{Name: "pool", Usage: "(required) the source `ADDR`s to rotate over, in order (comma-separated)"},
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
		var targets []snat.Match
		for _, s := range senders {
			if s.Kind == snat.SenderFrom && s.From.Addr().Is4() != pool[0].Is4() {
				return usageError("--from %s and --pool %s are of different address families", s.From, pool[0])
			}
			for _, d := range dsts {
				targets = append(targets, snat.Match{Sender: s, Dst: d})
			}
		}
		e, err := envFor(c)
		if err != nil {
			return err
		}
		rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
		var moves []snat.Move
		_, plan, err := update(c, e, func(st *snat.State) ([]snat.Entry, error) {
			var intents []snat.Intent
			moves, intents, err = snat.PlanRotation(e.sel, st, pool, targets, order, rng)
			if err != nil {
				return nil, err
			}
			resolved, err := snat.Resolve(e.sel, intents)
			if err != nil {
				return nil, err
			}
			return snat.Merge(st.Entries(), resolved), nil
		}, rotateDoc(&moves))
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
				if m.From == m.To {
					continue
				}
				n, err := flushBinding(e.nl, m.Match.Dst, m.From)
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
			}{newPlanReport(plan, nil, c.Bool("dry-run")), moves})
		}
		for _, m := range moves {
			fmt.Fprintf(e.out, "%s: %s -> %s\n", m.Match, m.From, m.To)
			if m.ConntrackDeleted != nil {
				fmt.Fprintf(e.out, "%s: deleted %s bound to %s\n", m.Match, plural(*m.ConntrackDeleted, "conntrack entry", "conntrack entries"), m.From)
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
		return nil
	},
}

// flushBinding deletes the conntrack entries of connections to dst whose
// replies go to old, i.e. connections NATed to old, or leaving from it.
func flushBinding(h *netlink.Handle, dst netip.Prefix, old netip.Addr) (uint, error) {
	if h == nil {
		// A nil handle is netlink's default one: never delete through it
		// from an env that was not built for this namespace (fakes).
		return 0, errors.New("no netlink handle for conntrack")
	}
	f := &netlink.ConntrackFilter{}
	if err := f.AddIPNet(netlink.ConntrackOrigDstIP, &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())}); err != nil {
		return 0, err
	}
	if err := f.AddIP(netlink.ConntrackReplyDstIP, old.AsSlice()); err != nil {
		return 0, err
	}
	family := netlink.InetFamily(netlink.FAMILY_V4)
	if !old.Is4() {
		family = netlink.InetFamily(netlink.FAMILY_V6)
	}
	return h.ConntrackDeleteFilters(netlink.ConntrackTable, family, f)
}
