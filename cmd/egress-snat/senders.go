package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/internal/who"
	"github.com/egress-snat/egress-snat/snat"
)

// senderFlags select whose traffic a command is about. They are the same
// on set, unset, rotate and explain; without them, the host's own traffic.
func senderFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringSliceFlag{Name: "from", Usage: "forwarded traffic from source `CIDR` (containers, VMs, VPN or LAN clients routed through this host); repeatable"},
		&cli.StringFlag{Name: "uid", Usage: "the host's own traffic of sockets owned by `USER|UID` (-m owner)"},
		&cli.StringFlag{Name: "cgroup", Usage: "the host's own traffic of sockets in cgroup v2 `PATH`, relative to the cgroup2 root, e.g. system.slice/postfix.service (-m cgroup)"},
	}
}

// parseSenders reads --from, --uid and --cgroup: one sender per --from
// prefix, or the uid's, or the cgroup's, or the host when none is given.
func parseSenders(c *cli.Context) ([]snat.Sender, error) {
	n := 0
	for _, f := range []string{"from", "uid", "cgroup"} {
		if c.IsSet(f) {
			n++
		}
	}
	if n > 1 {
		return nil, usageError("--from, --uid and --cgroup select different traffic (forwarded, a user's, a service's): give one of them")
	}
	switch {
	case c.IsSet("from"):
		var out []snat.Sender
		for _, v := range c.StringSlice("from") {
			for _, s := range strings.Split(v, ",") {
				p, err := config.ParseFrom(s)
				if err != nil {
					return nil, usageError("--from %v", err)
				}
				out = append(out, snat.From(p))
			}
		}
		return out, nil
	case c.IsSet("uid"):
		uid, err := who.LookupUID(c.String("uid"))
		if err != nil {
			return nil, senderError("--uid", err)
		}
		return []snat.Sender{snat.UID(uid)}, nil
	case c.IsSet("cgroup"):
		path, err := who.CheckCgroup(c.String("cgroup"))
		if err != nil {
			return nil, senderError("--cgroup", err)
		}
		return []snat.Sender{snat.Cgroup(path)}, nil
	}
	return []snat.Sender{snat.Host()}, nil
}

// senderError is bad input when the user or cgroup does not exist or the
// value is malformed, and a runtime failure when looking it up failed.
func senderError(flag string, err error) error {
	if errors.Is(err, who.ErrNotFound) || !strings.HasPrefix(err.Error(), "looking up") {
		return usageError("%s: %v", flag, err)
	}
	return err
}

// fromFamily refuses a --from prefix of another family than the sources
// given by flag, naming both: source is an address, or a pool's prefix.
func fromFamily(senders []snat.Sender, flag string, source fmt.Stringer, is4 bool) error {
	for _, s := range senders {
		if s.Kind == snat.SenderFrom && s.From.Addr().Is4() != is4 {
			return usageError("--from %s and %s %s are of different address families", s.From, flag, source)
		}
	}
	return nil
}
