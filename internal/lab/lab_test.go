package lab

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

func TestLab(t *testing.T) {
	var host, gw string
	t.Run("probe", func(t *testing.T) {
		l := New(t, WithSecondNIC())
		host, gw = l.Host, l.Gateway
		l.StartProbe(t)

		for _, c := range []struct{ dst, bind, want string }{
			{"198.51.100.4", "", "192.0.2.250"},
			{"203.0.113.7", "", "192.0.2.250"},
			{"2001:db8:ffff::4", "", "2001:db8::250"},
			{"198.51.100.4", "192.0.2.22", "192.0.2.22"},
			{"2001:db8:ffff::4", "2001:db8::23", "2001:db8::23"},
			{"203.0.113.129", "", "203.0.113.130"}, // second NIC
		} {
			if got := l.SourceSeenFrom(t, c.dst, c.bind); got != c.want {
				t.Errorf("dst %s bind %q: far side saw %q, want %q", c.dst, c.bind, got, c.want)
			}
		}
		l.Run(t, "ip", "route", "add", "unreachable", "198.51.100.99/32")
		if got := l.SourceSeen(t, "198.51.100.99"); got != "" {
			t.Errorf("unreachable dst: got %q, want \"\"", got)
		}
		if got := l.Seen()["192.0.2.250"]; got != 2 {
			t.Errorf("Seen[192.0.2.250] = %d, want 2 (all: %v)", got, l.Seen())
		}
		l.ResetSeen()
		if len(l.Seen()) != 0 {
			t.Errorf("Seen after ResetSeen = %v", l.Seen())
		}

		for _, c := range []struct{ dst, want string }{
			{"198.51.100.4", "192.0.2.250"},
			{"2001:db8:ffff::4", "2001:db8::250"},
		} {
			f := l.UDPFlow(t, c.dst)
			for range 2 {
				if got, err := f.Ask(); err != nil || got != c.want {
					t.Errorf("UDP %s: got %q, %v; want %q", c.dst, got, err, c.want)
				}
			}
			f.Close()
		}

		l.HostAddrAdd(t, "2001:db8::99/64", "eth0")
		if got := l.SourceSeenFrom(t, "2001:db8:ffff::4", "2001:db8::99"); got != "2001:db8::99" {
			t.Errorf("added address: got %q", got)
		}
		l.HostAddrDel(t, "2001:db8::99/64", "eth0")

		if _, _, code := l.RunErr("false"); code != 1 {
			t.Errorf("RunErr(false) exit = %d, want 1", code)
		}
		if out := l.Run(t, "ip", "-o", "link", "show", "eth1"); !strings.Contains(out, "eth1") {
			t.Errorf("eth1 missing: %s", out)
		}
		iptables := "iptables" // the backend Ruleset reads
		if b := os.Getenv("EGRESS_SNAT_IPTABLES"); b != "" {
			iptables += "-" + b
		}
		l.Run(t, iptables, "-t", "nat", "-A", "POSTROUTING", "-p", "tcp", "-d", "203.0.113.7", "-j", "SNAT", "--to-source", "192.0.2.23")
		if got := l.SourceSeen(t, "203.0.113.7"); got != "192.0.2.23" {
			t.Errorf("after SNAT rule: far side saw %q, want 192.0.2.23", got)
		}
		rs := l.Ruleset(t)
		if !strings.Contains(rs, "-A POSTROUTING -d 203.0.113.7/32 -p tcp -j SNAT --to-source 192.0.2.23") ||
			!strings.Contains(rs, ":POSTROUTING ACCEPT [0:0]") || strings.Contains(rs, "\n#") {
			t.Errorf("unexpected ruleset:\n%s", rs)
		}
	})
	if host == "" {
		return // skipped
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v\n%s", err, out)
	}
	for _, ns := range []string{host, gw} {
		if strings.Contains(string(out), ns) {
			t.Errorf("netns %s left behind:\n%s", ns, out)
		}
	}
}

// TestSecondUplink: with a second uplink, eth0 stays the way out for both
// families (the backup defaults lose on metric), eth1 is reachable by its
// own subnets, and Arrivals tells the two links apart.
func TestSecondUplink(t *testing.T) {
	l := New(t, WithSecondUplink())
	l.StartProbe(t)
	for _, c := range []struct{ dst, bind, want, dev string }{
		{"198.51.100.4", "", "192.0.2.250", "eth0"},
		{"2001:db8:ffff::4", "", "2001:db8::250", "eth0"},
		{"203.0.113.129", "", "203.0.113.130", "eth1"},
		{"2001:db8:1::129", "", "2001:db8:1::130", "eth1"},
		// Bound to eth1's address, a far host is still reached by eth0.
		{"198.51.100.4", "203.0.113.130", "203.0.113.130", "eth0"},
	} {
		var seen string
		got := l.Arrivals(t, "tcp dst port 7000 and dst host "+c.dst, func() { seen = l.SourceSeenFrom(t, c.dst, c.bind) })
		other := map[string]string{"eth0": "eth1", "eth1": "eth0"}[c.dev]
		if seen != c.want || got[c.dev] == 0 || got[other] != 0 {
			t.Errorf("dst %s bind %q: far side saw %q, packets in on %v; want %q, only on %s", c.dst, c.bind, seen, got, c.want, c.dev)
		}
	}
	if out := l.Run(t, "ip", "-6", "route", "show", "default"); !strings.Contains(out, "via 2001:db8:1::129 dev eth1 metric 2048") {
		t.Errorf("no IPv6 backup default route through eth1:\n%s", out)
	}
}

// TestRulesetSeesSetMembers: a member of an ipset changed in place, the
// set's name unchanged, changes the Ruleset.
func TestRulesetSeesSetMembers(t *testing.T) {
	t.Parallel()
	l := New(t)
	l.Run(t, "ipset", "create", "egress-snat-t", "hash:net")
	l.Run(t, "ipset", "add", "egress-snat-t", "198.51.100.0/24")
	before := l.Ruleset(t)
	if !strings.Contains(before, "add egress-snat-t 198.51.100.0/24\n") {
		t.Fatalf("Ruleset has no member line:\n%s", before)
	}
	l.Run(t, "ipset", "del", "egress-snat-t", "198.51.100.0/24")
	l.Run(t, "ipset", "add", "egress-snat-t", "203.0.113.0/24")
	if after := l.Ruleset(t); after == before {
		t.Errorf("a member changed in place left the Ruleset the same:\n%s", after)
	}
}

func TestSortedIPSetSave(t *testing.T) {
	in := "create a hash:net family inet\nadd a 203.0.113.0/24\nadd a 198.51.100.0/24\ncreate b hash:ip family inet\nadd b 192.0.2.9\nadd b 192.0.2.1\n"
	want := "create a hash:net family inet\nadd a 198.51.100.0/24\nadd a 203.0.113.0/24\ncreate b hash:ip family inet\nadd b 192.0.2.1\nadd b 192.0.2.9\n"
	if got := SortedIPSetSave(in); got != want {
		t.Errorf("SortedIPSetSave:\n%s\nwant\n%s", got, want)
	}
}
