package lab

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// TestFirewalld starts firewalld in a lab, masquerades its zone, reloads it
// and stops it, and checks that it ran in the lab only: its table is in the
// lab's namespace, the machine's /etc/firewalld is untouched, and after Stop
// none of its processes or its bus is left.
func TestFirewalld(t *testing.T) {
	RequireFirewalld(t)
	etcBefore := treeDigest(t, "/etc/firewalld")
	l := New(t)
	l.StartProbe(t)
	fw := StartFirewalld(t, l)

	fw.Cmd(t, "--zone=public", "--change-interface=eth0")
	fw.Cmd(t, "--zone=public", "--add-masquerade")
	if got := strings.TrimSpace(fw.Cmd(t, "--get-zone-of-interface=eth0")); got != "public" {
		t.Errorf("zone of eth0: %q, want public", got)
	}
	tables := l.Run(t, "nft", "list", "tables")
	if !strings.Contains(tables, "table inet firewalld") {
		t.Fatalf("nft list tables in the lab: no firewalld table:\n%s", tables)
	}
	// Masquerade rewrites even a source the application bound.
	if got := l.SourceSeenFrom(t, "203.0.113.7", "192.0.2.23"); got != "192.0.2.250" {
		t.Errorf("bound to 192.0.2.23 through the masquerading zone: far side saw %q, want 192.0.2.250", got)
	}
	fw.Reload(t)
	// The runtime masquerade is gone after a reload: the permanent zone has none.
	if got := l.SourceSeenFrom(t, "203.0.113.7", "192.0.2.23"); got != "192.0.2.23" {
		t.Errorf("after --reload, bound to 192.0.2.23: far side saw %q, want 192.0.2.23", got)
	}

	pids := []int{fw.fw.cmd.Process.Pid, fw.bus.cmd.Process.Pid}
	fw.Stop(t)
	for _, pid := range pids {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
			t.Errorf("process %d still exists after Stop", pid)
		}
	}
	if tables := l.Run(t, "nft", "list", "tables"); strings.Contains(tables, "firewalld") {
		t.Errorf("after Stop the lab still has firewalld's table:\n%s", tables)
	}
	if etcAfter := treeDigest(t, "/etc/firewalld"); etcAfter != etcBefore {
		t.Errorf("/etc/firewalld changed:\nbefore:\n%s\nafter:\n%s", etcBefore, etcAfter)
	}
}

// treeDigest lists the files under dir with their size, mode and time.
func treeDigest(t *testing.T, dir string) string {
	t.Helper()
	out, err := exec.Command("find", dir, "-printf", "%p %s %m %T@\\n").CombinedOutput()
	if err != nil {
		t.Fatalf("find %s: %v\n%s", dir, err, out)
	}
	return string(out)
}
