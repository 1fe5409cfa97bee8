package lab

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Move is one move of the egress role from one gateway to the other, as
// the far side saw it (the Sniffer on R's uplink) and the clients lived it
// (the Load).
type Move struct {
	Scenario string
	From, To string // gateway names
	// Event is when the test caused the move (the kill, the drain...).
	Event time.Time

	// Existing is, per long-lived connection kept, the time from its last
	// packet through From to its first through To; Conns counts the
	// connections, Moved those of Existing.
	Existing     []time.Duration
	Conns, Moved int
	// Kept counts the long-lived connections that had no error and were
	// still getting echoes when the load stopped; Failed describes each
	// one that was not.
	Kept   int
	Failed []string
	// NewBlackout is from the last new connection's SYN through From to the
	// first through To; 0 if either is missing. NewFailed counts new
	// connections that failed (they are retried by nobody).
	NewBlackout time.Duration
	NewFailed   int
	// UDPBlackout is the same for the UDP flow.
	UDPBlackout time.Duration
	// Recovered is how long after Event every connection that had not
	// failed was echoing again, as the clients saw it; 0 if they never
	// all did.
	Recovered time.Duration

	// Sources counts the packets towards the far side per source address
	// and gateway, from a second before Event on.
	Sources map[string]int
	// Leaks are the packets whose source is not the egress address.
	Leaks []Packet
	// Orphans are the leaks that are mid-connection TCP packets (no SYN)
	// of a connection the other gateway's conntrack opened: after a split
	// brain heals, a connection opened on the other master just before
	// can send its next packets through this one before conntrackd
	// brought its entry over. The kernel translates no packet it cannot
	// track, so such a packet leaves with the client's source. A subset
	// of Leaks.
	Orphans []Packet
	// CaptureDrops is what the capture socket dropped: if not 0, the
	// counts above are incomplete.
	CaptureDrops uint32
	// GuardDrops is, with HAOptions.LeakGuard, how many packets the guard
	// dropped during the move on each gateway: packets that would have
	// leaked (set by the caller, which reads the counters around the move).
	GuardDrops map[string]int
	// Timeline is both gateways' hook steps and egress-snat reconciles
	// around the move, and the leaks, relative to Event.
	Timeline []Event
}

// ExistingMax and ExistingMedian summarise Existing; 0 when empty.
func (m Move) ExistingMax() time.Duration {
	if len(m.Existing) == 0 {
		return 0
	}
	return slices.Max(m.Existing)
}

func (m Move) ExistingMedian() time.Duration { return Median(m.Existing) }

// Median returns the median of ds (the mean of the middle two for an even
// count), 0 for none.
func Median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Measure judges one move from the capture, the load's final snapshot and
// the gateways' logs. recovered is when the load was flowing again (every
// connection that had not failed echoed after the move). ct are conntrack events of the
// gateways (WatchConntrack); those of the leaked flows go into the
// timeline.
func (h *HA) Measure(scenario string, from, to *Gateway, event, recovered time.Time, pkts []Packet, st LoadStats, ct []Event) Move {
	vip := HAEgressVIP.Addr()
	m := Move{Scenario: scenario, From: from.Name, To: to.Name, Event: event, Sources: map[string]int{}}
	if !recovered.IsZero() {
		m.Recovered = recovered.Sub(event)
	}
	m.CaptureDrops = h.Sniffer.Dropped()

	type flowKey struct {
		proto uint8
		port  uint16 // the translated source port (the egress address's)
		dport uint16
	}
	type span struct{ lastFrom, firstTo time.Time }
	flows := map[flowKey]*span{}
	var newSyn span
	via := func(p *Packet) *Gateway { return h.Gateway(p.SrcMAC) }
	for i := range pkts {
		p := &pkts[i]
		if p.At.Before(event.Add(-time.Second)) {
			continue
		}
		g := via(p)
		gname := "?"
		if g != nil {
			gname = g.Name
		}
		m.Sources[p.Src.String()+" via "+gname]++
		if p.Src != vip {
			m.Leaks = append(m.Leaks, *p)
			continue
		}
		// A packet through From counts until the first through To; one
		// through To counts from the event on.
		update := func(s *span) {
			switch {
			case g == from && (s.firstTo.IsZero() || p.At.Before(s.firstTo)):
				s.lastFrom = p.At
			case g == to && !p.At.Before(event) && s.firstTo.IsZero():
				s.firstTo = p.At
			}
		}
		switch {
		case p.Proto == unix.IPPROTO_TCP && p.DstPort == HAEchoPort:
			k := flowKey{p.Proto, p.SrcPort, p.DstPort}
			if flows[k] == nil {
				flows[k] = &span{}
			}
			update(flows[k])
		case p.Proto == unix.IPPROTO_UDP && p.DstPort == HAUDPPort:
			k := flowKey{p.Proto, p.SrcPort, p.DstPort}
			if flows[k] == nil {
				flows[k] = &span{}
			}
			update(flows[k])
		case p.Proto == unix.IPPROTO_TCP && p.DstPort == HANewPort && p.TCPFlags&(TCPSyn|TCPAck) == TCPSyn:
			update(&newSyn)
		}
	}
	if !newSyn.firstTo.IsZero() && !newSyn.lastFrom.IsZero() {
		m.NewBlackout = newSyn.firstTo.Sub(newSyn.lastFrom)
	}
	for k, s := range flows {
		if k.proto == unix.IPPROTO_UDP && !s.firstTo.IsZero() && !s.lastFrom.IsZero() {
			m.UDPBlackout = s.firstTo.Sub(s.lastFrom)
		}
	}

	m.Conns = len(st.Conns)
	traced := map[string]bool{} // the first few lost connections' conntrack events go into the timeline
	for _, c := range st.Conns {
		// Kept: no error, and echoes until the end. A connection the
		// gateways translated to another port than before is not one
		// TCP can keep (the far side resets it), so it shows as an error.
		kept := c.Err == nil && c.LastEcho.After(event) && st.At.Sub(c.LastEcho) < time.Second
		if !kept && len(traced) < 3 {
			traced[fmt.Sprintf("src=%s dst=%s sport=%d dport=%d ", c.Local.Addr(), HAFar, c.Local.Port(), HAEchoPort)] = true
		}
		switch {
		case c.Err != nil:
			m.Failed = append(m.Failed, fmt.Sprintf("%s: %v at %+.3fs", c.Local, c.Err, c.ErrAt.Sub(event).Seconds()))
		case !kept:
			m.Failed = append(m.Failed, fmt.Sprintf("%s: no echo since %+.3fs (the load stopped at %+.3fs)",
				c.Local, c.LastEcho.Sub(event).Seconds(), st.At.Sub(event).Seconds()))
		default:
			m.Kept++
			// Its packets carry its own port on the far side when the
			// translation kept the port, which it does unless two clients
			// collide; a kept connection whose port was changed is left
			// out of the blackout figures.
			if s := flows[flowKey{unix.IPPROTO_TCP, c.Local.Port(), HAEchoPort}]; s != nil && !s.firstTo.IsZero() && !s.lastFrom.IsZero() {
				m.Existing = append(m.Existing, s.firstTo.Sub(s.lastFrom))
			}
		}
	}
	m.Moved = len(m.Existing)
	for _, n := range st.New {
		if n.Err != nil && n.Start.After(event.Add(-time.Second)) {
			m.NewFailed++
		}
	}

	for _, g := range []*Gateway{h.A, h.B} {
		for _, e := range g.Events() {
			if e.At.After(event.Add(-2*time.Second)) && e.At.Before(event.Add(30*time.Second)) {
				m.Timeline = append(m.Timeline, e)
			}
		}
	}
	leaked := traced
	for _, p := range m.Leaks {
		leaked[fmt.Sprintf("src=%s dst=%s sport=%d dport=%d ", p.Src, p.Dst, p.SrcPort, p.DstPort)] = true
	}
	for _, e := range ct {
		if e.At.Before(event.Add(-200*time.Millisecond)) || e.At.After(event.Add(5*time.Second)) {
			continue
		}
		for k := range leaked {
			if strings.Contains(e.What+" ", k) {
				m.Timeline = append(m.Timeline, e)
				break
			}
		}
	}
	for _, p := range m.Leaks {
		g := via(&p)
		name := "?"
		if g != nil {
			name = g.Name
		}
		m.Timeline = append(m.Timeline, Event{At: p.At, Node: name, What: "LEAK " + describe(p)})
		if p.Proto == unix.IPPROTO_TCP && p.TCPFlags&TCPSyn == 0 && openedElsewhere(ct, name, p) {
			m.Orphans = append(m.Orphans, p)
		}
	}
	slices.SortStableFunc(m.Timeline, func(a, b Event) int { return a.At.Compare(b.At) })
	return m
}

// openedElsewhere reports whether a gateway other than node saw p's
// connection open (a conntrack NEW event for its original tuple).
func openedElsewhere(ct []Event, node string, p Packet) bool {
	key := fmt.Sprintf("src=%s dst=%s sport=%d dport=%d ", p.Src, p.Dst, p.SrcPort, p.DstPort)
	for _, e := range ct {
		if e.Node != node && strings.Contains(e.What, "[NEW]") && strings.Contains(e.What+" ", key) {
			return true
		}
	}
	return false
}

func describe(p Packet) string {
	proto := map[uint8]string{unix.IPPROTO_TCP: "tcp", unix.IPPROTO_UDP: "udp", unix.IPPROTO_ICMP: "icmp"}[p.Proto]
	if proto == "" {
		proto = fmt.Sprint(p.Proto)
	}
	s := fmt.Sprintf("%s %s:%d -> %s:%d", proto, p.Src, p.SrcPort, p.Dst, p.DstPort)
	if p.Proto == unix.IPPROTO_TCP {
		var f []string
		for _, b := range []struct {
			bit  uint8
			name string
		}{{TCPSyn, "SYN"}, {TCPAck, "ACK"}, {TCPFin, "FIN"}, {TCPRst, "RST"}} {
			if p.TCPFlags&b.bit != 0 {
				f = append(f, b.name)
			}
		}
		s += " [" + strings.Join(f, ",") + "]"
	}
	return s
}

// Summary is one line for a log or a report.
func (m Move) Summary() string {
	s := fmt.Sprintf("%s %s->%s: existing blackout median %s max %s (%d of %d measured), kept %d/%d (all flowing after %s), new %s (%d failed), UDP %s, leaked %d, capture drops %d",
		m.Scenario, m.From, m.To, ms(m.ExistingMedian()), ms(m.ExistingMax()), m.Moved, m.Conns,
		m.Kept, m.Conns, ms(m.Recovered), ms(m.NewBlackout), m.NewFailed, ms(m.UDPBlackout), len(m.Leaks), m.CaptureDrops)
	if m.GuardDrops != nil {
		s += fmt.Sprintf(", leak guard dropped a:%d b:%d", m.GuardDrops["a"], m.GuardDrops["b"])
	}
	return s
}

// Details is the move's timeline, sources and failures, for a log.
func (m Move) Details() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sources (packets towards the far side from 1s before the event):\n")
	keys := make([]string, 0, len(m.Sources))
	for k := range m.Sources {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "  %-28s %d\n", k, m.Sources[k])
	}
	for _, f := range m.Failed {
		fmt.Fprintf(&b, "  lost: %s\n", f)
	}
	fmt.Fprintf(&b, "timeline (seconds from the event):\n")
	for _, e := range m.Timeline {
		fmt.Fprintf(&b, "  %+8.3f %s %s\n", e.At.Sub(m.Event).Seconds(), e.Node, e.What)
	}
	return b.String()
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }
