package who

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Sockets lists the local endpoints (address and port) of the TCP and UDP
// sockets of this network namespace, of one family, that own selects (by
// uid and inode). conntrack does not know who sent a flow; a socket's
// endpoint is the flow's original source, which tells its flows apart from
// another sender's to the same destination.
func Sockets(is4 bool, own func(uid, inode uint32) bool) ([]netip.AddrPort, error) {
	fam := uint8(unix.AF_INET6)
	if is4 {
		fam = unix.AF_INET
	}
	var out []netip.AddrPort
	for _, list := range []func(uint8) ([]*netlink.Socket, error){netlink.SocketDiagTCP, netlink.SocketDiagUDP} {
		socks, err := list(fam)
		if err != nil {
			return nil, fmt.Errorf("listing sockets: %w", err)
		}
		for _, s := range socks {
			if !own(s.UID, s.INode) {
				continue
			}
			a, ok := netip.AddrFromSlice(s.ID.Source)
			if !ok {
				continue
			}
			out = append(out, netip.AddrPortFrom(a.Unmap(), s.ID.SourcePort))
		}
	}
	return out, nil
}

// OfUID selects the sockets uid owns, for Sockets.
func OfUID(uid uint32) func(uid, inode uint32) bool {
	return func(u, _ uint32) bool { return u == uid }
}

// OfCgroup selects, for Sockets, the sockets held by the processes of
// cgroup v2 path p and of its descendants (the kernel's cgroup match takes
// the whole subtree): their inodes are read from /proc/PID/fd now. A socket
// passed to a process of another cgroup is that process's too.
func OfCgroup(p string) (func(uid, inode uint32) bool, error) {
	dir, err := OpenCgroup(p)
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	var pids []int
	if err := cgroupPIDs(int(dir.Fd()), &pids); err != nil {
		return nil, fmt.Errorf("processes of cgroup %q: %w", p, err)
	}
	inodes := map[uint32]bool{}
	for _, pid := range pids {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			continue // the process ended meanwhile
		}
		for _, fd := range fds {
			link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if err != nil {
				continue
			}
			if v, ok := strings.CutPrefix(link, "socket:["); ok {
				if n, err := strconv.ParseUint(strings.TrimSuffix(v, "]"), 10, 32); err == nil {
					inodes[uint32(n)] = true
				}
			}
		}
	}
	return func(_, inode uint32) bool { return inodes[inode] }, nil
}

// maxCgroupDepth bounds the walk of a cgroup's descendants.
const maxCgroupDepth = 32

// cgroupPIDs appends the pids of cgroup directory fd and its descendants.
func cgroupPIDs(fd int, pids *[]int) error { return walkCgroup(fd, pids, 0) }

func walkCgroup(fd int, pids *[]int, depth int) error {
	if depth > maxCgroupDepth {
		return fmt.Errorf("cgroups nested deeper than %d", maxCgroupDepth)
	}
	procs, err := unix.Openat(fd, "cgroup.procs", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(procs), "cgroup.procs")
	sc := bufio.NewScanner(io.LimitReader(f, 16<<20))
	for sc.Scan() {
		if pid, err := strconv.Atoi(strings.TrimSpace(sc.Text())); err == nil {
			*pids = append(*pids, pid)
		}
	}
	f.Close()
	self, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(self), "cgroup") // its own fd: ReadDir moves the offset
	defer d.Close()
	entries, err := d.ReadDir(-1)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		sub, err := unix.Openat(fd, e.Name(), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue // removed meanwhile
		}
		err = walkCgroup(sub, pids, depth+1)
		unix.Close(sub)
		if err != nil {
			return err
		}
	}
	return nil
}
