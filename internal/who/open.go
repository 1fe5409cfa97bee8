package who

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// OpenCgroup opens the directory of cgroup v2 path p (relative to the
// cgroup2 root, as CheckCgroup returns it), for starting a process in it
// (clone3's CLONE_INTO_CGROUP, Go's SysProcAttr.CgroupFD). Like
// CheckCgroup it falls back to a private cgroup2 mount where `ip netns
// exec` hid the host's.
func OpenCgroup(p string) (*os.File, error) {
	if root, ok := cgroup2Mount("/proc/self/mountinfo"); ok {
		f, err := os.Open(filepath.Join(root, p))
		if err != nil {
			return nil, fmt.Errorf("opening cgroup %q: %w", p, err)
		}
		return f, nil
	}
	mnt, err := privateCgroup2()
	if err != nil {
		return nil, err
	}
	defer unix.Close(mnt)
	fd, err := unix.Openat(mnt, p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening cgroup %q in a private cgroup2 mount: %w", p, err)
	}
	return os.NewFile(uintptr(fd), "cgroup "+p), nil
}
