package ha

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// installIn writes c's files (but the sysctls) with every path of c in
// dir, and returns c as written.
func installIn(t *testing.T, c Config, dir string) Config {
	t.Helper()
	p := func(name string) string { return filepath.Join(dir, name) }
	hookLog := ""
	if c.Paths.HookLog != "" {
		hookLog = p("hook.log")
	}
	c.Paths = Paths{
		Keepalived: p("keepalived.conf"), ConntrackdConf: p("conntrackd.conf"), Conntrackd: c.Paths.Conntrackd,
		ConntrackdLock: p("lock"), ConntrackdSocket: p("ctl"), Hook: p("notify.sh"),
		WatchPIDFile: p("watch.pid"), DrainFile: p("drain"), StateFile: p("state"), HookLog: hookLog,
	}
	files, err := Files(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f.Path == SysctlPath {
			continue
		}
		if err := os.WriteFile(f.Path, []byte(f.Content), os.FileMode(f.Mode)); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// TestReadInstalled: what ReadInstalled reads back from the generated
// files is what they were generated from.
func TestReadInstalled(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want func(c Config) Installed
	}{
		{"lab-a", labA(), func(c Config) Installed {
			return Installed{
				Keepalived: c.Paths.Keepalived, Hook: c.Paths.Hook, ConntrackdConf: c.Paths.ConntrackdConf,
				Node: "gw-a", Preempt: true, PreemptDelay: 2 * time.Second, AdvertInterval: 100 * time.Millisecond,
				VIPs: []VIP{
					{netip.MustParsePrefix("10.50.0.1/24"), "lan"},
					{netip.MustParsePrefix("192.0.2.100/24"), "uplink"},
				},
				DrainFile: c.Paths.DrainFile, StateFile: c.Paths.StateFile, Conntrackd: "/usr/sbin/conntrackd",
				SyncInterface: "sync", PeerSyncAddr: netip.MustParseAddr("10.51.0.2"), SyncPort: 3780,
			}
		}},
		{"nopreempt-b", nopreemptB(), func(c Config) Installed {
			return Installed{
				Keepalived: c.Paths.Keepalived, Hook: c.Paths.Hook, ConntrackdConf: c.Paths.ConntrackdConf,
				Node: "gw-b", Preempt: false, AdvertInterval: 250 * time.Millisecond,
				VIPs: []VIP{
					{netip.MustParsePrefix("10.50.0.1/24"), "eth0"},
					{netip.MustParsePrefix("192.0.2.100/24"), "eth1"},
					{netip.MustParsePrefix("192.0.2.101/24"), "eth1"},
				},
				DrainFile: c.Paths.DrainFile, StateFile: c.Paths.StateFile, Conntrackd: "/opt/conntrack/sbin/conntrackd",
				SyncInterface: "eth2", PeerSyncAddr: netip.MustParseAddr("10.51.0.1"), SyncPort: 3790,
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := installIn(t, tc.cfg, t.TempDir())
			got, err := ReadInstalled(c.Paths.Keepalived)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want(c), got, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("ReadInstalled (-want +got):\n%s", diff)
			}
		})
	}
	// The node of lower priority of a preempting pair preempts at once.
	low := labA()
	low.Node, low.Peer = low.Peer, low.Node
	c := installIn(t, low, t.TempDir())
	if got, err := ReadInstalled(c.Paths.Keepalived); err != nil || !got.Preempt || got.PreemptDelay != 0 {
		t.Errorf("lower node: %+v, %v; want Preempt without a delay", got, err)
	}
}

// TestReadInstalledRefuses: files that are not the templates' are refused
// with an error that says so, naming the file.
func TestReadInstalledRefuses(t *testing.T) {
	dir := t.TempDir()
	c := installIn(t, labA(), dir)
	ka, _ := os.ReadFile(c.Paths.Keepalived)
	hook, _ := os.ReadFile(c.Paths.Hook)
	for _, tc := range []struct {
		name   string
		ka     string
		hook   string
		remove string
		want   string
	}{
		{"someone else's keepalived.conf", "vrrp_instance VI_1 {\n    state MASTER\n}\n", "", "", "has no vrrp_sync_group egress_gateway"},
		{"no drain", strings.Replace(string(ka), "track_file drain {", "track_file other {", 1), "", "", "has no track_file drain"},
		{"no hook", strings.Replace(string(ka), "    notify \"", "    # notify \"", 1), "", "", "has no notify hook"},
		{"hook gone", "", "", c.Paths.Hook, "the notify hook that " + c.Paths.Keepalived + " names"},
		{"someone else's hook", "", "#!/bin/sh\nexit 0\n", "", "sets no CONNTRACKD"},
		{"conntrackd.conf gone", "", "", c.Paths.ConntrackdConf, "the conntrackd.conf that " + c.Paths.Hook + " names"},
		{"no keepalived.conf", "", "", c.Paths.Keepalived, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			installIn(t, labA(), dir)
			if tc.ka != "" {
				os.WriteFile(c.Paths.Keepalived, []byte(tc.ka), 0o644)
			}
			if tc.hook != "" {
				os.WriteFile(c.Paths.Hook, []byte(tc.hook), 0o755)
			}
			if tc.remove != "" {
				os.Remove(tc.remove)
			}
			if _, err := ReadInstalled(c.Paths.Keepalived); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ReadInstalled: %v, want an error saying %q", err, tc.want)
			}
		})
	}
	os.WriteFile(c.Paths.Hook, hook, 0o755)
	if _, err := ReadInstalled("/dev/null"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("ReadInstalled(/dev/null): %v, want it refused as not a regular file", err)
	}
}

func TestMasterDown(t *testing.T) {
	if got := MasterDown(100 * time.Millisecond); got != 350*time.Millisecond {
		t.Errorf("MasterDown(100ms) = %s, want 350ms", got)
	}
}
