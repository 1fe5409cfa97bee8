package pending

import (
	"encoding/json"
	"fmt"
	"net/netip"

	"github.com/egress-snat/egress-snat/snat"
)

// savedEntry is an snat.Entry as the record keeps it: every field, so that
// the revert re-plans exactly the entries that were installed (Entry's own
// JSON is for people and scripts and leaves some out).
type savedEntry struct {
	Sender  snat.SenderKind `json:"sender"`
	From    netip.Prefix    `json:"from,omitzero"`
	UID     uint32          `json:"uid,omitempty"`
	Cgroup  string          `json:"cgroup,omitempty"`
	Dst     netip.Prefix    `json:"dst"`
	Out     string          `json:"out"`
	Natural netip.Addr      `json:"natural,omitzero"`
	To      []netip.Addr    `json:"to,omitempty"`
	Routed  bool            `json:"routed,omitempty"`
	Via     netip.Addr      `json:"via,omitzero"`
	Replies bool            `json:"replies,omitempty"`
	Marked  bool            `json:"marked,omitempty"`
	Hold    bool            `json:"hold,omitempty"`
	Standby bool            `json:"standby,omitempty"`
	Pool    netip.Prefix    `json:"pool,omitzero"`
	Sticky  snat.Sticky     `json:"sticky,omitempty"`
	PortsLo uint16          `json:"ports_lo,omitempty"`
	PortsHi uint16          `json:"ports_hi,omitempty"`
	Proto   string          `json:"proto,omitempty"`
	DPort   uint16          `json:"dport,omitempty"`
	Spill   []netip.Addr    `json:"spill,omitempty"`
}

func encodeEntries(es []snat.Entry) ([]byte, error) {
	saved := make([]savedEntry, 0, len(es))
	for _, e := range es {
		saved = append(saved, savedEntry{
			Sender: e.Sender.Kind, From: e.Sender.From, UID: e.Sender.UID, Cgroup: e.Sender.Cgroup,
			Dst: e.Dst, Out: e.Out, Natural: e.Natural, To: e.To,
			Routed: e.Routed, Via: e.Via, Replies: e.Replies, Marked: e.Marked,
			Hold: e.Hold, Standby: e.Standby,
			Pool: e.Pool, Sticky: e.Sticky, PortsLo: e.Ports.Lo, PortsHi: e.Ports.Hi,
			Proto: e.Proto, DPort: e.DPort, Spill: e.Spill,
		})
	}
	return json.Marshal(saved)
}

func decodeEntries(b []byte) ([]snat.Entry, error) {
	var saved []savedEntry
	if err := json.Unmarshal(b, &saved); err != nil {
		return nil, fmt.Errorf("reading the pending record's entries: %w", err)
	}
	out := make([]snat.Entry, 0, len(saved))
	for _, s := range saved {
		out = append(out, snat.Entry{
			Match:   snat.Match{Sender: snat.Sender{Kind: s.Sender, From: s.From, UID: s.UID, Cgroup: s.Cgroup}, Dst: s.Dst, Out: s.Out, Proto: s.Proto, DPort: s.DPort},
			Natural: s.Natural, To: s.To,
			Routed: s.Routed, Via: s.Via, Replies: s.Replies, Marked: s.Marked,
			Hold: s.Hold, Standby: s.Standby,
			Pool: s.Pool, Sticky: s.Sticky, Ports: snat.Ports{Lo: s.PortsLo, Hi: s.PortsHi},
			Spill: s.Spill,
		})
	}
	return out, nil
}
