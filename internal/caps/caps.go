// Package caps tells whether a process holds CAP_NET_ADMIN: what every
// command that writes egress-snat's rules needs, and what the daemon's
// socket asks of a peer.
package caps

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// capNetAdmin is CAP_NET_ADMIN's bit (linux/capability.h).
const capNetAdmin = 12

// NetAdmin reports whether process pid (0: this one) has CAP_NET_ADMIN in
// its effective set, read from /proc so it works in user namespaces too.
// When this process's set cannot be read, root counts as having it.
func NetAdmin(pid int) bool {
	has, ok := Read(pid)
	if !ok {
		return pid == 0 && os.Geteuid() == 0
	}
	return has
}

// Read reports whether process pid (0: this one) has CAP_NET_ADMIN in its
// effective set, and whether that set could be read at all (ok false: the
// process is gone, or /proc does not show it).
func Read(pid int) (netAdmin, ok bool) {
	path := "/proc/self/status"
	if pid > 0 {
		path = fmt.Sprintf("/proc/%d/status", pid)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return false, false
	}
	for line := range strings.Lines(string(b)) {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			v, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				return false, false
			}
			return v&(1<<capNetAdmin) != 0, true
		}
	}
	return false, false
}
