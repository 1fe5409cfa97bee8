package lab

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDocker runs two Docker instances at once, in two labs, with the same
// network name and subnet, to show that they share nothing.
func TestDocker(t *testing.T) {
	RequireDocker(t)
	var dirs [2]string
	t.Run("group", func(t *testing.T) {
		t.Run("restart", func(t *testing.T) {
			t.Parallel()
			l := New(t)
			l.StartProbe(t)
			d := StartDocker(t, l)
			dirs[0] = d.dir
			d.NetworkCreate(t, "es-net", "10.89.0.0/24", "fd00:89::/64")

			for _, c := range []struct{ dst, want string }{
				{"198.51.100.4", "192.0.2.250"},
				{"2001:db8:ffff::4", "2001:db8::250"},
			} {
				if got := d.SourceSeen(t, "es-net", c.dst); got != c.want {
					t.Errorf("container to %s: far side saw %q, want %q (Docker's MASQUERADE)", c.dst, got, c.want)
				}
			}
			iptables := iptablesCmd(t, "iptables", "")
			rule1 := func() string {
				t.Helper()
				return strings.Split(l.Run(t, iptables, "-t", "nat", "-S", "POSTROUTING"), "\n")[1]
			}
			if got, want := rule1(), "-A POSTROUTING -s 10.89.0.0/24 ! -o br-"; !strings.HasPrefix(got, want) {
				t.Errorf("after network create, POSTROUTING rule 1 = %q, want %s...", got, want)
			}

			// Something of ours at position 1, as egress-snat's jump would be.
			l.Run(t, iptables, "-t", "nat", "-I", "POSTROUTING", "1", "-d", "203.0.113.7", "-j", "SNAT", "--to-source", "192.0.2.23")
			d.Restart(t)
			if got, want := rule1(), "-A POSTROUTING -s "+DockerBridge+" ! -o docker0 -j MASQUERADE"; got != want {
				t.Errorf("after Restart, POSTROUTING rule 1 = %q, want %q\n%s", got, want, l.Ruleset(t))
			}
			if got := d.SourceSeen(t, "es-net", "198.51.100.4"); got != "192.0.2.250" {
				t.Errorf("after Restart, container: far side saw %q, want 192.0.2.250", got)
			}
			// The default bridge's MASQUERADE, back at 1, now shadows our
			// rule; es-net's, still below it, does not.
			if got := d.SourceSeen(t, "bridge", "203.0.113.7"); got != "192.0.2.250" {
				t.Errorf("default bridge to 203.0.113.7 after Restart: far side saw %q, want 192.0.2.250 (MASQUERADE first)", got)
			}
			if got := d.SourceSeen(t, "es-net", "203.0.113.7"); got != "192.0.2.23" {
				t.Errorf("es-net to 203.0.113.7 after Restart: far side saw %q, want 192.0.2.23 (our rule first)", got)
			}
		})
		t.Run("with client", func(t *testing.T) {
			t.Parallel()
			l := New(t)
			l.StartProbe(t)
			// Before StartDocker: forwarding is then on already, and Docker
			// leaves H's FORWARD policy at ACCEPT.
			c := l.AddClient(t, ClientOptions{Masquerade: true})
			d := StartDocker(t, l)
			dirs[1] = d.dir
			d.NetworkCreate(t, "es-net", "10.89.0.0/24")
			if got := d.SourceSeen(t, "es-net", "198.51.100.4"); got != "192.0.2.250" {
				t.Errorf("container: far side saw %q, want 192.0.2.250", got)
			}
			if got := c.SourceSeen(t, "198.51.100.4"); got != "192.0.2.250" {
				t.Errorf("client next to Docker: far side saw %q, want 192.0.2.250", got)
			}
		})
	})
	for _, dir := range dirs {
		if dir == "" {
			continue // skipped, or failed before starting Docker
		}
		if left := processesNaming(dir); len(left) > 0 {
			t.Errorf("processes of %s left behind: %v", dir, left)
		}
		if m := mountsUnder(dir); len(m) > 0 {
			t.Errorf("mounts left behind: %v", m)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("%s left behind: %v", dir, err)
		}
		for _, mnt := range cgroupMounts() {
			if _, err := os.Stat(filepath.Join(mnt, filepath.Base(dir))); !os.IsNotExist(err) {
				t.Errorf("cgroup %s left behind in %s: %v", filepath.Base(dir), mnt, err)
			}
		}
	}
}
