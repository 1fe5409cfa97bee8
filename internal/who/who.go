// Package who resolves the names an operator gives for the senders of
// local traffic, --uid and --cgroup, against this host: a user name to its
// uid, and a cgroup v2 path to a cgroup that exists. It only reads.
package who

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/egress-snat/egress-snat/snat"
	"golang.org/x/sys/unix"
)

// ErrNotFound means the user or cgroup does not exist on this host.
// cgroup2 is found in mountinfo, never assumed: it is /sys/fs/cgroup on
// unified hosts, /sys/fs/cgroup/unified on hybrid ones.
var ErrNotFound = errors.New("does not exist on this host")

// LookupUID returns the uid of a user name, or a number as it is: a uid
// needs no passwd entry to own sockets (setpriv --reuid 4242 works), so a
// number is taken as given.
func LookupUID(s string) (uint32, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return uint32(n), nil
	}
	if s == "" || strings.ContainsAny(s, " \t\n:/") {
		return 0, fmt.Errorf("--uid %q is not a user name or uid", s)
	}
	u, err := user.Lookup(s)
	if err != nil {
		var unknown user.UnknownUserError
		if errors.As(err, &unknown) {
			return 0, fmt.Errorf("user %q: %w", s, ErrNotFound)
		}
		return 0, fmt.Errorf("looking up user %q: %w", s, err)
	}
	n, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("user %q has uid %q, not a number", s, u.Uid)
	}
	return uint32(n), nil
}

// CheckCgroup validates a cgroup v2 path (relative to the cgroup2 root, as
// -m cgroup --path takes it) and checks that the cgroup exists. It returns
// the path in the form rules carry it. A cgroup that does not exist is
// ErrNotFound; not being able to look is another error.
func CheckCgroup(s string) (string, error) {
	p, err := snat.ParseCgroupPath(s)
	if err != nil {
		return "", err
	}
	var st unix.Stat_t
	where := ""
	if root, ok := cgroup2Mount("/proc/self/mountinfo"); ok {
		where = root
		err = unix.Stat(filepath.Join(root, p), &st)
	} else {
		// `ip netns exec` mounts a fresh /sys that hides the cgroup2
		// mount. A cgroup2 mount of our own, attached nowhere, resolves
		// the path against our cgroup namespace's root, as the kernel's
		// cgroup match does.
		where = "a private cgroup2 mount"
		var fd int
		if fd, err = privateCgroup2(); err == nil {
			err = unix.Fstatat(fd, p, &st, 0)
			unix.Close(fd)
		}
	}
	switch {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR):
		return "", fmt.Errorf("cgroup %q %w (looked in %s)", p, ErrNotFound, where)
	case err != nil:
		return "", fmt.Errorf("looking up cgroup %q in %s: %w", p, where, err)
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return "", fmt.Errorf("cgroup %q: not a cgroup directory", p)
	}
	return p, nil
}

// privateCgroup2 mounts cgroup2 read-only without attaching it anywhere
// (fsopen and fsmount, Linux 5.2) and returns the mount's fd.
func privateCgroup2() (int, error) {
	fs, err := unix.Fsopen("cgroup2", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("fsopen cgroup2: %w", err)
	}
	defer unix.Close(fs)
	if err := unix.FsconfigCreate(fs); err != nil {
		return -1, fmt.Errorf("creating a cgroup2 mount: %w", err)
	}
	fd, err := unix.Fsmount(fs, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_RDONLY)
	if err != nil {
		return -1, fmt.Errorf("fsmount cgroup2: %w", err)
	}
	return fd, nil
}

// cgroup2Mount returns the first cgroup2 mount point in a mountinfo file.
func cgroup2Mount(path string) (string, bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "36 35 0:30 / /sys/fs/cgroup/unified rw,... - cgroup2 cgroup2 rw"
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields := strings.Fields(pre)
		if ok && len(fields) >= 5 && strings.HasPrefix(post, "cgroup2 ") && fields[3] == "/" {
			return unescape(fields[4]), true
		}
	}
	return "", false
}

// unescape undoes mountinfo's octal escapes (\040 for a blank).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
