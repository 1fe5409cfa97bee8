package lab

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Sockets are matched by `-m owner` and `-m cgroup` through the process
// that created them, so those senders cannot be the test process (its uid
// is root, and a v2 cgroup holds whole processes, not threads). They are
// child processes instead: nsenter into H's network namespace, then
// scripts/probe -dial, which prints what G's probe (StartProbe) answered.
//
// nsenter --net, not `ip netns exec`: the latter also enters a new mount
// namespace and remounts /sys, which hides /sys/fs/cgroup. Only the network
// namespace matters for what leaves H.

// SourceSeenAsUID is SourceSeen for a process of uid (and gid uid, with no
// supplementary groups) inside H, which is what `-m owner --uid-owner`
// matches. It returns "" and logs why if the connection failed.
func (l *Lab) SourceSeenAsUID(t testing.TB, uid int, dst string) string {
	t.Helper()
	requireCommands(t, "setpriv")
	id := strconv.Itoa(uid)
	cmd := l.probeCmd(t, dst, "setpriv", "--reuid="+id, "--regid="+id, "--clear-groups")
	return runProbe(t, cmd, fmt.Sprintf("as uid %d", uid))
}

// SourceSeenInCgroup is SourceSeen for a process inside H that lives in the
// cgroup v2 cgroup rel (relative to the cgroup2 root, as NewCgroup returns
// it and `-m cgroup --path` wants it) from before its first instruction:
// it is cloned straight into the cgroup (CLONE_INTO_CGROUP), so its socket
// can never be created from the parent's cgroup. It returns "" and logs why
// if the connection failed.
func (l *Lab) SourceSeenInCgroup(t testing.TB, rel, dst string) string {
	t.Helper()
	mnt, root, err := cgroup2Mount()
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	dir, err := cgroupDir(mnt, root, rel)
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	f, err := os.Open(dir)
	if err != nil {
		t.Fatalf("lab: open cgroup %s: %v", rel, err)
	}
	defer f.Close()
	cmd := l.probeCmd(t, dst)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	return runProbe(t, cmd, "in cgroup "+rel)
}

// probeCmd returns `nsenter --net=H [wrapper...] probe -dial dst:TCPPort`.
func (l *Lab) probeCmd(t testing.TB, dst string, wrapper ...string) *exec.Cmd {
	t.Helper()
	requireCommands(t, "nsenter")
	args := []string{"--net=" + filepath.Join("/run/netns", l.Host)}
	args = append(args, wrapper...)
	args = append(args, probeBinary(t), "-dial", net.JoinHostPort(dst, strconv.Itoa(TCPPort)),
		"-timeout", probeTimeout.String())
	return exec.Command("nsenter", args...)
}

// requireCommands skips or fails t (see Require) unless every command is
// in PATH. nsenter and setpriv come with util-linux.
func requireCommands(t testing.TB, cmds ...string) {
	t.Helper()
	var missing []string
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		skipOrFail(t, "test needs "+strings.Join(missing, ", "))
	}
}

func runProbe(t testing.TB, cmd *exec.Cmd, who string) string {
	t.Helper()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Run(); err != nil {
		t.Logf("lab: probe %s: %s: %v: %s", who, strings.Join(cmd.Args, " "), err, strings.TrimSpace(e.String()))
		return ""
	}
	return strings.TrimSpace(o.String())
}

var probeBuild struct {
	once sync.Once
	path string
	err  error
}

// probeBinary builds scripts/probe once per test process, into a temporary
// directory that every uid can enter (SourceSeenAsUID runs it as another
// uid; go test's own build directory is private to root). The directory is
// named after the pid so that a later process removes it once this one is
// gone, as sweepStale does for namespaces: a test binary has no hook that
// runs when it exits.
func probeBinary(t testing.TB) string {
	t.Helper()
	probeBuild.once.Do(func() { probeBuild.path, probeBuild.err = buildProbe() })
	if probeBuild.err != nil {
		t.Fatalf("lab: %v", probeBuild.err)
	}
	return probeBuild.path
}

const probeDirPrefix = "es-probe-"

var staleProbeDir = regexp.MustCompile(`^` + probeDirPrefix + `(\d+)-\d+$`)

func buildProbe() (string, error) {
	sweepStaleDirs(os.TempDir(), staleProbeDir, func(dir string) { os.RemoveAll(dir) })
	dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", probeDirPrefix, os.Getpid()))
	if err != nil {
		return "", fmt.Errorf("building scripts/probe: %w", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", fmt.Errorf("building scripts/probe: %w", err)
	}
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = "/usr/local/go/bin/go" // where .ci/run and the README put Go
	}
	bin := filepath.Join(dir, "probe")
	out, err := exec.Command(goCmd, "build", "-o", bin, "github.com/egress-snat/egress-snat/scripts/probe").CombinedOutput()
	if err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("building scripts/probe: %v\n%s", err, out)
	}
	return bin, nil
}

// sweepStaleDirs calls remove for every entry of parent whose name matches
// re, with the owning pid as re's first group, when that process no longer
// exists.
func sweepStaleDirs(parent string, re *regexp.Regexp, remove func(dir string)) {
	entries, _ := os.ReadDir(parent)
	for _, e := range entries {
		m := re.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			remove(filepath.Join(parent, e.Name()))
		}
	}
}

var staleCgroup = regexp.MustCompile(`^es-(\d+)-[0-9a-f]+$`)

// NewCgroup creates a fresh, empty cgroup v2 cgroup for t and returns its
// path relative to the cgroup2 root, as `iptables -m cgroup --path` and
// SourceSeenInCgroup want it (no leading slash). The cgroup2 mount is found
// in /proc/self/mountinfo: it is /sys/fs/cgroup on unified hosts but
// /sys/fs/cgroup/unified on hybrid ones. At t's cleanup any process left in
// the cgroup is killed and the cgroup removed. Cgroups of test processes
// that died without cleaning up are removed too.
func NewCgroup(t testing.TB) string {
	t.Helper()
	Require(t)
	mnt, root, err := cgroup2Mount()
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	sweepStaleDirs(mnt, staleCgroup, func(dir string) { removeCgroup(dir) })
	name := uniqueName() // es-<pid>-<random>, like the namespaces
	dir := filepath.Join(mnt, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("lab: create cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := removeCgroup(dir); err != nil {
			t.Errorf("lab: %v", err)
		}
	})
	return strings.TrimPrefix(path.Join(root, name), "/")
}

// removeCgroup kills what is left in the cgroup dir (cgroup.kill, Linux
// 5.14+) and removes it, waiting a little for killed processes to leave.
func removeCgroup(dir string) error {
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// mount is one line of /proc/self/mountinfo.
type mount struct {
	root, point, fstype string
}

// mounts returns this process's mounts, in mount order.
func mounts() ([]mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ms []mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, fs := strings.Fields(pre), strings.Fields(post)
		if !ok || len(fields) < 5 || len(fs) < 1 {
			continue
		}
		ms = append(ms, mount{root: unescapeMountinfo(fields[3]), point: unescapeMountinfo(fields[4]), fstype: fs[0]})
	}
	return ms, sc.Err()
}

// cgroup2Mount returns where the cgroup v2 hierarchy is mounted and which of
// its paths that mount shows ("/" unless the mount is a subtree, as inside
// a cgroup namespace).
func cgroup2Mount() (mountPoint, root string, err error) {
	ms, err := mounts()
	if err != nil {
		return "", "", fmt.Errorf("finding the cgroup2 mount: %w", err)
	}
	for _, m := range ms {
		if m.fstype == "cgroup2" {
			return m.point, m.root, nil
		}
	}
	return "", "", errors.New("no cgroup2 file system is mounted (see /proc/self/mountinfo); -m cgroup --path needs cgroup v2")
}

// cgroupMounts returns the mount points of every cgroup hierarchy, v1 and v2.
func cgroupMounts() []string {
	ms, _ := mounts()
	var points []string
	for _, m := range ms {
		if m.fstype == "cgroup" || m.fstype == "cgroup2" {
			points = append(points, m.point)
		}
	}
	return points
}

// cgroupDir turns a path relative to the cgroup2 root into a directory
// under the mount, refusing paths that climb out of it.
func cgroupDir(mountPoint, root, rel string) (string, error) {
	full := path.Join("/", rel)
	inMount, err := filepath.Rel(root, full)
	if err != nil || inMount == ".." || strings.HasPrefix(inMount, "../") {
		return "", fmt.Errorf("cgroup %q is not under the cgroup2 mount %s (showing %s)", rel, mountPoint, root)
	}
	return filepath.Join(mountPoint, inMount), nil
}

// unescapeMountinfo undoes the octal escapes (\040 for a space, ...) the
// kernel writes in /proc/self/mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
