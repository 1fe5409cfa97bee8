package snat

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// SenderKind says whose traffic a rule chooses the source of.
type SenderKind string

const (
	// SenderHost is the host's own traffic that would leave with the
	// kernel's natural source (the article's case). It is the zero value,
	// so that a Sender has one form per meaning and compares equal.
	SenderHost SenderKind = ""
	// SenderUID is the host's own traffic of sockets owned by one uid.
	SenderUID SenderKind = "uid"
	// SenderCgroup is the host's own traffic of sockets in one cgroup v2
	// subtree (a systemd service, a container's cgroup).
	SenderCgroup SenderKind = "cgroup"
	// SenderFrom is forwarded traffic from a source prefix: containers,
	// VMs, VPN and LAN clients routed through the host.
	SenderFrom SenderKind = "from"
)

// Sender selects traffic by who sends it. The zero value is SenderHost.
// It is comparable, so a Match can key a map.
type Sender struct {
	Kind SenderKind
	// From is the source prefix of SenderFrom.
	From netip.Prefix
	// UID is the socket owner of SenderUID (0, root, is a valid uid).
	UID uint32
	// Cgroup is the cgroup v2 path of SenderCgroup, relative to the
	// cgroup2 root and without a leading slash, as -m cgroup --path takes it.
	Cgroup string
}

// Host is the sender of the host's own traffic.
func Host() Sender { return Sender{} }

// String names the kind for people and JSON: "host", "from", "uid", "cgroup".
func (k SenderKind) String() string {
	if k == SenderHost {
		return "host"
	}
	return string(k)
}

// From is the sender of traffic forwarded from p.
func From(p netip.Prefix) Sender { return Sender{Kind: SenderFrom, From: p.Masked()} }

// UID is the sender of the host's own traffic of sockets owned by uid.
func UID(uid uint32) Sender { return Sender{Kind: SenderUID, UID: uid} }

// Cgroup is the sender of the host's own traffic of sockets in path.
func Cgroup(path string) Sender {
	return Sender{Kind: SenderCgroup, Cgroup: strings.Trim(path, "/")}
}

func (s Sender) kind() SenderKind { return s.Kind }

// IsHost reports whether s is the plain host sender (destination-only rules).
func (s Sender) IsHost() bool { return s.kind() == SenderHost }

// Local reports whether s selects the host's own traffic, which leaves with
// the kernel's natural source; forwarded traffic keeps the client's.
func (s Sender) Local() bool { return s.kind() != SenderFrom }

// String renders s for people and is the form list and plans print:
// "host", "from 10.77.0.0/24", "uid 4242", "cgroup system.slice/postfix.service".
func (s Sender) String() string {
	switch s.kind() {
	case SenderFrom:
		return "from " + s.From.String()
	case SenderUID:
		return "uid " + strconv.FormatUint(uint64(s.UID), 10)
	case SenderCgroup:
		return "cgroup " + s.Cgroup
	}
	return "host"
}

// rank orders senders by precedence in the chain: the rule that names who
// sends is more specific than one naming only the destination, so it comes
// first. Forwarded (from) and local traffic never match each other's rules,
// so their relative order only keeps rendering deterministic. A cgroup (a
// service) is narrower than a uid (a user who may run many services).
func (s Sender) rank() int {
	switch s.kind() {
	case SenderFrom:
		return 0
	case SenderCgroup:
		return 1
	case SenderUID:
		return 2
	}
	return 3
}

// compare orders senders of one rank: longer --from prefixes and deeper
// cgroups first, since they are the more specific match.
func (s Sender) compare(o Sender) int {
	if d := s.rank() - o.rank(); d != 0 {
		return d
	}
	switch s.kind() {
	case SenderFrom:
		if d := o.From.Bits() - s.From.Bits(); d != 0 {
			return d
		}
		return s.From.Addr().Compare(o.From.Addr())
	case SenderUID:
		return cmpInt(int64(s.UID), int64(o.UID))
	case SenderCgroup:
		if d := strings.Count(o.Cgroup, "/") - strings.Count(s.Cgroup, "/"); d != 0 {
			return d
		}
		return strings.Compare(s.Cgroup, o.Cgroup)
	}
	return 0
}

// Contains reports whether every packet o selects is also selected by s:
// the host sender contains every local sender, a --from prefix its
// sub-prefixes, and a cgroup its descendants (the kernel's cgroup match
// matches a whole subtree).
func (s Sender) Contains(o Sender) bool {
	switch s.kind() {
	case SenderHost:
		return o.Local()
	case SenderFrom:
		return o.kind() == SenderFrom && s.From.Bits() <= o.From.Bits() && s.From.Contains(o.From.Addr())
	case SenderUID:
		return o.kind() == SenderUID && o.UID == s.UID
	case SenderCgroup:
		return o.kind() == SenderCgroup && (o.Cgroup == s.Cgroup || strings.HasPrefix(o.Cgroup, s.Cgroup+"/"))
	}
	return false
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Match is an entry's identity: who sends, where to, and by which
// interface. Two entries with different matches coexist, even for one
// destination.
type Match struct {
	Sender Sender
	Dst    netip.Prefix
	Out    string
	// Proto ("tcp" or "udp") and DPort narrow the match to one
	// destination port: only a spill entry has them (see spill.go), which
	// the watch daemon installs while an address runs out of source ports
	// toward Dst's port. Zero for every rule an operator writes.
	Proto string
	DPort uint16
}

// IsSpill reports whether the match is a spill entry's: one destination
// port of one protocol.
func (m Match) IsSpill() bool { return m.DPort != 0 }

func (m Match) String() string {
	s := m.Dst.String()
	if m.IsSpill() {
		s += " " + m.Proto + "/" + strconv.Itoa(int(m.DPort))
	}
	if !m.Sender.IsHost() {
		s = m.Sender.String() + " to " + s
	}
	return s
}

// Packet is what decides a new connection's source in the chain: what
// Effective evaluates.
type Packet struct {
	Dst netip.Addr
	Out string
	// Src is the packet's source before NAT: the natural source for local
	// traffic, the client's address for forwarded traffic.
	Src       netip.Addr
	Forwarded bool
	// UID and Cgroup describe the sending socket of local traffic; HasUID
	// says whether UID is known.
	HasUID bool
	UID    uint32
	Cgroup string
}

// matches reports whether the entry's rule matches p.
func (e Entry) matches(p Packet) bool {
	if e.Out != p.Out || !e.Dst.Contains(p.Dst) || e.IsSpill() {
		return false
	}
	s := e.Sender
	if !s.Local() {
		return p.Forwarded && s.From.Contains(p.Src)
	}
	if p.Forwarded || e.Natural != p.Src {
		return false
	}
	switch s.kind() {
	case SenderUID:
		return p.HasUID && p.UID == s.UID
	case SenderCgroup:
		return p.Cgroup != "" && s.Contains(Cgroup(p.Cgroup))
	}
	return true
}

// ParseCgroupPath checks a cgroup v2 path as --cgroup and the file take it.
func ParseCgroupPath(s string) (string, error) {
	p := strings.Trim(s, "/")
	if p == "" {
		return "", fmt.Errorf("cgroup path %q is empty; want a path like system.slice/postfix.service", s)
	}
	for _, part := range strings.Split(p, "/") {
		if part == "" || part == "." || part == ".." {
			return "", fmt.Errorf("cgroup path %q: want a plain path below the cgroup2 root, without empty, '.' or '..' parts", s)
		}
	}
	for _, c := range p {
		if c <= ' ' || c == '"' || c == '\\' || c == '\'' || c > '~' {
			return "", fmt.Errorf("cgroup path %q: only printable ASCII without blanks or quotes is accepted", s)
		}
	}
	if len(p) > 4095 {
		return "", fmt.Errorf("cgroup path of %d bytes is longer than the kernel's 4095", len(p))
	}
	return p, nil
}
