package lab

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Docker is a real dockerd (Debian's docker.io) running in H's network
// namespace, so tests can check egress-snat against the rules Docker writes
// into H's nat table: a MASQUERADE per bridge network, inserted at
// POSTROUTING position 1, and re-inserted there for the default bridge each
// time dockerd starts.
//
// dockerd runs in the root mount, pid and cgroup namespaces (nsenter --net
// only: `ip netns exec` would remount /sys and hide the cgroup file systems
// runc needs), with all of its state in one private directory: data root,
// exec root, pid file, API socket, config file, trust key, and the
// containerd it starts for itself under the exec root. Parallel instances
// (other tests, other test binaries) therefore share nothing, and a
// containerd of the root namespace, if one runs, is not used by accident
// (see StartDocker).
type Docker struct {
	// Host is the API address for `docker -H`.
	Host string
	// Image is a busybox image imported at start (no registry is reachable):
	// /bin/busybox plus links such as sh, nc and wget.
	Image string

	lab     *Lab
	dir     string
	dockerd string
	cli     string
	args    []string
	env     []string
	proc    *dockerProc
}

// dockerProc is one run of dockerd.
type dockerProc struct {
	pid  int
	done chan struct{} // closed when dockerd has exited
	err  error         // its exit status, once done is closed
}

// DockerBridge is the subnet of Docker's default bridge (docker0) in H.
// It is set with --bip because Docker's default, 172.17.0.0/16, is the one
// most likely in use on a developer's machine; inside H it could not
// collide, but it would be confusing in logs.
const DockerBridge = "172.30.0.0/16"

const (
	dockerStartTimeout = 60 * time.Second
	dockerStopTimeout  = 20 * time.Second
	dockerCmdTimeout   = 60 * time.Second
	dockerDirPrefix    = "es-docker-"
	// dockerTmp holds the instances' directories. Not t.TempDir() or
	// $TMPDIR: the API and containerd sockets live there, and a unix
	// socket path has at most 107 bytes.
	dockerTmp = "/tmp"
)

var staleDockerDir = regexp.MustCompile(`^` + dockerDirPrefix + `(\d+)-\d+$`)

// RequireDocker is Require for tests that start Docker: besides what
// Require checks it needs dockerd, the docker CLI, nsenter and a statically
// linked busybox (busybox-static) for the container image. Like Require it
// fails instead of skipping when CI is set or EGRESS_SNAT_REQUIRE_NETNS=1:
// scripts/lab.sh test-deps installs all of these.
func RequireDocker(t testing.TB) {
	t.Helper()
	Require(t)
	requireCommands(t, "dockerd", "docker", "nsenter")
	if _, err := staticBusybox(); err != nil {
		skipOrFail(t, "Docker test needs "+err.Error())
	}
}

// staticBusybox finds busybox and makes sure it needs no shared libraries,
// since the image holds nothing else.
func staticBusybox() (string, error) {
	bin, err := exec.LookPath("busybox")
	if err != nil {
		return "", errors.New("busybox (package busybox-static)")
	}
	f, err := elf.Open(bin)
	if err != nil {
		return "", fmt.Errorf("a readable %s: %v", bin, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return "", fmt.Errorf("a static busybox, not the dynamic %s (package busybox-static)", bin)
		}
	}
	return bin, nil
}

// StartDocker starts dockerd inside l's host namespace H and waits until its
// API answers (at most a minute), then imports the busybox image. At t's
// cleanup, even after a failure, it removes every container and network,
// stops dockerd (and the containerd it started), kills any process left
// that belongs to this instance, unmounts whatever is mounted under its
// directory and removes it. If the test process dies without cleaning up,
// dockerd and containerd die with it (parent-death signal), and the next
// StartDocker of any test process removes the directory.
//
// Beyond the namespacing, dockerd is told:
//   - --containerd-namespace and --containerd-plugins-namespace unique to
//     the instance: dockerd 20.10 uses a root-namespace containerd at
//     /run/containerd/containerd.sock instead of starting its own when one
//     is running, and the namespaces keep instances apart even then;
//   - --config-file of its own, so /etc/docker/daemon.json is not read, and
//     in it deprecated-key-path, so /etc/docker/key.json is not written;
//   - --storage-driver vfs, which needs no overlay mounts;
//   - --experimental --ip6tables, so IPv6 networks get their MASQUERADE too
//     (20.10 has no IPv6 NAT otherwise);
//   - --bip (DockerBridge);
//   - --cgroup-parent named like its directory, so its containers' cgroups
//     are not left in a /docker cgroup of the host but in one that cleanup
//     removes, and the cgroupfs driver: on cgroup v2 hosts run by systemd,
//     dockerd 20.10 would otherwise ask the root namespace's systemd for a
//     scope per container (and refuse a parent that is not a .slice);
//
// dockerd keeps its defaults --iptables=true and --ip-forward=true: it
// writes its rules into H's iptables (through the backend
// EGRESS_SNAT_IPTABLES selects, see dockerEnv) and enables forwarding in H;
// when it has to enable IPv4 forwarding itself it also sets H's FORWARD
// policy to DROP, which blocks AddClient's clients unless forwarding was
// already on (AddClient before StartDocker) or the test accepts them.
func StartDocker(t testing.TB, l *Lab) *Docker {
	t.Helper()
	RequireDocker(t)
	sweepStaleDirs(dockerTmp, staleDockerDir, func(dir string) { removeDockerDir(dir) })

	dir, err := os.MkdirTemp(dockerTmp, fmt.Sprintf("%s%d-", dockerDirPrefix, os.Getpid()))
	if err != nil {
		t.Fatalf("lab: docker: %v", err)
	}
	d := &Docker{
		Host:  "unix://" + filepath.Join(dir, "docker.sock"),
		Image: "es-busybox:lab",
		lab:   l,
		dir:   dir,
	}
	t.Cleanup(func() { d.cleanup(t) })

	d.dockerd, _ = exec.LookPath("dockerd")
	d.cli, _ = exec.LookPath("docker")
	ns := "es-" + filepath.Base(dir)[len(dockerDirPrefix):]
	conf, _ := json.Marshal(map[string]any{"deprecated-key-path": filepath.Join(dir, "key.json")})
	if err := os.WriteFile(filepath.Join(dir, "daemon.json"), conf, 0o600); err != nil {
		t.Fatalf("lab: docker: %v", err)
	}
	d.args = []string{
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--host", d.Host,
		"--config-file", filepath.Join(dir, "daemon.json"),
		"--containerd-namespace", ns,
		"--containerd-plugins-namespace", ns + "-plugins",
		"--storage-driver", "vfs",
		"--experimental", "--ip6tables",
		"--bip", netip.MustParsePrefix(DockerBridge).Addr().Next().String() + "/16",
		"--exec-opt", "native.cgroupdriver=cgroupfs",
		"--cgroup-parent", "/" + filepath.Base(dir),
	}
	d.env = d.dockerEnv(t)
	d.start(t)
	d.importImage(t)
	return d
}

// dockerEnv is dockerd's environment.
//
// TMPDIR is the instance's own: containerd writes stack dumps
// (containerd.PID.stacks.log) there when dockerd finds it unresponsive
// (three failed health checks, likely on a loaded machine) and kills it.
//
// dockerd runs whichever iptables is first in PATH; under
// EGRESS_SNAT_IPTABLES it gets a directory of links to that backend's
// commands in front, so its rules and egress-snat's land in the same
// backend, as on a real host.
func (d *Docker) dockerEnv(t testing.TB) []string {
	t.Helper()
	tmp := filepath.Join(d.dir, "tmp")
	if err := os.Mkdir(tmp, 0o700); err != nil {
		t.Fatalf("lab: docker: %v", err)
	}
	env := append(slices.DeleteFunc(os.Environ(), func(s string) bool { return strings.HasPrefix(s, "TMPDIR=") }),
		"TMPDIR="+tmp)
	if os.Getenv("EGRESS_SNAT_IPTABLES") == "" {
		return env
	}
	bin := filepath.Join(d.dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatalf("lab: docker: %v", err)
	}
	for _, base := range []string{"iptables", "ip6tables"} {
		for _, suffix := range []string{"", "-save", "-restore"} {
			target, err := exec.LookPath(iptablesCmd(t, base, suffix))
			if err != nil {
				t.Fatalf("lab: docker: %v", err)
			}
			if err := os.Symlink(target, filepath.Join(bin, base+suffix)); err != nil {
				t.Fatalf("lab: docker: %v", err)
			}
		}
	}
	return append(slices.DeleteFunc(env, func(s string) bool { return strings.HasPrefix(s, "PATH=") }),
		"PATH="+bin+":"+os.Getenv("PATH"))
}

// start runs dockerd and waits for its API.
func (d *Docker) start(t testing.TB) {
	t.Helper()
	log, err := os.OpenFile(filepath.Join(d.dir, "dockerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatalf("lab: docker: %v", err)
	}
	// nsenter execs dockerd, so dockerd keeps the process, and with it the
	// parent-death signal, which it passes on to its containerd.
	cmd := exec.Command("nsenter", append([]string{"--net=" + filepath.Join("/run/netns", d.lab.Host), d.dockerd}, d.args...)...)
	cmd.Env = d.env
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &dockerProc{done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal fires when the thread that forked exits,
		// not the process; keeping this goroutine on its thread until
		// dockerd exits keeps Go from retiring that thread under it.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer log.Close()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		p.pid = cmd.Process.Pid
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		t.Fatalf("lab: start dockerd: %v", err)
	}
	d.proc = p

	deadline := time.Now().Add(dockerStartTimeout)
	for {
		if _, _, err := d.run(5*time.Second, nil, "version", "--format", "{{.Server.Version}}"); err == nil {
			return
		}
		select {
		case <-p.done:
			t.Fatalf("lab: dockerd exited at start: %v\n%s", p.err, d.logTail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("lab: dockerd API %s not answering after %v\n%s", d.Host, dockerStartTimeout, d.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop stops dockerd: SIGTERM, which makes it stop its containerd too,
// then SIGKILL if it takes longer than dockerStopTimeout. It is a no-op
// when dockerd is not running.
func (d *Docker) stop() error {
	p := d.proc
	if p == nil {
		return nil
	}
	d.proc = nil
	syscall.Kill(p.pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(dockerStopTimeout):
	}
	syscall.Kill(p.pid, syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("dockerd did not stop within %v of SIGTERM, killed", dockerStopTimeout)
}

// Restart stops dockerd and starts it again with the same directories and
// flags, as a package upgrade or `systemctl restart docker` would. Its
// networks and images survive; at start dockerd re-creates the default
// bridge's MASQUERADE at POSTROUTING position 1, above whatever is there.
func (d *Docker) Restart(t testing.TB) {
	t.Helper()
	if err := d.stop(); err != nil {
		t.Fatalf("lab: restart: %v", err)
	}
	d.start(t)
}

// Run runs `docker -H Host args...` and returns its stdout, failing the
// test if it fails or takes more than a minute.
func (d *Docker) Run(t testing.TB, args ...string) string {
	t.Helper()
	stdout, stderr, err := d.run(dockerCmdTimeout, nil, args...)
	if err != nil {
		t.Fatalf("lab: docker %s: %v\n%s%s", strings.Join(args, " "), err, stdout, stderr)
	}
	return stdout
}

func (d *Docker) run(timeout time.Duration, stdin []byte, args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, d.cli, append([]string{"-H", d.Host}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w after %v", ctx.Err(), timeout)
	}
	return o.String(), e.String(), err
}

// NetworkCreate creates a bridge network with the given subnets; an IPv6
// subnet (fd00::/8 ones are fine inside H) makes it dual-stack. Docker
// inserts its MASQUERADE for each subnet at POSTROUTING position 1. The
// network is removed at cleanup.
func (d *Docker) NetworkCreate(t testing.TB, name string, subnets ...string) {
	t.Helper()
	args := []string{"network", "create"}
	for _, s := range subnets {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			t.Fatalf("lab: NetworkCreate %s: subnet %q: %v", name, s, err)
		}
		if p.Addr().Is6() && !slices.Contains(args, "--ipv6") {
			args = append(args, "--ipv6")
		}
		args = append(args, "--subnet", s)
	}
	d.Run(t, append(args, name)...)
}

// SourceSeen runs a container on network that connects to dst:TCPPort with
// busybox nc and returns the source address G's probe (StartProbe) reported,
// or "" if the connection failed, which is logged. Each call is a fresh
// container (about a second with the vfs driver).
func (d *Docker) SourceSeen(t testing.TB, network, dst string) string {
	t.Helper()
	stdout, stderr, err := d.run(dockerCmdTimeout, nil, "run", "--rm", "--network", network, d.Image,
		"nc", "-w", strconv.Itoa(int(probeTimeout/time.Second)), dst, strconv.Itoa(TCPPort))
	if err != nil {
		t.Logf("lab: container on %s to %s: %v: %s", network, dst, err, strings.TrimSpace(stdout+stderr))
		return ""
	}
	return strings.TrimSpace(stdout)
}

// importImage imports Image from a tar built here: only /bin/busybox and
// links to it, since nothing can be pulled.
func (d *Docker) importImage(t testing.TB) {
	t.Helper()
	bb, err := staticBusybox()
	if err != nil {
		t.Fatalf("lab: docker image: %v", err)
	}
	body, err := os.ReadFile(bb)
	if err != nil {
		t.Fatalf("lab: docker image: %v", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdrs := []*tar.Header{{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755}}
	hdrs = append(hdrs, &tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(body))})
	for _, name := range []string{"sh", "nc", "wget", "cat", "echo", "ip", "sleep", "ls"} {
		hdrs = append(hdrs, &tar.Header{Name: "bin/" + name, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777})
	}
	for _, h := range hdrs {
		h.ModTime = time.Unix(0, 0)
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("lab: docker image: %v", err)
		}
		if h.Name == "bin/busybox" {
			tw.Write(body)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatalf("lab: docker image: %v", err)
	}
	if stdout, stderr, err := d.run(dockerCmdTimeout, buf.Bytes(), "import", "-", d.Image); err != nil {
		t.Fatalf("lab: docker import: %v\n%s%s", err, stdout, stderr)
	}
}

// cleanup removes what the test left in Docker, stops it and removes every
// trace of the instance. It reports, but does not stop at, each failure.
func (d *Docker) cleanup(t testing.TB) {
	t.Helper()
	if d.proc != nil {
		if ids := strings.Fields(d.quiet("ps", "-aq")); len(ids) > 0 {
			d.quiet(append([]string{"rm", "-f"}, ids...)...)
		}
		if ids := strings.Fields(d.quiet("network", "ls", "-q", "--filter", "type=custom")); len(ids) > 0 {
			d.quiet(append([]string{"network", "rm"}, ids...)...)
		}
	}
	if err := d.stop(); err != nil {
		t.Errorf("lab: docker cleanup: %v", err)
	}
	if t.Failed() {
		t.Logf("lab: dockerd log:\n%s", d.logTail())
	}
	if err := removeDockerDir(d.dir); err != nil {
		t.Errorf("lab: docker cleanup: %v", err)
	}
}

// quiet runs a docker command for cleanup, ignoring failures.
func (d *Docker) quiet(args ...string) string {
	stdout, _, _ := d.run(dockerCmdTimeout, nil, args...)
	return stdout
}

func (d *Docker) logTail() string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "dockerd.log"))
	const max = 4000
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

// removeDockerDir kills every process that names dir on its command line
// (dockerd, containerd and containerd shims of this instance), unmounts
// everything under dir (deepest first; dockerd mounts its data root and
// network namespaces there) and removes dir.
func removeDockerDir(dir string) error {
	var errs []error
	if left := killNaming(dir); len(left) > 0 {
		errs = append(errs, fmt.Errorf("processes of %s still running after SIGKILL: %v", dir, left))
	}
	for _, mp := range mountsUnder(dir) {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	if err := removeCgroupParent(filepath.Base(dir)); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeCgroupParent removes the cgroup /name, and any cgroup left below
// it, from every cgroup hierarchy (v1 ones, one per controller, and v2).
func removeCgroupParent(name string) error {
	var errs []error
	for _, mnt := range cgroupMounts() {
		top := filepath.Join(mnt, name)
		var dirs []string
		filepath.WalkDir(top, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.Reverse(dirs) // children before their parent
		for _, d := range dirs {
			if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
			}
		}
	}
	return errors.Join(errs...)
}

// killNaming SIGKILLs the processes whose command line contains s and
// returns those still alive a few seconds later.
func killNaming(s string) []int {
	pids := processesNaming(s)
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(pids) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		pids = processesNaming(s)
	}
	return pids
}

func processesNaming(s string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(s)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	ms, _ := mounts()
	var points []string
	for _, m := range ms {
		if m.point == dir || strings.HasPrefix(m.point, dir+"/") {
			points = append(points, m.point)
		}
	}
	// Later mounts first (one stacked on another goes before it), then
	// deeper ones before their parents.
	slices.Reverse(points)
	slices.SortStableFunc(points, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return points
}
