package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// Rule is one rule of the managed chain, typed. It is the only description
// of the rule shape: Args renders it for iptables-restore, ParseRule reads
// it back from iptables-save, and rules are compared as structs, so the
// order in which a backend prints matches does not matter.
//
//	-s SRC [-d DST] -o OUT [-p tcp|udp [-m tcp|udp --dport PORT]] [-m addrtype ! --src-type LOCAL]
//	  [-m owner --uid-owner UID] [-m cgroup --path PATH]
//	  [-m set --match-set SET dst] [-m conntrack --ctstate INVALID,NEW]
//	  -m comment --comment egress-snat | -m comment --comment "egress-snat pool PREFIX per period"
//	  [-m statistic --mode nth --every N --packet 0]
//	  -j SNAT --to-source TO[-LAST --random [--persistent]] | -j SNAT --to-source TO:LO-HI (with -p)
//	  | -j RETURN | -j DROP (the hold chain's)
type Rule struct {
	// Src is the natural source as a host prefix, or a --from prefix.
	Src netip.Prefix
	// Dst is the destination; invalid when the rule has none (a set rule,
	// or every destination).
	Dst netip.Prefix
	// Set is the ipset of destinations, matched on the destination.
	Set string
	Out string
	// Forwarded restricts the rule to packets whose source is not a local
	// address (-m addrtype ! --src-type LOCAL): a --from rule never
	// rewrites the host's own traffic, even from an address inside its
	// prefix.
	Forwarded bool
	// HasUID and UID: -m owner --uid-owner.
	HasUID bool
	UID    uint32
	// Cgroup: -m cgroup --path.
	Cgroup string
	// Every is the nth mode's --every for all but the last rule of a spread
	// entry; 0 means no statistic match.
	Every int
	// Target is "SNAT", "RETURN" or (in the mangle chains) "MARK";
	// ToSource is SNAT's address, SetMark MARK's value (under
	// routes.MarkMask).
	Target   string
	ToSource netip.Addr
	// ToLast ends a --to-source range from ToSource (a pool's, see
	// pool.go); invalid for one address. A range always takes --random
	// (Random), which keeps the kernel from reusing the address of an
	// earlier connection from the same source port (pool.go). Persistent
	// is SNAT's --persistent: the range's address hashed from the source
	// alone.
	ToLast     netip.Addr
	Random     bool
	Persistent bool
	SetMark    uint32
	// Unmarked matches only packets no rule of ours marked yet
	// (-m mark --mark 0/routes.MarkMask): the first MARK rule wins.
	Unmarked bool
	// Connmark is CONNMARK's action, "restore-mark" or "save-mark", under
	// routes.MarkMask: the mark of a local sender's connection is kept in
	// conntrack, for the packets the kernel sends for it without its
	// socket (the last ACK of a closed connection).
	Connmark string
	// NewOrInvalid matches the packets of no connection conntrack knows
	// (-m conntrack --ctstate NEW,INVALID): what the hold chain drops.
	NewOrInvalid bool
	// Proto (-p tcp or udp) and Ports (--to-source TO:LO-HI): an entry's
	// port range (snat.Ports), which iptables takes only in a rule that
	// matches a protocol with ports; the entry's rules without them
	// translate the rest (ICMP).
	Proto string
	Ports snat.Ports
	// DPort (-m tcp|udp --dport, with Proto) is a spill entry's
	// destination port (snat.Match.DPort); its rule has Proto whether or
	// not it has Ports.
	DPort uint16
	// Pool is the pool a period's rule (SNAT to one address of it, see
	// pool.go) takes its address from, carried in the rule's comment:
	// nothing else of the rule names it.
	Pool netip.Prefix
}

// Args renders the rule as iptables arguments, without "-A CHAIN".
func (r Rule) Args() []string {
	a := make([]string, 0, 24)
	if r.Src.IsValid() {
		a = append(a, "-s", r.Src.String())
	}
	if r.Dst.IsValid() {
		a = append(a, "-d", r.Dst.String())
	}
	if r.Out != "" {
		a = append(a, "-o", r.Out)
	}
	if r.Proto != "" {
		a = append(a, "-p", r.Proto)
	}
	if r.DPort != 0 {
		a = append(a, "-m", r.Proto, "--dport", strconv.Itoa(int(r.DPort)))
	}
	if r.Forwarded {
		a = append(a, "-m", "addrtype", "!", "--src-type", "LOCAL")
	}
	if r.HasUID {
		a = append(a, "-m", "owner", "--uid-owner", strconv.FormatUint(uint64(r.UID), 10))
	}
	if r.Cgroup != "" {
		a = append(a, "-m", "cgroup", "--path", r.Cgroup)
	}
	if r.Set != "" {
		a = append(a, "-m", "set", "--match-set", r.Set, "dst")
	}
	if r.Unmarked {
		a = append(a, "-m", "mark", "--mark", fmt.Sprintf("0x0/%#x", routes.MarkMask))
	}
	if r.NewOrInvalid {
		a = append(a, "-m", "conntrack", "--ctstate", "INVALID,NEW") // as iptables-save prints it
	}
	if r.Pool.IsValid() {
		a = append(a, "-m", "comment", "--comment", periodComment(r.Pool))
	} else {
		a = append(a, "-m", "comment", "--comment", Comment)
	}
	if r.Every > 0 {
		a = append(a, "-m", "statistic", "--mode", "nth", "--every", strconv.Itoa(r.Every), "--packet", "0")
	}
	a = append(a, "-j", r.Target)
	switch r.Target {
	case "SNAT":
		to := r.ToSource.String()
		if r.ToLast.IsValid() && r.ToLast != r.ToSource {
			// A range of one address is saved as the address alone
			// (iptables-save): written so too, read back by Random.
			to += "-" + r.ToLast.String()
		}
		if !r.Ports.IsZero() {
			if r.ToSource.Is6() {
				to = "[" + to + "]"
			}
			to += ":" + r.Ports.String()
		}
		a = append(a, "--to-source", to)
		if r.Random {
			a = append(a, "--random")
		}
		if r.Persistent {
			a = append(a, "--persistent")
		}
	case "MARK":
		a = append(a, "--set-xmark", fmt.Sprintf("%#x/%#x", r.SetMark, routes.MarkMask))
	case "CONNMARK":
		m := fmt.Sprintf("%#x", routes.MarkMask)
		a = append(a, "--"+r.Connmark, "--nfmask", m, "--ctmask", m)
	}
	return a
}

func (r Rule) String() string { return strings.Join(r.Args(), " ") }

// match is the rule without what differs between the rules of one spread
// entry, or of one entry with a port range: the rules of one entry share
// it.
func (r Rule) match() Rule {
	r.Every, r.Target, r.ToSource, r.ToLast = 0, "", netip.Addr{}, netip.Addr{}
	if r.DPort == 0 {
		r.Proto = "" // a spill rule's protocol is part of its match
	}
	r.Ports = snat.Ports{}
	return r
}

// ParseRule reads a rule of the managed chain as iptables-save prints it
// (words after "-A CHAIN"). It fails for anything of another shape, or
// without our comment: such a rule is not ours.
func ParseRule(f snat.Family, spec []string) (Rule, error) {
	var r Rule
	ours := false
	mods := map[string]bool{}
	for i := 0; i < len(spec); i++ {
		w := spec[i]
		arg := func() (string, error) {
			if i+1 >= len(spec) {
				return "", fmt.Errorf("%s without a value", w)
			}
			i++
			return spec[i], nil
		}
		v := ""
		var err error
		switch w {
		case "-m":
			if v, err = arg(); err != nil {
				return r, err
			}
			switch v {
			case "addrtype", "owner", "cgroup", "set", "comment", "statistic", "mark", "conntrack", "tcp", "udp":
			default:
				return r, fmt.Errorf("match %q is not one egress-snat writes", v)
			}
			if mods[v] {
				return r, fmt.Errorf("match %q twice", v)
			}
			mods[v] = true
			continue
		case "--restore-mark", "--save-mark":
			r.Connmark = strings.TrimPrefix(w, "--")
			continue
		case "--persistent":
			r.Persistent = true
			continue
		case "--random":
			r.Random = true
			continue
		case "!":
			if i+2 >= len(spec) || spec[i+1] != "--src-type" || spec[i+2] != "LOCAL" || !mods["addrtype"] {
				return r, fmt.Errorf("negation other than ! --src-type LOCAL")
			}
			r.Forwarded = true
			i += 2
			continue
		}
		if v, err = arg(); err != nil {
			return r, err
		}
		switch w {
		case "-s":
			if r.Src, err = parsePrefix(v); err != nil {
				return r, err
			}
		case "-d":
			if r.Dst, err = parsePrefix(v); err != nil {
				return r, err
			}
		case "-o":
			r.Out = v
		case "-p":
			if v != "tcp" && v != "udp" {
				return r, fmt.Errorf("-p %q is not a protocol egress-snat writes", v)
			}
			r.Proto = v
		case "--dport":
			n, err := strconv.ParseUint(v, 10, 16)
			if err != nil || n == 0 || r.Proto == "" || !mods[r.Proto] {
				return r, fmt.Errorf("--dport %q outside -p tcp|udp -m tcp|udp", v)
			}
			r.DPort = uint16(n)
		case "--uid-owner":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil || !mods["owner"] {
				return r, fmt.Errorf("--uid-owner %q", v)
			}
			r.HasUID, r.UID = true, uint32(n)
		case "--path":
			if !mods["cgroup"] {
				return r, fmt.Errorf("--path outside -m cgroup")
			}
			r.Cgroup = v
		case "--match-set":
			dir, err := arg()
			if err != nil || dir != "dst" || !mods["set"] {
				return r, fmt.Errorf("--match-set %s %s", v, dir)
			}
			r.Set = v
		case "--comment":
			ours = v == Comment
			if p, ok := parsePeriodComment(v); ok {
				ours, r.Pool = true, p
			}
		case "--mark":
			if !mods["mark"] || v != fmt.Sprintf("0x0/%#x", routes.MarkMask) {
				return r, fmt.Errorf("--mark %q", v)
			}
			r.Unmarked = true
		case "--nfmask", "--ctmask":
			if v != fmt.Sprintf("%#x", routes.MarkMask) {
				return r, fmt.Errorf("%s %q", w, v)
			}
		case "--set-xmark":
			val, mask, _ := strings.Cut(v, "/")
			n, err := strconv.ParseUint(val, 0, 32)
			if err != nil || mask != fmt.Sprintf("%#x", routes.MarkMask) {
				return r, fmt.Errorf("--set-xmark %q", v)
			}
			r.SetMark = uint32(n)
		case "--ctstate":
			// iptables-save orders the states its own way.
			if !mods["conntrack"] || (v != "NEW,INVALID" && v != "INVALID,NEW") {
				return r, fmt.Errorf("--ctstate %q", v)
			}
			r.NewOrInvalid = true
		case "--mode":
			if v != "nth" {
				return r, fmt.Errorf("statistic mode %q", v)
			}
		case "--every":
			if r.Every, err = strconv.Atoi(v); err != nil || r.Every < 2 {
				return r, fmt.Errorf("--every %q", v)
			}
		case "--packet":
			if v != "0" {
				return r, fmt.Errorf("--packet %q", v)
			}
		case "-j":
			r.Target = v
		case "--to-source":
			ts, err := parseToSource(v)
			if err != nil {
				return r, err
			}
			// A range is a pool's (IPv6, see pool.go); readInstalled
			// checks it is one.
			if ts.To.IsValid() && (!ts.From.Is6() || !ts.To.Is6() || ts.To.Compare(ts.From) < 0 || ts.HasPorts) {
				return r, fmt.Errorf("--to-source %s: a range egress-snat does not write", v)
			}
			if ts.HasPorts && ts.Ports.Lo == 0 {
				return r, fmt.Errorf("--to-source %s: port 0", v)
			}
			r.ToSource, r.ToLast = ts.From, ts.To
			r.Ports = snat.Ports{Lo: ts.Ports.Lo, Hi: ts.Ports.Hi}
		default:
			return r, fmt.Errorf("option %q is not one egress-snat writes", w)
		}
	}
	if r.Target == "CONNMARK" {
		if !ours || r.Connmark == "" || r.Src.IsValid() || r.Dst.IsValid() || r.Out != "" || r.HasUID || r.Cgroup != "" || r.Forwarded || r.Set != "" {
			return r, fmt.Errorf("a CONNMARK rule egress-snat does not write")
		}
		return r, nil
	}
	switch {
	case !ours:
		return r, fmt.Errorf("no %q comment", Comment)
	case !r.Src.IsValid() || r.Out == "" && r.Target != "MARK" && r.Target != "RETURN":
		return r, fmt.Errorf("no -s or -o")
	case snat.FamilyOf(r.Src.Addr()) != f || r.Dst.IsValid() && snat.FamilyOf(r.Dst.Addr()) != f:
		return r, fmt.Errorf("address of the other family")
	case r.Forwarded && (r.HasUID || r.Cgroup != ""):
		return r, fmt.Errorf("a forwarded-traffic rule with a socket match")
	case !r.Forwarded && !r.Src.IsSingleIP():
		return r, fmt.Errorf("a local-traffic rule whose -s is not one address")
	case r.HasUID && r.Cgroup != "":
		return r, fmt.Errorf("both a uid and a cgroup match")
	case r.Target == "RETURN" && r.Out != "" && !r.ToSource.IsValid() && r.Every == 0 && !r.Forwarded:
	case r.Target == "SNAT" && r.ToSource.IsValid() && snat.FamilyOf(r.ToSource) == f:
	case r.Target == "MARK" && r.SetMark != 0 && r.Out == "":
	case r.Target == "RETURN" && r.Out == "":
	case r.Target == "DROP" && r.NewOrInvalid && r.Out != "" && r.Forwarded && r.Every == 0:
	default:
		return r, fmt.Errorf("target %q is not one egress-snat writes", r.Target)
	}
	if r.Set != "" && r.Dst.IsValid() {
		return r, fmt.Errorf("both -d and a set")
	}
	if (r.Proto != "") != (!r.Ports.IsZero() || r.DPort != 0) || r.Proto != "" && r.Target != "SNAT" {
		return r, fmt.Errorf("-p without a --to-source port range or --dport, or a port range without -p: egress-snat writes them together")
	}
	if (mods["tcp"] || mods["udp"]) && r.DPort == 0 {
		return r, fmt.Errorf("-m tcp|udp without --dport")
	}
	if r.Random && r.Target == "SNAT" && r.ToSource.IsValid() && !r.ToLast.IsValid() {
		r.ToLast = r.ToSource // a range of one address, as iptables-save prints it
	}
	if r.Pool.IsValid() && (r.Target != "SNAT" || r.ToLast.IsValid() || r.Every > 0 || r.Proto != "" || !snat.InPool(r.Pool, r.ToSource)) {
		return r, fmt.Errorf("a period's comment on a rule that is not SNAT to one address of its pool %s", r.Pool)
	}
	if r.Persistent && (r.Target != "SNAT" || !r.ToLast.IsValid()) {
		return r, fmt.Errorf("--persistent outside a --to-source range")
	}
	if r.Random != (r.Target == "SNAT" && r.ToLast.IsValid()) {
		return r, fmt.Errorf("a --to-source range without --random, or --random without one: egress-snat writes --random on its ranges alone")
	}
	return r, nil
}

// Sender is the sender a rule selects.
func (r Rule) Sender() snat.Sender {
	switch {
	case r.Forwarded:
		return snat.From(r.Src)
	case r.HasUID:
		return snat.UID(r.UID)
	case r.Cgroup != "":
		return snat.Cgroup(r.Cgroup)
	}
	return snat.Host()
}

// natural is the natural source a local-traffic rule matches.
func (r Rule) natural() netip.Addr {
	if r.Forwarded {
		return netip.Addr{}
	}
	return r.Src.Addr()
}

// rulesFor renders the rules of one entry, with the destination matched by
// dst (a prefix) or by the set named set.
// Spreading over n addresses uses n rules with the statistic match in nth
// mode: rule i takes every (n-i)th of the connections still unclaimed, so
// new connections go round-robin. A --to-source range would not do: the
// kernel picks an address of a range by hashing source and destination, so
// one client talking to one server would always get the same address.
func rulesFor(e snat.Entry, set string) []Rule {
	base := Rule{Out: e.Out, Set: set}
	if set == "" && e.Dst.Bits() > 0 {
		base.Dst = e.Dst
	}
	switch s := e.Sender; s.Kind {
	case snat.SenderFrom:
		base.Src, base.Forwarded = s.From, true
	default:
		base.Src = hostPrefix(e.Natural)
		base.HasUID, base.UID = s.Kind == snat.SenderUID, s.UID
		if s.Kind == snat.SenderCgroup {
			base.Cgroup = s.Cgroup
		}
	}
	if e.Keep() {
		base.Target = "RETURN"
		return []Rule{base}
	}
	if e.Sticky == snat.StickyPeriod {
		// A period without its address (MakePlan always gives one)
		// renders an invalid --to-source, which iptables-restore
		// refuses, changing nothing: never a pool of another kind.
		base.Target, base.Pool = "SNAT", e.Pool
		if len(e.To) == 1 {
			base.ToSource = e.To[0]
		}
		return []Rule{base}
	}
	if e.IsPool() {
		ranges, persistent := poolRanges(e.Pool, e.Sticky)
		out := make([]Rule, 0, len(ranges))
		n := len(ranges)
		for i, rg := range ranges {
			r := base
			if i < n-1 {
				r.Every = n - i
			}
			r.Target, r.ToSource, r.ToLast, r.Random, r.Persistent = "SNAT", rg.lo, rg.hi, true, persistent
			out = append(out, r)
		}
		return out
	}
	// With a port range, the entry's rules once for each protocol with
	// ports, then once without for the rest (see snat.Ports). A spill
	// entry's are for its one protocol and port.
	protos := []string{""}
	switch {
	case e.IsSpill():
		protos = []string{e.Proto}
		base.DPort = e.DPort
	case !e.Ports.IsZero():
		protos = append(slices.Clone(snat.PortProtocols), "")
	}
	out := make([]Rule, 0, len(protos)*len(e.To))
	n := len(e.To)
	for _, proto := range protos {
		for i, to := range e.To {
			r := base
			if i < n-1 {
				r.Every = n - i
			}
			r.Target, r.ToSource = "SNAT", to
			if proto != "" {
				r.Proto, r.Ports = proto, e.Ports
			}
			out = append(out, r)
		}
	}
	return out
}
