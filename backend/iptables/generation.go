package iptables

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"os/exec"
	"strconv"
	"strings"
	"unsafe"

	"github.com/egress-snat/egress-snat/snat"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Generation returns a number that changes whenever the family's nat table
// may have changed, at the cost of one netlink request or one getsockopt
// and no process, so a daemon can look every second and stay idle.
//
//   - iptables-nft: the nftables ruleset generation, which every commit of
//     any nftables table in the namespace increments;
//   - iptables-legacy: a hash of the nat table's rules as the kernel gives
//     them (IPT_SO_GET_ENTRIES), with the packet and byte counters, which
//     traffic changes, zeroed.
func (t ExecTables) Generation(f snat.Family) (uint64, error) {
	if t.Flavour == FlavourNFT {
		return nftGeneration()
	}
	return legacyGeneration(f)
}

// nftGeneration asks for NFT_MSG_GETGEN.
func nftGeneration() (uint64, error) {
	req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETGEN, 0)
	req.AddData(&nfgenmsg{family: unix.AF_UNSPEC})
	msgs, err := req.Execute(unix.NETLINK_NETFILTER, 0)
	if err != nil {
		return 0, fmt.Errorf("reading the nftables generation: %w", err)
	}
	for _, m := range msgs {
		if len(m) < 4 {
			continue
		}
		attrs, err := nl.ParseRouteAttr(m[4:])
		if err != nil {
			return 0, err
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.NFTA_GEN_ID && len(a.Value) >= 4 {
				return uint64(binary.BigEndian.Uint32(a.Value)), nil
			}
		}
	}
	return 0, fmt.Errorf("reading the nftables generation: no generation in the answer")
}

type nfgenmsg struct {
	family  uint8
	version uint8
	resID   uint16
}

func (m *nfgenmsg) Len() int { return 4 }
func (m *nfgenmsg) Serialize() []byte {
	return []byte{m.family, m.version, byte(m.resID >> 8), byte(m.resID)}
}

// iptGetinfo is struct ipt_getinfo (and ip6t_getinfo, the same layout).
type iptGetinfo struct {
	Name       [32]byte
	ValidHooks uint32
	HookEntry  [5]uint32
	Underflow  [5]uint32
	NumEntries uint32
	Size       uint32
}

// legacyGeneration hashes the nat table's rules: IPT_SO_GET_INFO for its
// size, then IPT_SO_GET_ENTRIES for the rules themselves.
func legacyGeneration(f snat.Family) (uint64, error) {
	domain, level := unix.AF_INET, unix.SOL_IP
	// struct ipt_entry / ip6t_entry: where next_offset and the counters
	// are, and how long the entry header is.
	nextOff, countersOff := 90, 96
	if f == snat.IPv6 {
		domain, level = unix.AF_INET6, unix.SOL_IPV6
		nextOff, countersOff = 142, 152
	}
	fd, err := unix.Socket(domain, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return 0, fmt.Errorf("raw socket for iptables info: %w", err)
	}
	defer unix.Close(fd)
	var info iptGetinfo
	copy(info.Name[:], table)
	size := uint32(unsafe.Sizeof(info))
	const soGetInfo, soGetEntries = 64, 65 // IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES (and ip6t's)
	if errno := getsockopt(fd, level, soGetInfo, unsafe.Pointer(&info), &size); errno != 0 {
		return 0, fmt.Errorf("reading the %s nat table's info: %w", f, errno)
	}
	// struct ipt_get_entries: name[32], size, then the entries, 8-aligned.
	const header = 40
	buf := make([]byte, header+int(info.Size))
	copy(buf, table)
	binary.NativeEndian.PutUint32(buf[32:], info.Size)
	size = uint32(len(buf))
	if errno := getsockopt(fd, level, soGetEntries, unsafe.Pointer(&buf[0]), &size); errno != 0 {
		// EAGAIN: the table changed between the two calls.
		return 0, fmt.Errorf("reading the %s nat table's rules: %w", f, errno)
	}
	entries := buf[header:]
	for off := 0; off+countersOff+16 <= len(entries); {
		clear(entries[off+countersOff : off+countersOff+16])
		next := int(binary.NativeEndian.Uint16(entries[off+nextOff:]))
		if next == 0 {
			break
		}
		off += next
	}
	h := fnv.New64a()
	h.Write(entries)
	return h.Sum64(), nil
}

func getsockopt(fd, level, opt int, p unsafe.Pointer, size *uint32) unix.Errno {
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(size)), 0)
	return errno
}

// SaveNAT returns iptables-save of the family's nat table alone: what the
// daemon's periodic read needs, smaller than a whole save.
func (t ExecTables) SaveNAT(f snat.Family) (string, error) {
	return t.save(f, "-t", table)
}

// Headers returns each set of ours with its number of members and nomatch
// exceptions: from the kernel's set headers over netlink, without a
// process, so the daemon's canary can ask every tick; from `ipset list
// -t` (which prints no members) on a kernel whose headers lack the count.
func (ExecIPSets) Headers() (map[string]int, error) {
	if sets, ok, err := netlinkHeaders(); err == nil && ok {
		return sets, nil
	}
	out, err := exec.Command("ipset", "list", "-t").Output()
	if err != nil {
		return nil, fmt.Errorf("ipset list -t: %w", err)
	}
	return parseHeaders(string(out))
}

func parseHeaders(text string) (map[string]int, error) {
	sets := map[string]int{}
	name := ""
	for line := range strings.Lines(text) {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, "Name: "); ok {
			name = v
			continue
		}
		if v, ok := strings.CutPrefix(line, "Number of entries: "); ok && strings.HasPrefix(name, SetPrefix) {
			n, err := strconv.Atoi(v)
			if err != nil {
				return nil, fmt.Errorf("ipset list -t: set %s: %q", name, v)
			}
			sets[name] = n
		}
	}
	return sets, nil
}

// netlinkHeaders lists every set's header (IPSET_CMD_LIST with
// IPSET_FLAG_LIST_HEADER: no members) and returns ours with their element
// counts. ok is false when some set of ours came without a count
// (IPSET_ATTR_ELEMENTS, Linux 4.18 and later).
func netlinkHeaders() (sets map[string]int, ok bool, err error) {
	req := nl.NewNetlinkRequest(nl.IPSET_CMD_LIST|(unix.NFNL_SUBSYS_IPSET<<8), nl.GetIpsetFlags(nl.IPSET_CMD_LIST))
	req.AddData(&nl.Nfgenmsg{NfgenFamily: uint8(unix.AF_NETLINK), Version: nl.NFNETLINK_V0})
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_PROTOCOL, nl.Uint8Attr(nl.IPSET_PROTOCOL)))
	flags := make([]byte, 4)
	binary.BigEndian.PutUint32(flags, ipsetFlagListHeader)
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_FLAGS|int(nl.NLA_F_NET_BYTEORDER), flags))
	msgs, err := req.Execute(unix.NETLINK_NETFILTER, 0)
	if err != nil {
		return nil, false, fmt.Errorf("listing the ipset headers: %w", err)
	}
	sets = map[string]int{}
	ok = true
	for _, m := range msgs {
		if len(m) < 4 {
			continue
		}
		name, count := "", -1
		for a := range nl.ParseAttributes(m[4:]) {
			switch a.Type {
			case nl.IPSET_ATTR_SETNAME:
				name = nl.BytesToString(a.Value)
			case nl.IPSET_ATTR_DATA | nl.NLA_F_NESTED:
				for d := range nl.ParseAttributes(a.Value) {
					if d.Type == nl.IPSET_ATTR_ELEMENTS|nl.NLA_F_NET_BYTEORDER && len(d.Value) >= 4 {
						count = int(binary.BigEndian.Uint32(d.Value))
					}
				}
			}
		}
		if !strings.HasPrefix(name, SetPrefix) {
			continue
		}
		if count < 0 {
			ok = false
			continue
		}
		sets[name] = count
	}
	return sets, ok, nil
}

// ipsetFlagListHeader is IPSET_FLAG_LIST_HEADER: headers only, no members.
const ipsetFlagListHeader = 1 << 2
