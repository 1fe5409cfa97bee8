package selector

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/egress-snat/egress-snat/internal/lab"
)

// scratch is one network namespace that tests build topologies in and
// wipe between them: the lab's host namespace with its veth to G removed,
// so that nothing but what a topology adds takes part in routing. The
// interfaces of a topology are veth pairs d0/d0p, d1/d1p, ... with both
// ends inside the namespace (the container running the tests may have no
// dummy module); only dN carries addresses.
type scratch struct {
	ns string
	nl *netlink.Handle
	// links are the interface pairs created since the last reset.
	links []string
	// tables are the extra routing tables used since the last reset.
	tables map[int]bool
}

func newScratch(t *testing.T) *scratch {
	t.Helper()
	l := lab.New(t)
	s := &scratch{ns: l.Host, tables: map[int]bool{}}
	s.ip(t, "link", "del", "eth0")
	h, err := netns.GetFromName(l.Host)
	if err != nil {
		t.Fatalf("netns %s: %v", l.Host, err)
	}
	t.Cleanup(func() { h.Close() })
	s.nl, err = netlink.NewHandleAt(h)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", l.Host, err)
	}
	t.Cleanup(s.nl.Close)
	return s
}

func (s *scratch) ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", s.ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s %s: %v\n%s", s.ns, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// links adds n interfaces d0..d<n-1>, up.
func (s *scratch) addLinks(t *testing.T, n int) {
	t.Helper()
	var lines []string
	for i := range n {
		d := fmt.Sprintf("d%d", i)
		lines = append(lines,
			fmt.Sprintf("link add %s type veth peer name %sp", d, d),
			"link set "+d+"p up", "link set "+d+" up")
		s.links = append(s.links, d)
	}
	s.batch(t, lines, true)
}

// batch runs ip commands in the namespace, one process per family. A
// line may start with -4 or -6, which ip's batch mode does not take per
// line. With strict, any failing line fails the test; otherwise failures
// are ignored (-force), as a random topology may ask for what the kernel
// refuses, and what it accepted is dumped on failure anyway.
func (s *scratch) batch(t *testing.T, lines []string, strict bool) {
	t.Helper()
	byFamily := map[string][]string{}
	var families []string
	for _, l := range lines {
		if n, ok := tableOf(l); ok {
			s.tables[n] = true
		}
		fam := ""
		if f, rest, ok := strings.Cut(l, " "); ok && (f == "-4" || f == "-6") {
			fam, l = f, rest
		}
		if _, ok := byFamily[fam]; !ok {
			families = append(families, fam)
		}
		byFamily[fam] = append(byFamily[fam], l)
	}
	for _, fam := range families {
		args := []string{"-n", s.ns, "-batch", "-"}
		if fam != "" {
			args = append([]string{fam}, args...)
		}
		if !strict {
			args = append([]string{"-force"}, args...)
		}
		cmd := exec.Command("ip", args...)
		cmd.Stdin = strings.NewReader(strings.Join(byFamily[fam], "\n") + "\n")
		if out, err := cmd.CombinedOutput(); err != nil && strict {
			t.Fatalf("ip %s: %v\n%s\ninput:\n%s", strings.Join(args, " "), err, out, strings.Join(byFamily[fam], "\n"))
		}
	}
}

func tableOf(line string) (int, bool) {
	f := strings.Fields(line)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "table" || f[i] == "lookup" {
			var n int
			if _, err := fmt.Sscanf(f[i+1], "%d", &n); err == nil {
				return n, true
			}
		}
	}
	return 0, false
}

// reset removes everything a topology added: its interfaces (and with
// them their addresses and routes), every policy rule but the kernel's
// three, and the routes without an interface (unreachable and the like)
// in main and the extra tables.
func (s *scratch) reset(t *testing.T) {
	t.Helper()
	var lines []string
	for _, d := range s.links {
		lines = append(lines, "link del "+d)
	}
	for _, fam := range []string{"-4", "-6"} {
		lines = append(lines, fam+" rule flush",
			fam+" rule add priority 32766 lookup main",
			fam+" rule add priority 32767 lookup default",
			fam+" route flush table main proto boot",
			fam+" route flush table default")
		for n := range s.tables {
			lines = append(lines, fmt.Sprintf("%s route flush table %d", fam, n))
		}
	}
	s.links, s.tables = nil, map[int]bool{}
	// Flushing an empty table fails; that is fine.
	s.batch(t, lines, false)
	for _, fam := range []string{"-4", "-6"} {
		if r := s.ip(t, fam, "rule"); strings.Count(r, "\n") != 3 {
			t.Fatalf("reset left rules:\n%s", r)
		}
	}
}

// dump is the topology as ip prints it, for failure messages.
func (s *scratch) dump(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"addr"}, {"-4", "rule"}, {"-6", "rule"},
		{"-4", "route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
	} {
		fmt.Fprintf(&b, "# ip %s\n", strings.Join(args, " "))
		for line := range strings.Lines(s.ip(t, args...)) {
			if strings.Contains(line, "fe80::") || strings.HasPrefix(line, "multicast ff00::") {
				continue
			}
			b.WriteString(line)
		}
	}
	return b.String()
}

// kernelAnswer is what `ip route get` says for one destination.
type kernelAnswer struct {
	Type    string `json:"type"`
	Dev     string `json:"dev"`
	Gateway string `json:"gateway"`
	Src     string `json:"prefsrc"`
	Table   string `json:"table"`
	// Err is ip's complaint when the kernel has no route.
	Err string `json:"-"`
}

// sent reports whether the kernel would send traffic to the destination
// out with a source address: the only answers the selector gives.
func (k kernelAnswer) sent() bool {
	return k.Err == "" && (k.Type == "" || k.Type == "unicast") && k.Src != ""
}

func (k kernelAnswer) String() string {
	if k.Err != "" {
		return "error " + k.Err
	}
	return fmt.Sprintf("type %q dev %s via %q src %s", k.Type, k.Dev, k.Gateway, k.Src)
}

// routeGetNS runs `ip -j route get dst extra...` in the namespace.
func (s *scratch) routeGet(t *testing.T, dst netip.Addr, extra ...string) kernelAnswer {
	t.Helper()
	args := append([]string{"-n", s.ns, "-j", "route", "get", dst.String()}, extra...)
	cmd := exec.Command("ip", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && strings.Contains(stderr.String(), "RTNETLINK answers") {
			return kernelAnswer{Err: strings.TrimSpace(strings.TrimPrefix(stderr.String(), "RTNETLINK answers: "))}
		}
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	var ks []kernelAnswer
	if err := json.Unmarshal(out, &ks); err != nil || len(ks) != 1 {
		t.Fatalf("ip %s: %v in %q", strings.Join(args, " "), err, out)
	}
	return ks[0]
}

// disagreement says how a selector's answer differs from the kernel's, or
// "" when they agree: the same interface, gateway and source when the
// kernel sends the traffic out, an input error (IsInput) when it does not.
func disagreement(k kernelAnswer, iface string, gw, src netip.Addr, err error) string {
	if !k.sent() {
		switch {
		case err == nil:
			return fmt.Sprintf("selector: dev %s via %q src %s; kernel: %s", iface, addrString(gw), src, k)
		case !IsInput(err):
			return fmt.Sprintf("selector: %v (not an input error); kernel: %s", err, k)
		}
		return ""
	}
	if err != nil {
		return fmt.Sprintf("selector: %v; kernel: %s", err, k)
	}
	if iface != k.Dev || addrString(gw) != k.Gateway || src.String() != k.Src {
		return fmt.Sprintf("selector: dev %s via %q src %s; kernel: %s", iface, addrString(gw), src, k)
	}
	return ""
}

func host(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// netlinkOnly returns a selector that never uses the user-space FIB, so
// that every destination is a kernel lookup: the path the FIB stands in for.
func netlinkOnly(nl Netlink) *Selector {
	s := New(nl)
	s.fib = &fib4{}
	return s
}
