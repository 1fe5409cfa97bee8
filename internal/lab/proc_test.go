package lab

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSourceSeenAsUID(t *testing.T) {
	l := New(t)
	l.StartProbe(t)
	l.Run(t, iptablesCmd(t, "iptables", ""), "-t", "nat", "-A", "POSTROUTING",
		"-m", "owner", "--uid-owner", "4242", "-j", "SNAT", "--to-source", "192.0.2.22")
	l.Run(t, iptablesCmd(t, "ip6tables", ""), "-t", "nat", "-A", "POSTROUTING",
		"-m", "owner", "--uid-owner", "4242", "-j", "SNAT", "--to-source", "2001:db8::22")
	for _, c := range []struct {
		uid       int
		dst, want string
	}{
		{4242, "198.51.100.4", "192.0.2.22"},
		{4242, "2001:db8:ffff::4", "2001:db8::22"},
		{4243, "198.51.100.4", "192.0.2.250"},
		{0, "198.51.100.4", "192.0.2.250"},
	} {
		if got := l.SourceSeenAsUID(t, c.uid, c.dst); got != c.want {
			t.Errorf("uid %d to %s: far side saw %q, want %q", c.uid, c.dst, got, c.want)
		}
	}
}

func TestSourceSeenInCgroup(t *testing.T) {
	l := New(t)
	l.StartProbe(t)
	var dir string
	t.Run("cgroup", func(t *testing.T) {
		rel := NewCgroup(t)
		other := NewCgroup(t)
		if rel == other || strings.HasPrefix(rel, "/") {
			t.Fatalf("NewCgroup: %q and %q", rel, other)
		}
		mnt, root, err := cgroup2Mount()
		if err != nil {
			t.Fatal(err)
		}
		if dir, err = cgroupDir(mnt, root, rel); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err != nil {
			t.Fatalf("cgroup %s: %v", rel, err)
		}
		l.Run(t, iptablesCmd(t, "iptables", ""), "-t", "nat", "-A", "POSTROUTING",
			"-m", "cgroup", "--path", rel, "-j", "SNAT", "--to-source", "192.0.2.22")
		l.Run(t, iptablesCmd(t, "ip6tables", ""), "-t", "nat", "-A", "POSTROUTING",
			"-m", "cgroup", "--path", rel, "-j", "SNAT", "--to-source", "2001:db8::22")
		for _, c := range []struct {
			cgroup, dst, want string
		}{
			{rel, "198.51.100.4", "192.0.2.22"},
			{rel, "2001:db8:ffff::4", "2001:db8::22"},
			{other, "198.51.100.4", "192.0.2.250"},
		} {
			if got := l.SourceSeenInCgroup(t, c.cgroup, c.dst); got != c.want {
				t.Errorf("cgroup %s to %s: far side saw %q, want %q", c.cgroup, c.dst, got, c.want)
			}
		}
		if got := l.SourceSeen(t, "198.51.100.4"); got != "192.0.2.250" {
			t.Errorf("test process (not in %s): far side saw %q, want 192.0.2.250", rel, got)
		}
	})
	if dir == "" {
		return
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cgroup %s left behind: %v", dir, err)
	}
}

func TestCgroupDir(t *testing.T) {
	for _, c := range []struct {
		mnt, root, rel, want string
	}{
		{"/sys/fs/cgroup/unified", "/", "es-1-ab", "/sys/fs/cgroup/unified/es-1-ab"},
		{"/sys/fs/cgroup", "/", "/a/b", "/sys/fs/cgroup/a/b"},
		{"/sys/fs/cgroup", "/ns", "ns/x", "/sys/fs/cgroup/x"},
		{"/sys/fs/cgroup", "/ns", "other", ""},
	} {
		got, err := cgroupDir(c.mnt, c.root, c.rel)
		if got != c.want || (err != nil) != (c.want == "") {
			t.Errorf("cgroupDir(%q, %q, %q) = %q, %v; want %q", c.mnt, c.root, c.rel, got, err, c.want)
		}
	}
	if got := unescapeMountinfo(`/a\040b\134c`); got != `/a b\c` {
		t.Errorf("unescapeMountinfo = %q", got)
	}
}
