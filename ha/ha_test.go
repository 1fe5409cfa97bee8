package ha

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/ from the templates")

// labA is node A of the lab's pair (internal/lab/ha.go): preempting, each
// instance advertising on its own interface, default paths.
func labA() Config {
	return Config{
		Node:            Node{Name: "gw-a", Priority: 150, SyncAddr: netip.MustParseAddr("10.51.0.1")},
		Peer:            Node{Name: "gw-b", Priority: 100, SyncAddr: netip.MustParseAddr("10.51.0.2")},
		ClientVIP:       netip.MustParsePrefix("10.50.0.1/24"),
		ClientInterface: "lan",
		EgressVIPs:      []netip.Prefix{netip.MustParsePrefix("192.0.2.100/24")},
		EgressInterface: "uplink",
		ClientRouterID:  50,
		EgressRouterID:  51,
		Preempt:         true,
		Sync:            SyncLink{Interface: "sync"},
	}
}

// nopreemptB is a node B with everything optional set: nopreempt, adverts
// on a dedicated interface, two egress addresses, its own paths and log.
func nopreemptB() Config {
	return Config{
		Node:            Node{Name: "gw-b", Priority: 100, SyncAddr: netip.MustParseAddr("10.51.0.2")},
		Peer:            Node{Name: "gw-a", Priority: 150, SyncAddr: netip.MustParseAddr("10.51.0.1")},
		ClientVIP:       netip.MustParsePrefix("10.50.0.1/24"),
		ClientInterface: "eth0",
		EgressVIPs: []netip.Prefix{
			netip.MustParsePrefix("192.0.2.100/24"),
			netip.MustParsePrefix("192.0.2.101/24"),
		},
		EgressInterface: "eth1",
		VRRPInterface:   "eth2",
		ClientRouterID:  60,
		EgressRouterID:  61,
		AdvertInterval:  250 * time.Millisecond,
		PurgeTimeout:    30 * time.Second,
		Sync:            SyncLink{Interface: "eth2", Port: 3790},
		NoSync:          []netip.Prefix{netip.MustParsePrefix("192.0.2.3/32"), netip.MustParsePrefix("10.50.0.0/29")},
		Paths: Paths{
			Keepalived:       "/srv/ha/keepalived.conf",
			ConntrackdConf:   "/srv/ha/conntrackd.conf",
			Conntrackd:       "/opt/conntrack/sbin/conntrackd",
			ConntrackdLock:   "/run/ha/conntrackd.lock",
			ConntrackdSocket: "/run/ha/conntrackd.ctl",
			Hook:             "/srv/ha/notify.sh",
			WatchPIDFile:     "/run/ha/watch.pid",
			DrainFile:        "/run/ha/drain",
			StateFile:        "/run/ha/state",
			HookLog:          "/var/log/egress-snat-ha.log",
		},
	}
}

// TestGolden compares each rendered file with testdata/CASE/FILE exactly.
// go test ./ha -run TestGolden -update rewrites them; review the diff.
func TestGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"lab-a", labA()},
		{"nopreempt-b", nopreemptB()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files, err := Files(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			golden := map[string]string{
				"keepalived.conf": files[0].Content,
				"conntrackd.conf": files[1].Content,
				"notify.sh":       files[2].Content,
				"sysctl.conf":     files[3].Content,
			}
			for name, got := range golden {
				path := filepath.Join("testdata", tc.name, name)
				if *update {
					if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
						t.Fatal(err)
					}
					continue
				}
				want, err := os.ReadFile(path)
				if err != nil {
					t.Fatalf("%v (go test ./ha -run TestGolden -update writes it)", err)
				}
				if diff := cmp.Diff(string(want), got); diff != "" {
					t.Errorf("%s differs from the template's output (-golden +rendered):\n%s", path, diff)
				}
			}
		})
	}
}

// TestFiles checks where each file goes and with which mode.
func TestFiles(t *testing.T) {
	files, err := Files(labA())
	if err != nil {
		t.Fatal(err)
	}
	type pm struct {
		Path string
		Mode uint32
	}
	var got []pm
	for _, f := range files {
		got = append(got, pm{f.Path, f.Mode})
	}
	want := []pm{
		{"/etc/keepalived/keepalived.conf", 0o644},
		{"/etc/conntrackd/conntrackd.conf", 0o644},
		{"/etc/keepalived/egress-snat-notify.sh", 0o755},
		{"/etc/sysctl.d/60-egress-snat-ha.conf", 0o644},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Files (-want +got):\n%s", diff)
	}
}

// TestPreemptModes: nopreempt and preempt_delay are each rendered only in
// their mode, in both instances.
func TestPreemptModes(t *testing.T) {
	pre, err := Keepalived(labA())
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(pre, "\n    preempt_delay 2\n"); n != 2 {
		t.Errorf("preempting node: %d instances with preempt_delay 2, want 2\n%s", n, pre)
	}
	if strings.Contains(pre, "nopreempt") {
		t.Errorf("preempting node says nopreempt:\n%s", pre)
	}
	c := labA()
	c.PreemptDelay = 3500 * time.Millisecond
	if s, _ := Keepalived(c); strings.Count(s, "preempt_delay 3.5\n") != 2 {
		t.Errorf("preempt delay 3.5s: want preempt_delay 3.5 twice:\n%s", s)
	}
	if !strings.Contains(pre, "    weight -253\n") {
		t.Errorf("preempting node: want the drain file to lower the priority (weight -253):\n%s", pre)
	}

	// The peer of lower priority preempts at once.
	low := labA()
	low.Node, low.Peer = low.Peer, low.Node
	lo, err := Keepalived(low)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(lo, "preempt_delay") || strings.Contains(lo, "nopreempt") || !strings.Contains(lo, "    weight -253\n") {
		t.Errorf("preempting node of lower priority: want neither preempt_delay nor nopreempt, and the drain by priority:\n%s", lo)
	}

	c.Preempt, c.PreemptDelay = false, 0
	no, err := Keepalived(c)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(no, "\n    nopreempt\n"); n != 2 || strings.Contains(no, "preempt_delay") {
		t.Errorf("nopreempt node: %d nopreempt lines, want 2 and no preempt_delay:\n%s", n, no)
	}
	if !strings.Contains(no, "    weight 0\n") {
		t.Errorf("nopreempt node: want the drain file to mean FAULT (weight 0):\n%s", no)
	}
}

// TestValidate: each bad input is refused with an error that names the
// bad value; several problems are all reported.
func TestValidate(t *testing.T) {
	if err := labA().Validate(); err != nil {
		t.Fatalf("lab A: %v", err)
	}
	if err := nopreemptB().Validate(); err != nil {
		t.Fatalf("nopreempt B: %v", err)
	}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string
	}{
		{"no node name", func(c *Config) { c.Node.Name = "" }, []string{`node name ""`}},
		{"name with a space", func(c *Config) { c.Peer.Name = "gw b" }, []string{`peer name "gw b"`}},
		{"same names", func(c *Config) { c.Peer.Name = "gw-a" }, []string{`both named "gw-a"`}},
		{"owner priority", func(c *Config) { c.Node.Priority = 255 }, []string{"priority 255", "address owner"}},
		{"zero priority", func(c *Config) { c.Peer.Priority = 0 }, []string{"peer gw-b priority 0"}},
		{"equal priorities", func(c *Config) { c.Peer.Priority = 150 }, []string{"both have priority 150"}},
		{"no sync address", func(c *Config) { c.Peer.SyncAddr = netip.Addr{} }, []string{"peer gw-b: no sync link address"}},
		{"same sync address", func(c *Config) { c.Peer.SyncAddr = c.Node.SyncAddr }, []string{"share the sync address 10.51.0.1"}},
		{"sync families", func(c *Config) { c.Peer.SyncAddr = netip.MustParseAddr("fd00::2") }, []string{"10.51.0.1 and fd00::2 are of different families"}},
		{"no client VIP", func(c *Config) { c.ClientVIP = netip.Prefix{} }, []string{"client VIP: no address"}},
		{"client VIP /32", func(c *Config) { c.ClientVIP = netip.MustParsePrefix("10.50.0.1/32") }, []string{"client VIP 10.50.0.1/32", "prefix length"}},
		{"IPv6 egress", func(c *Config) { c.EgressVIPs = []netip.Prefix{netip.MustParsePrefix("2001:db8::100/64")} }, []string{"egress VIP 2001:db8::100/64: only IPv4"}},
		{"no egress", func(c *Config) { c.EgressVIPs = nil }, []string{"no egress VIP"}},
		{"egress is client", func(c *Config) { c.EgressVIPs = []netip.Prefix{netip.MustParsePrefix("10.50.0.1/24")} }, []string{"egress VIP 10.50.0.1 is named twice"}},
		{"bad interface", func(c *Config) { c.EgressInterface = "up link" }, []string{`egress interface "up link"`}},
		{"long interface", func(c *Config) { c.ClientInterface = "averyveryverylongname" }, []string{`client interface "averyveryverylongname"`}},
		{"no sync interface", func(c *Config) { c.Sync.Interface = "" }, []string{`sync interface ""`}},
		{"bad VRRP interface", func(c *Config) { c.VRRPInterface = "-x" }, []string{`VRRP interface "-x"`}},
		{"router id 0", func(c *Config) { c.ClientRouterID = 0 }, []string{"client virtual_router_id 0"}},
		{"router id 256", func(c *Config) { c.EgressRouterID = 256 }, []string{"egress virtual_router_id 256"}},
		{"same router ids", func(c *Config) { c.EgressRouterID = 50 }, []string{"both instances have virtual_router_id 50"}},
		{"advert 5ms", func(c *Config) { c.AdvertInterval = 5 * time.Millisecond }, []string{"advert interval 5ms"}},
		{"advert 105ms", func(c *Config) { c.AdvertInterval = 105 * time.Millisecond }, []string{"advert interval 105ms", "steps of 10ms"}},
		{"delay without preempt", func(c *Config) { c.Preempt = false; c.PreemptDelay = time.Second }, []string{"preempt delay 1s without Preempt"}},
		{"negative delay", func(c *Config) { c.PreemptDelay = -time.Second }, []string{"preempt delay -1s"}},
		{"port", func(c *Config) { c.Sync.Port = 70000 }, []string{"sync port 70000"}},
		{"purge 1.5s", func(c *Config) { c.PurgeTimeout = 1500 * time.Millisecond }, []string{"purge timeout 1.5s"}},
		{"purge after preemption", func(c *Config) { c.PurgeTimeout = 2 * time.Second }, []string{"purge timeout 2s is not shorter than the preempt delay 2s"}},
		{"no-sync host bits", func(c *Config) { c.NoSync = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24")} }, []string{"192.0.2.3/24 has host bits set; did you mean 192.0.2.0/24?"}},
		{"relative path", func(c *Config) { c.Paths.Hook = "notify.sh" }, []string{`hook path "notify.sh"`}},
		{"path with a quote", func(c *Config) { c.Paths.DrainFile = "/run/it's" }, []string{`drain file "/run/it's"`}},
		{"unclean path", func(c *Config) { c.Paths.HookLog = "/var/log/../x" }, []string{`hook log "/var/log/../x"`}},
		{"relative state file", func(c *Config) { c.Paths.StateFile = "run/state" }, []string{`state file "run/state"`}},
		{"two problems", func(c *Config) { c.Node.Priority = 0; c.Sync.Port = -1 }, []string{"node gw-a priority 0", "sync port -1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := labA()
			tc.edit(&c)
			err := c.Validate()
			if err == nil {
				t.Fatalf("Validate: nil, want an error naming %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate: %q, want it to name %q", err, w)
				}
			}
			// Every renderer refuses what Validate refuses.
			for name, fn := range map[string]func(Config) (string, error){"Keepalived": Keepalived, "Conntrackd": Conntrackd, "Hook": Hook} {
				if _, rerr := fn(c); rerr == nil || rerr.Error() != err.Error() {
					t.Errorf("%s: error %v, want Validate's %v", name, rerr, err)
				}
			}
			if _, ferr := Files(c); ferr == nil {
				t.Errorf("Files: no error, want Validate's")
			}
		})
	}
}

// TestDefaultsDoNotLeak: rendering fills defaults into a copy; the
// caller's Config is unchanged.
func TestDefaultsDoNotLeak(t *testing.T) {
	c := labA()
	if _, err := Files(c); err != nil {
		t.Fatal(err)
	}
	if c.AdvertInterval != 0 || c.PreemptDelay != 0 || c.Paths != (Paths{}) || c.Sync.Port != 0 || c.PurgeTimeout != 0 {
		t.Errorf("Files changed its argument: %+v", c)
	}
}

// TestSysctlConf: every setting is written once, with its reason above it.
func TestSysctlConf(t *testing.T) {
	conf := SysctlConf()
	for _, s := range Sysctls {
		line := s.Key + " = " + s.Value + "\n"
		if strings.Count(conf, line) != 1 {
			t.Errorf("SysctlConf: want %q once:\n%s", line, conf)
		}
		before, _, _ := strings.Cut(conf, line)
		if !strings.HasSuffix(strings.TrimSuffix(before, "\n"), lastWords(s.Why)) {
			t.Errorf("SysctlConf: %s is not right after its reason %q", s.Key, s.Why)
		}
	}
	for _, want := range []string{"net.netfilter.nf_conntrack_tcp_be_liberal", "net.ipv4.ip_forward", "arp_ignore", "arp_announce"} {
		if !strings.Contains(conf, want) {
			t.Errorf("SysctlConf lacks %s", want)
		}
	}
}

// lastWords is the end of a reason as wrap leaves it on its last line.
func lastWords(why string) string {
	f := strings.Fields(why)
	return f[len(f)-1]
}
