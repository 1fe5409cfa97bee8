package ha

import (
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Installed is what a node's generated files say about it, read back
// from them: `egress-snat ha drain` and `ha status` start from
// keepalived.conf, as keepalived does, and follow it to the hook and the
// hook to conntrackd.conf, so that they need no input of their own and
// cannot disagree with the files the daemons run on. It reads only what
// the templates write; a file that is not theirs is refused, not guessed
// at.
type Installed struct {
	// Keepalived, Hook and ConntrackdConf are the files read.
	Keepalived, Hook, ConntrackdConf string
	// Node is keepalived's router_id, the node's name.
	Node string
	// Preempt: the drain lowers the priority (the node stays backup);
	// without, the drain puts the group into FAULT.
	Preempt bool
	// PreemptDelay is the node's preempt_delay; 0 when it preempts at
	// once or never.
	PreemptDelay time.Duration
	// AdvertInterval is VRRP's advert interval.
	AdvertInterval time.Duration
	// VIPs are the virtual addresses, clients' first, each with its
	// interface.
	VIPs []VIP
	// DrainFile, StateFile, Conntrackd as in Paths. StateFile is empty
	// for a hook written before the hook recorded the state.
	DrainFile, StateFile, Conntrackd string
	// SyncInterface, PeerSyncAddr and SyncPort are conntrackd's link.
	SyncInterface string
	PeerSyncAddr  netip.Addr
	SyncPort      int
}

// VIP is a virtual address of the pair and its interface.
type VIP struct {
	Prefix    netip.Prefix `json:"address"`
	Interface string       `json:"interface"`
}

var (
	kaRouterID  = regexp.MustCompile(`(?m)^\s*router_id (\S+)$`)
	kaSyncGroup = regexp.MustCompile(`(?m)^vrrp_sync_group ` + GroupName + ` \{$`)
	kaNotify    = regexp.MustCompile(`(?m)^    notify "([^"]+)"$`)
	kaDrain     = regexp.MustCompile(`(?m)^track_file ` + DrainTrack + ` \{\n\s*file "([^"]+)"\n\s*weight (-?\d+)\n`)
	kaAdvert    = regexp.MustCompile(`(?m)^\s*advert_int (\S+)$`)
	kaDelay     = regexp.MustCompile(`(?m)^\s*preempt_delay (\S+)$`)
	kaVIPs      = regexp.MustCompile(`(?m)^\s*virtual_ipaddress \{\n((?:\s+\S+ dev \S+\n)+)\s*\}`)
	kaVIP       = regexp.MustCompile(`(?m)^\s+(\S+) dev (\S+)$`)
	hookVar     = regexp.MustCompile(`(?m)^([A-Z_]+)='([^']*)'$`)
	ctPeer      = regexp.MustCompile(`(?m)^\s*IPv[46]_Destination_Address (\S+)$`)
	ctInterface = regexp.MustCompile(`(?m)^\s*Interface (\S+)$`)
	ctPort      = regexp.MustCompile(`(?m)^\s*Port (\d+)$`)
)

// ReadInstalled reads the keepalived.conf at path that Keepalived wrote,
// the hook it names and the conntrackd.conf the hook names.
func ReadInstalled(path string) (Installed, error) {
	in := Installed{Keepalived: path}
	b, err := readSmall(path)
	if err != nil {
		return in, err
	}
	ka := string(b)
	notOurs := func(what string) error {
		return fmt.Errorf("%s has no %s: it was not written by egress-snat ha config (or by a version that wrote no %s)", path, what, what)
	}
	if !kaSyncGroup.MatchString(ka) {
		return in, notOurs("vrrp_sync_group " + GroupName)
	}
	if m := kaRouterID.FindStringSubmatch(ka); m != nil {
		in.Node = m[1]
	}
	m := kaDrain.FindStringSubmatch(ka)
	if m == nil {
		return in, notOurs("track_file " + DrainTrack)
	}
	in.DrainFile = m[1]
	in.Preempt = m[2] != "0"
	_, group, _ := strings.Cut(ka, "vrrp_sync_group "+GroupName+" {")
	group, _, _ = strings.Cut(group, "\n}")
	if m := kaNotify.FindStringSubmatch(group); m != nil {
		in.Hook = m[1]
	} else {
		return in, notOurs("notify hook in its sync group")
	}
	if m := kaAdvert.FindStringSubmatch(ka); m != nil {
		if in.AdvertInterval, err = seconds(m[1]); err != nil {
			return in, fmt.Errorf("%s: advert_int %s: %w", path, m[1], err)
		}
	}
	if m := kaDelay.FindStringSubmatch(ka); m != nil {
		if in.PreemptDelay, err = seconds(m[1]); err != nil {
			return in, fmt.Errorf("%s: preempt_delay %s: %w", path, m[1], err)
		}
	}
	for _, block := range kaVIPs.FindAllStringSubmatch(ka, -1) {
		for _, v := range kaVIP.FindAllStringSubmatch(block[1], -1) {
			p, err := netip.ParsePrefix(v[1])
			if err != nil {
				if a, aerr := netip.ParseAddr(v[1]); aerr == nil {
					p, err = netip.PrefixFrom(a, a.BitLen()), nil
				}
			}
			if err != nil {
				return in, fmt.Errorf("%s: virtual address %q: %w", path, v[1], err)
			}
			in.VIPs = append(in.VIPs, VIP{Prefix: p, Interface: v[2]})
		}
	}
	if len(in.VIPs) == 0 {
		return in, notOurs("virtual_ipaddress")
	}

	b, err = readSmall(in.Hook)
	if err != nil {
		return in, fmt.Errorf("the notify hook that %s names: %w", path, err)
	}
	vars := map[string]string{}
	for _, m := range hookVar.FindAllStringSubmatch(string(b), -1) {
		vars[m[1]] = m[2]
	}
	in.Conntrackd, in.ConntrackdConf, in.StateFile = vars["CONNTRACKD"], vars["CONNTRACKD_CONF"], vars["STATE_FILE"]
	if in.Conntrackd == "" || in.ConntrackdConf == "" {
		return in, fmt.Errorf("%s (the notify hook %s names) sets no CONNTRACKD and CONNTRACKD_CONF: it was not written by egress-snat ha config", in.Hook, path)
	}

	b, err = readSmall(in.ConntrackdConf)
	if err != nil {
		return in, fmt.Errorf("the conntrackd.conf that %s names: %w", in.Hook, err)
	}
	ct := string(b)
	if m := ctPeer.FindStringSubmatch(ct); m != nil {
		in.PeerSyncAddr, _ = netip.ParseAddr(m[1])
	}
	if m := ctInterface.FindStringSubmatch(ct); m != nil {
		in.SyncInterface = m[1]
	}
	if m := ctPort.FindStringSubmatch(ct); m != nil {
		in.SyncPort, _ = strconv.Atoi(m[1])
	}
	return in, nil
}

// seconds reads a keepalived duration in seconds ("0.1", "2").
func seconds(s string) (time.Duration, error) {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("not a number of seconds")
	}
	return time.Duration(f * float64(time.Second)).Round(time.Millisecond), nil
}

// MasterDown is about how long the peer waits, after this node's last
// advert of higher priority, before it takes over: three adverts and a
// skew of (256 - priority) / 256 adverts (RFC 5798), which this takes as
// half an advert (the peer's priority is not in this node's files). It
// is what a drain, or a node that dies, costs before the addresses move:
// ~0.35s at 100ms adverts.
func MasterDown(advert time.Duration) time.Duration {
	return 3*advert + advert/2
}
