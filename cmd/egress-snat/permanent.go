package main

import (
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// defaultConfig is the permanent desired-state file: what `watch` with no
// -f follows at boot, what --permanent edits and `save` writes.
const defaultConfig = "/etc/egress-snat.yaml"

// configFlag is the global --config.
var configFlag = &cli.StringFlag{
	Name:    "config",
	Value:   defaultConfig,
	EnvVars: []string{"EGRESS_SNAT_CONFIG"},
	Usage:   "the permanent desired-state `PATH` (the format of apply -f), edited by --permanent and save, followed by watch and compared by check when they have no -f",
}

// configPath is the permanent file of this run.
func configPath(c *cli.Context) string {
	if p := c.String("config"); p != "" {
		return p
	}
	return defaultConfig
}

// specOf is the file rule that reproduces an installed entry through
// apply -f: its destination, its match, and its sources (spread when there
// are several: a failover list is installed as the one address in use). An
// entry that keeps the natural source names it as its source, which apply
// turns back into a kept natural source.
func specOf(e snat.Entry) config.Spec {
	to := e.To
	if e.Keep() {
		to = []netip.Addr{e.Natural}
	}
	return config.Spec{
		Match:  config.Match{Out: e.Out},
		Dst:    []netip.Prefix{e.Dst},
		To:     to,
		Spread: len(to) > 1,
	}
}
