package main

import (
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/snat"
)

// naturalRules are the rules of the permanent file that install nothing
// because their source already is the natural one (an IPv6 rule for an
// address the kernel picks anyway): list and explain show them as
// "natural, no rule needed", so that a rule Ansible just applied does not
// look lost. Only the file's intents that no installed entry answers are
// resolved: at 100,000 installed destinations this costs a map, not a
// route lookup each. Without a permanent file, or with one that does not
// load, there are none (check reports a bad file).
func naturalRules(c *cli.Context, e *env, st *snat.State) []snat.Entry {
	path, err := permanentFile(c)
	if err != nil || path == "" {
		return nil
	}
	_, intents, err := config.LoadIntents(path)
	if err != nil {
		return nil
	}
	type key struct {
		sender snat.Sender
		dst    netip.Prefix
	}
	have := st.Entries()
	installed := make(map[key]bool, len(have))
	for _, en := range have {
		installed[key{en.Sender, en.Dst}] = true
	}
	var open []snat.Intent
	for _, in := range intents {
		if !installed[key{in.Sender, in.Dst.Masked()}] && in.Sender.Local() && !in.Spread {
			open = append(open, in)
		}
	}
	if len(open) == 0 {
		return nil
	}
	resolved, _, err := snat.ResolveAvailable(e.sel, open)
	if err != nil {
		return nil
	}
	var out []snat.Entry
	for _, en := range resolved {
		if en.NeedsNoRule() {
			out = append(out, en)
		}
	}
	return out
}
