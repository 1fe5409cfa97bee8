package lab

import (
	"strings"
	"testing"
)

func TestClient(t *testing.T) {
	l := New(t)
	l.StartProbe(t)
	c0 := l.AddClient(t, ClientOptions{})
	c1 := l.AddClient(t, ClientOptions{Masquerade: true})
	if c0.Dev != "lan0" || c1.Dev != "lan1" || c0.Subnet4 == c1.Subnet4 || c0.Subnet6 == c1.Subnet6 {
		t.Fatalf("clients not distinct: %+v %+v", c0, c1)
	}

	if out := c1.Run(t, "ip", "-6", "route", "show", "default"); !strings.Contains(out, "via fd00:88:1::1 dev eth0") {
		t.Errorf("client 1's IPv6 default route: %q", out)
	}

	// Without NAT in H the SYN reaches G, but G cannot answer 10.88/16.
	if got := c0.SourceSeen(t, "198.51.100.4"); got != "" {
		t.Errorf("client 0 without masquerade: far side answered %q, want no answer", got)
	}
	for _, c := range []struct {
		dst, want string
	}{
		{"198.51.100.4", "192.0.2.250"},
		{"2001:db8:ffff::4", "2001:db8::250"},
	} {
		if got := c1.SourceSeen(t, c.dst); got != c.want {
			t.Errorf("client 1 (masquerade) to %s: far side saw %q, want %q", c.dst, got, c.want)
		}
	}

	// An SNAT rule for one client's subnet is what --from installs.
	l.Run(t, iptablesCmd(t, "iptables", ""), "-t", "nat", "-A", "POSTROUTING",
		"-s", c0.Subnet4.String(), "-j", "SNAT", "--to-source", "192.0.2.22")
	if got := c0.SourceSeen(t, "198.51.100.4"); got != "192.0.2.22" {
		t.Errorf("client 0 after SNAT -s %s: far side saw %q, want 192.0.2.22", c0.Subnet4, got)
	}
	c0.Masquerade(t) // inserted at 1, like Docker: it now wins over the SNAT rule
	if got := c0.SourceSeen(t, "198.51.100.4"); got != "192.0.2.250" {
		t.Errorf("client 0 after Masquerade: far side saw %q, want 192.0.2.250", got)
	}
	rules := l.Run(t, iptablesCmd(t, "iptables", ""), "-t", "nat", "-S", "POSTROUTING")
	if first := strings.Split(rules, "\n")[1]; first != "-A POSTROUTING -s 10.88.0.0/24 ! -o lan0 -j MASQUERADE" {
		t.Errorf("POSTROUTING rule 1 = %q, want client 0's MASQUERADE\n%s", first, rules)
	}
	if got := l.Seen()["192.0.2.250"]; got != 2 { // client 1, then client 0 masqueraded
		t.Errorf("Seen[192.0.2.250] = %d, want 2 (all: %v)", got, l.Seen())
	}
}
