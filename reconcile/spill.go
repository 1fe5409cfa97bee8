package reconcile

import (
	"cmp"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/snat"
	"github.com/egress-snat/egress-snat/stats"
)

// The spill-over of rules with spill (see snat/spill.go): on each tick the
// daemon counts, from conntrack, the flows of each spill rule per
// (translated address, destination, destination port, protocol), each of
// which holds one source port of the address until conntrack forgets it; an address whose busiest
// tuple passes snat.SpillHigh of the rule's port range is busy until it
// falls below snat.SpillLow. While an address the rule gives is busy
// toward a tuple, a spill entry for the tuple sends new connections to the
// rule's addresses that are not. The spill entries are part of the desired
// state the daemon writes and its canary keeps.
//
// Nothing of it is kept on disk: a daemon that starts reads conntrack
// again, and takes the spill entries it finds installed as the tuples it
// had found busy, so that a restart keeps a spill whose tuple is between
// the two thresholds instead of ending it.

// spillKey is one tuple of one spill rule.
type spillKey struct {
	Rule  snat.Match
	Dst   netip.Addr
	Proto string
	DPort uint16
}

func (k spillKey) String() string {
	return netip.AddrPortFrom(k.Dst, k.DPort).String() + "/" + k.Proto
}

// spiller holds the busy addresses of each tuple and the spill entries
// they give.
type spiller struct {
	flows conntrack.Table
	log   *slog.Logger
	// every is how often conntrack is read (see tick), last when.
	every time.Duration
	last  time.Time
	// rules are the spill rules of the base they were taken from (by its
	// array and length: a base is never changed in place, only replaced),
	// indexed by destination.
	rules   spillIndex
	rulesOf *snat.Entry
	rulesN  int
	// busy is, per tuple, the addresses found busy toward it.
	busy map[spillKey]map[netip.Addr]bool
	// active are the spill entries in force, by tuple.
	active map[spillKey]snat.Entry
	// seeded says the installed spill entries were taken as busy once.
	seeded bool
	// stuck are the tuples whose every address is busy, said once.
	stuck map[spillKey]bool
}

// spillIndex is the spill rules of a base, in chain order, and where to
// look them up by destination: a rule with a dst-file of 100,000
// destinations is 100,000 entries, and each flow of a busy host must find
// its own without trying them all.
type spillIndex struct {
	list []snat.Entry
	// lens are the prefix lengths of list's destinations, by family;
	// byDst the positions in list of each destination.
	lens  map[bool][]int // keyed by Is4
	byDst map[netip.Prefix][]int
}

// spillRules indexes the entries of base that spill.
func spillRules(base []snat.Entry) spillIndex {
	x := spillIndex{lens: map[bool][]int{}, byDst: map[netip.Prefix][]int{}}
	for _, e := range base {
		if len(e.Spill) > 0 && !e.IsSpill() && !e.Routed && !e.Keep() && !e.IsPool() {
			x.list = append(x.list, e)
		}
	}
	snat.SortEntries(x.list)
	for i, e := range x.list {
		v4 := e.Dst.Addr().Is4()
		if !slices.Contains(x.lens[v4], e.Dst.Bits()) {
			x.lens[v4] = append(x.lens[v4], e.Dst.Bits())
		}
		x.byDst[e.Dst] = append(x.byDst[e.Dst], i)
	}
	return x
}

// find returns the first rule in chain order that takes a flow from src
// to dst translated to to: its destination holds dst, its sender src
// (the natural source for the host's own traffic), and its list to.
// Nil: none.
func (x *spillIndex) find(src, dst, to netip.Addr) *snat.Entry {
	best := -1
	for _, bits := range x.lens[dst.Is4()] {
		p, err := dst.Prefix(bits)
		if err != nil {
			continue
		}
		for _, i := range x.byDst[p] {
			r := &x.list[i]
			if best >= 0 && i > best || !slices.Contains(r.Spill, to) {
				continue
			}
			if r.Sender.Local() && r.Natural != src || !r.Sender.Local() && !r.Sender.From.Contains(src) {
				continue
			}
			best = i
		}
	}
	if best < 0 {
		return nil
	}
	return &x.list[best]
}

// of returns the spill rules of base, indexed once per base.
func (s *spiller) of(base []snat.Entry) *spillIndex {
	if p := unsafe.SliceData(base); p != s.rulesOf || len(base) != s.rulesN || s.rules.byDst == nil {
		s.rules, s.rulesOf, s.rulesN = spillRules(base), p, len(base)
	}
	return &s.rules
}

// seed takes the spill entries installed (a previous daemon's) as busy
// tuples: the addresses of their rule that they do not give were busy.
func (s *spiller) seed(installed, base []snat.Entry) {
	if s.seeded {
		return
	}
	s.seeded = true
	rules := s.of(base).list
	for _, e := range installed {
		if !e.IsSpill() {
			continue
		}
		p := snat.SpillParent(rules, e)
		if p == nil {
			continue
		}
		k := spillKey{Rule: p.Match, Dst: e.Dst.Addr(), Proto: e.Proto, DPort: e.DPort}
		for _, a := range p.Spill {
			if !slices.Contains(e.To, a) {
				s.mark(k, a)
			}
		}
	}
}

func (s *spiller) mark(k spillKey, a netip.Addr) {
	if s.busy == nil {
		s.busy = map[spillKey]map[netip.Addr]bool{}
	}
	if s.busy[k] == nil {
		s.busy[k] = map[netip.Addr]bool{}
	}
	s.busy[k][a] = true
}

// count reads conntrack and counts the TCP and UDP flows of each
// tuple of rules, by the address they were translated to. A flow belongs
// to the first rule in chain order that takes its sender and destination
// and has its address in its list: flows on a spill entry's addresses
// count for the rule they spill from. Its cost is the host's flows times
// the prefix lengths of the spill rules' destinations, paid only while a
// rule spills, once every s.every.
func (s *spiller) count(x *spillIndex) (map[spillKey]map[netip.Addr]int, error) {
	out := map[spillKey]map[netip.Addr]int{}
	fams := map[int]bool{4: len(x.lens[true]) > 0, 6: len(x.lens[false]) > 0}
	for _, fam := range []int{4, 6} {
		if !fams[fam] {
			continue
		}
		flows, err := s.flows.Flows(fam)
		if err != nil {
			return nil, err
		}
		for _, f := range flows {
			// Every flow, ended ones too: a TCP connection in TIME_WAIT
			// holds its port until conntrack forgets it (stats counts
			// so too).
			if f.Orig.Proto != conntrack.TCP && f.Orig.Proto != conntrack.UDP {
				continue
			}
			to, src, dst := f.TranslatedSource().Addr(), f.Orig.Src.Addr(), f.Orig.Dst
			if to == src {
				continue // not translated
			}
			r := x.find(src, dst.Addr(), to)
			if r == nil {
				continue
			}
			k := spillKey{Rule: r.Match, Dst: dst.Addr(), Proto: conntrack.ProtoName(f.Orig.Proto), DPort: dst.Port()}
			if out[k] == nil {
				out[k] = map[netip.Addr]int{}
			}
			out[k][to]++
		}
	}
	return out, nil
}

// portRange is how many source ports an address of e has per tuple: its
// --to-ports range, else the kernel's (stats.DefaultPortRange).
func portRange(e snat.Entry) int {
	if !e.Ports.IsZero() {
		return e.Ports.Size()
	}
	return stats.DefaultPortRange.Size()
}

// sample counts the tuples of base's spill rules and updates the busy
// addresses and the spill entries, logging one line per spill that starts,
// changes or ends. It reports whether the spill entries changed.
func (s *spiller) sample(base []snat.Entry) (bool, error) {
	x := s.of(base)
	rules := x.list
	var counts map[spillKey]map[netip.Addr]int
	if len(rules) > 0 {
		var err error
		if counts, err = s.count(x); err != nil {
			return false, err
		}
	}
	byMatch := map[snat.Match]*snat.Entry{}
	for i := range rules {
		byMatch[rules[i].Match] = &rules[i]
	}
	keys := map[spillKey]bool{}
	for k := range counts {
		keys[k] = true
	}
	for k := range s.busy {
		keys[k] = true
	}
	next := map[spillKey]snat.Entry{}
	stuck := map[spillKey]bool{}
	for k := range keys {
		r := byMatch[k.Rule]
		if r == nil {
			delete(s.busy, k) // the rule is gone, or no longer spills
			continue
		}
		size := portRange(*r)
		busy := map[netip.Addr]bool{}
		for _, a := range r.Spill {
			use := float64(counts[k][a]) / float64(size)
			if use >= snat.SpillHigh || s.busy[k][a] && use >= snat.SpillLow {
				busy[a] = true
			}
		}
		if len(busy) == 0 {
			delete(s.busy, k)
			continue
		}
		if s.busy == nil {
			s.busy = map[spillKey]map[netip.Addr]bool{}
		}
		s.busy[k] = busy
		if !slices.ContainsFunc(r.To, func(a netip.Addr) bool { return busy[a] }) {
			continue // what the rule gives is not busy: nothing to spill
		}
		var to []netip.Addr
		for _, a := range r.Spill {
			if !busy[a] {
				to = append(to, a)
			}
		}
		if len(to) == 0 {
			stuck[k] = true
			if !s.stuck[k] {
				s.log.Warn("spill: every address of the rule is busy toward the destination; new connections there may fail",
					"rule", r.Match.String(), "dst", k.String(), "busy", addrs(r.Spill))
			}
			continue
		}
		next[k] = snat.SpillEntry(*r, k.Dst, k.Proto, k.DPort, to)
	}
	s.stuck = stuck
	changed := false
	for _, k := range slices.SortedFunc(maps.Keys(next), compareKeys) {
		e, was := next[k], s.active[k]
		switch {
		case was.DPort == 0:
			s.log.Info("spill started", "rule", k.Rule.String(), "dst", k.String(), "busy", addrs(busyOf(s.busy[k])), "in_use", inUse(counts[k]), "range", portRange(*byMatch[k.Rule]), "to", addrs(e.To))
			changed = true
		case !slices.Equal(was.To, e.To):
			s.log.Info("spill moved", "rule", k.Rule.String(), "dst", k.String(), "busy", addrs(busyOf(s.busy[k])), "to", addrs(e.To))
			changed = true
		}
	}
	for _, k := range slices.SortedFunc(maps.Keys(s.active), compareKeys) {
		if _, ok := next[k]; !ok {
			s.log.Info("spill ended", "rule", k.Rule.String(), "dst", k.String(), "in_use", inUse(counts[k]))
			changed = true
		}
	}
	s.active = next
	return changed, nil
}

// entries are the spill entries in force, in a stable order.
func (s *spiller) entries() []snat.Entry {
	out := make([]snat.Entry, 0, len(s.active))
	for _, k := range slices.SortedFunc(maps.Keys(s.active), compareKeys) {
		out = append(out, s.active[k])
	}
	return out
}

func compareKeys(a, b spillKey) int {
	return cmp.Or(strings.Compare(a.Rule.String(), b.Rule.String()), strings.Compare(a.Rule.Out, b.Rule.Out),
		a.Dst.Compare(b.Dst), strings.Compare(a.Proto, b.Proto), cmp.Compare(a.DPort, b.DPort))
}

func busyOf(m map[netip.Addr]bool) []netip.Addr {
	out := slices.Collect(maps.Keys(m))
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

func inUse(m map[netip.Addr]int) string {
	var b []string
	for _, a := range slices.SortedFunc(maps.Keys(m), netip.Addr.Compare) {
		b = append(b, a.String()+"="+strconv.Itoa(m[a]))
	}
	return strings.Join(b, ",")
}

func addrs(as []netip.Addr) string { return snat.Entry{To: as}.ToString() }

// withSpill is base with the spill entries in force whose rule it still
// has, as the desired state to write; base itself is not changed.
func (s *spiller) withSpill(base []snat.Entry) []snat.Entry {
	if len(s.active) == 0 {
		return base
	}
	rules := s.of(base).list
	out := slices.Clip(base)
	for _, e := range s.entries() {
		if snat.SpillParent(rules, e) != nil {
			out = append(out, e)
		}
	}
	return out
}

// tick samples the spill rules of base, when there are any or a spill is
// in force, at most once every s.every (the daemon's canary ticks more
// often, and a dump of a busy host's conntrack table is not free), and
// reports whether the spill entries changed.
func (s *spiller) tick(base []snat.Entry) bool {
	if len(s.active) == 0 && len(s.busy) == 0 && len(s.of(base).list) == 0 {
		return false
	}
	now := time.Now()
	if now.Sub(s.last) < s.every {
		return false
	}
	s.last = now
	changed, err := s.sample(base)
	if err != nil {
		s.log.Warn("spill: reading conntrack failed; spill entries kept as they are", "err", err)
	}
	return changed
}
