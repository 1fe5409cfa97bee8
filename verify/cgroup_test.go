package verify_test

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/internal/lab"
	"github.com/egress-snat/egress-snat/verify"
)

// childEnv makes the test binary act as verify's flow child (what the
// command's hidden __verify-flow mode does).
const childEnv = "EGRESS_SNAT_VERIFY_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(childEnv); v != "" {
		var proto int
		var dst string
		fmt.Sscanf(v, "%d %s", &proto, &dst)
		if err := verify.ServeChild(verify.Local{}, uint8(proto), netip.MustParseAddrPort(dst), os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func cgroup2Root(t *testing.T) string {
	t.Helper()
	for _, d := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var st syscall.Statfs_t
		if syscall.Statfs(d, &st) == nil && st.Type == 0x63677270 { // CGROUP2_SUPER_MAGIC
			return d
		}
	}
	t.Fatal("no cgroup2 mount")
	return ""
}

func TestChildInCgroup(t *testing.T) {
	l := lab.New(t)
	name := "egress-snat-verify-" + strconv.Itoa(os.Getpid())
	dir := filepath.Join(cgroup2Root(t), name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	l.Run(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-d", "203.0.113.7", "-m", "cgroup", "--path", name, "-j", "SNAT", "--to-source", "192.0.2.23")
	child := verify.Child{Cmd: func(proto uint8, dst netip.AddrPort) (*exec.Cmd, error) {
		// ip netns exec puts the child in the lab host, as the tool's own
		// child inherits its namespace.
		cmd := exec.Command("ip", "netns", "exec", l.Host, os.Args[0])
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d %s", childEnv, proto, dst))
		f, err := os.Open(dir)
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { f.Close() })
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
		return cmd, nil
	}}
	promise := verify.Promise{Proto: conntrack.UDP, Dst: netip.MustParseAddrPort("203.0.113.7:33434"), Sources: []netip.Addr{netip.MustParseAddr("192.0.2.23")}, By: "cgroup rule"}
	if r := checkIn(t, l, child, promise); !r.Agree {
		t.Errorf("from cgroup %s: %s", name, r)
	}
	if r := checkIn(t, l, verify.Local{}, promise); r.Agree {
		t.Errorf("outside the cgroup the rule must not apply: %s", r)
	}
}
