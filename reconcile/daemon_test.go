package reconcile_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/conntrack"
	"github.com/egress-snat/egress-snat/reconcile"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/selector"
	"github.com/egress-snat/egress-snat/snat"
)

// TestDaemonWithFakes drives a daemon over the stateful fakes of the
// kernel (tables, sets, routes) and of the host's addresses: the first
// reconcile writes the file, the canary repairs a chain flushed behind its
// back, an address that leaves moves its rules to the next of their
// failover list and deletes the flows bound to it, the rules left out when
// no address is left are reported once per cause and when they are back,
// a bad file on reload keeps the previous desired state, and a stopped
// daemon refuses requests.
func TestDaemonWithFakes(t *testing.T) {
	h := newFakeHost(t)
	h.write(t, "rules:\n  - to: [192.0.2.22, 192.0.2.23]\n    dst: [198.51.100.0/24, 203.0.113.7]\n")
	d := h.start(t)
	ctx := t.Context()

	// The first reconcile, at start, writes the file; the health file
	// appears when it ended.
	h.awaitHealth(t)
	want := []string{"203.0.113.7/32 -> 192.0.2.22", "198.51.100.0/24 -> 192.0.2.22"}
	h.wantInstalled(t, "after the first reconcile", want)
	if b, err := os.ReadFile(h.health); err != nil || string(b) != "ready\n" {
		t.Errorf("health file: %q, %v; want ready", b, err)
	}

	// Another program flushes our chain: the canary sees the generation
	// move and writes the last plan back, without resolving again.
	if err := h.tables.Restore(snat.IPv4, "*nat\n-F "+iptables.ChainName+"\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	if !h.await(t, "converged", `"reason":"drift: `) {
		t.Fatalf("a flushed chain was not repaired\nlog:\n%s", h.log)
	}
	h.wantInstalled(t, "after the repair", want)

	// 192.0.2.22 leaves the host: its rules fail over to .23, and the
	// flows bound to .22 are deleted, in one deletion for both rules.
	h.router.remove("192.0.2.22")
	if err := d.Reconcile(ctx, "test: .22 gone"); err != nil {
		t.Fatal(err)
	}
	h.wantInstalled(t, "with 192.0.2.22 gone", []string{"203.0.113.7/32 -> 192.0.2.23", "198.51.100.0/24 -> 192.0.2.23"})
	if got := h.flushed(); len(got) != 1 || got[0].To != netip.MustParseAddr("192.0.2.22") || len(got[0].Dsts) != 2 {
		t.Errorf("conntrack deletions with 192.0.2.22 gone: %+v, want one of 192.0.2.22 for both destinations", got)
	}

	// .23 leaves too: the rules are left out, said once however often
	// the host is looked up again.
	h.router.remove("192.0.2.23")
	for i := range 2 {
		if err := d.Reconcile(ctx, fmt.Sprintf("test: .23 gone %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	h.wantInstalled(t, "with both addresses gone", nil)
	if n := h.count("rule left out until its address or route returns"); n != 1 || h.count("rule left out until", `"rules":2`) != 1 {
		t.Errorf("rules left out: %d warnings, want one for both rules\nlog:\n%s", n, h.log)
	}
	h.router.add("192.0.2.22")
	if err := d.Reconcile(ctx, "test: .22 back"); err != nil {
		t.Fatal(err)
	}
	h.wantInstalled(t, "with 192.0.2.22 back", want)
	if h.count("rule left out is back") != 1 {
		t.Errorf("rules back: not said\nlog:\n%s", h.log)
	}

	// A file that does not load is refused, as bad input, and the daemon
	// keeps what it had.
	h.write(t, "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.300\n")
	var inv *snat.InvalidError
	if err := d.Reload(ctx, "test"); !errors.As(err, &inv) {
		t.Errorf("reload of a bad file: %v, want bad input", err)
	}
	if err := d.Reconcile(ctx, "test: after the bad file"); err != nil {
		t.Errorf("reconcile after a bad file: %v", err)
	}
	h.wantInstalled(t, "after a bad file", want)

	h.stop(t)
	if err := d.Reconcile(ctx, "test: stopped"); !errors.Is(err, reconcile.ErrStopped) {
		t.Errorf("reconcile of a stopped daemon: %v, want ErrStopped", err)
	}
}

// TestDaemonReloadsFile: Reload reads a changed file and converges on it;
// the answer comes once the kernel holds the new file.
func TestDaemonReloadsFile(t *testing.T) {
	h := newFakeHost(t)
	h.write(t, "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n")
	d := h.start(t)
	h.awaitHealth(t)
	h.write(t, "rules:\n  - to: 192.0.2.23\n    dst: [198.51.100.4, 198.51.100.5]\n")
	if err := d.Reload(t.Context(), "test"); err != nil {
		t.Fatalf("reload: %v", err)
	}
	h.wantInstalled(t, "after the reload", []string{"198.51.100.4/32 -> 192.0.2.23", "198.51.100.5/32 -> 192.0.2.23"})
	if h.count(`"msg":"reload: file re-read","trigger":"test"`) != 1 {
		t.Errorf("reload not logged\nlog:\n%s", h.log)
	}
}

// TestDaemonStandby: a standby rule whose address the host lacks is
// installed and held; when the address arrives it stays held until
// someone activates it (Reload, as the HA hook's SIGHUP) or the fallback
// runs out; when the address leaves it is held again and no flow of it is
// deleted (they went to the peer).
func TestDaemonStandby(t *testing.T) {
	h := newFakeHost(t)
	h.activateAfter = time.Hour
	h.write(t, "rules:\n  - to: 192.0.2.100\n    from: [10.50.0.0/24]\n    standby: true\n")
	d := h.start(t)
	h.awaitHealth(t)
	h.wantHeld(t, "the peer holds the address", true)
	if h.count("standing by: the address is not here") != 1 {
		t.Errorf("standing by not said once\nlog:\n%s", h.log)
	}

	// The address arrives (keepalived): held until activated.
	h.router.add("192.0.2.100")
	h.event("test: address added")
	if !h.await(t, "standby address arrived") {
		t.Fatalf("arrival not seen\nlog:\n%s", h.log)
	}
	h.wantHeld(t, "arrived, not activated", true)
	if err := d.Reload(t.Context(), "hangup"); err != nil {
		t.Fatal(err)
	}
	h.wantHeld(t, "activated", false)

	// It leaves: held again, and its flows are left to the peer.
	h.router.remove("192.0.2.100")
	h.event("test: address deleted")
	for i := 0; i < 500 && h.count(`"msg":"converged"`) < 3; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if h.count("standing by: the address is not here") != 2 {
		t.Fatalf("leaving not seen\nlog:\n%s", h.log)
	}
	h.wantHeld(t, "left", true)
	if got := h.flushed(); len(got) != 0 {
		t.Errorf("conntrack deletions for a standby address: %+v, want none", got)
	}
	h.stop(t)

	// Without anyone to activate it, the fallback does.
	h2 := newFakeHost(t)
	h2.activateAfter = 100 * time.Millisecond
	h2.write(t, "rules:\n  - to: 192.0.2.100\n    from: [10.50.0.0/24]\n    standby: true\n")
	h2.start(t)
	h2.awaitHealth(t)
	h2.router.add("192.0.2.100")
	h2.event("test: address added")
	if !h2.await(t, "standby rules activated by the fallback") {
		t.Fatalf("the fallback did not activate\nlog:\n%s", h2.log)
	}
	h2.wantHeld(t, "after the fallback", false)

	// A daemon that starts with the address here holds nothing.
	h3 := newFakeHost(t)
	h3.activateAfter = time.Hour
	h3.router.add("192.0.2.100")
	h3.write(t, "rules:\n  - to: 192.0.2.100\n    from: [10.50.0.0/24]\n    standby: true\n")
	h3.start(t)
	h3.awaitHealth(t)
	h3.wantHeld(t, "started with the address", false)
}

// wantHeld wants the one installed entry, to 192.0.2.100, held or not.
func (h *fakeHost) wantHeld(t *testing.T, when string, held bool) {
	t.Helper()
	st, err := h.mgr.Read()
	if err != nil {
		t.Fatal(err)
	}
	es := st.Entries()
	if len(es) != 1 || es[0].ToString() != "192.0.2.100" || es[0].Hold != held {
		t.Errorf("%s: installed %v, want one entry to 192.0.2.100, held %v\nlog:\n%s", when, es, held, h.log)
	}
}

// fakeHost is a kernel of stateful fakes and a daemon over it.
type fakeHost struct {
	mgr    *snat.Manager
	tables *lockedTables
	router *fakeRouter
	ct     *fakeConntrack
	flows  *fakeFlows
	log    *lockedBuffer
	path   string
	health string
	done   chan error
	cancel context.CancelFunc
	// activateAfter is the daemon's ActivateAfter; event, once started,
	// tells it the host changed, as netlink would.
	activateAfter time.Duration
	event         func(reason string)
	// commands and apiDir, when set, serve the API (api_test.go).
	commands reconcile.Commands
	apiDir   string
}

func newFakeHost(t *testing.T) *fakeHost {
	ft, fs := iptables.NewFakeKernel()
	var mu sync.Mutex
	tables := &lockedTables{mu: &mu, t: ft}
	dir := t.TempDir()
	return &fakeHost{
		tables: tables,
		mgr: &snat.Manager{
			Backend: &iptables.Backend{Tables: tables, Sets: &lockedSets{mu: &mu, s: fs}},
			Routing: routes.NewFake(),
			Locker:  snat.FileLock{Dir: t.TempDir()}, // never the host's lock
		},
		router: newFakeRouter("192.0.2.250", "192.0.2.22", "192.0.2.23"),
		ct:     &fakeConntrack{},
		flows:  &fakeFlows{},
		log:    &lockedBuffer{},
		path:   filepath.Join(dir, "egress-snat.yaml"),
		health: filepath.Join(dir, "health"),
	}
}

func (h *fakeHost) write(t *testing.T, text string) {
	t.Helper()
	// Written aside and renamed over, as --permanent and editors do.
	tmp := h.path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, h.path); err != nil {
		t.Fatal(err)
	}
}

// start builds the daemon and runs it until the test ends.
func (h *fakeHost) start(t *testing.T) *reconcile.Daemon {
	t.Helper()
	file, _, err := config.LoadIntents(h.path)
	if err != nil {
		t.Fatal(err)
	}
	d, err := reconcile.New(reconcile.Config{
		Path: h.path, File: file,
		Manager: h.mgr, Router: h.router, Conntrack: h.ct, Flows: h.flows, LockTimeout: time.Second,
		Log:    slog.New(slog.NewJSONHandler(h.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Resync: 10 * time.Millisecond, FullResync: time.Hour, SpillEvery: 10 * time.Millisecond,
		HealthFile: h.health, ActivateAfter: h.activateAfter,
		Commands: h.commands, APIDir: h.apiDir, Refusal: "refused",
		// No netlink: the fakes are the host, and the test tells.
		Events: func(_ <-chan struct{}, changed func(string)) error { h.event = changed; return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel, h.done = cancel, make(chan error, 1)
	go func() { h.done <- d.Run(ctx) }()
	t.Cleanup(func() { h.stop(t) })
	return d
}

// stop stops the daemon and wants it to end cleanly.
func (h *fakeHost) stop(t *testing.T) {
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	select {
	case err := <-h.done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("Run did not return after its context ended")
	}
}

// wantInstalled compares the installed entries, as "DST -> TO".
func (h *fakeHost) wantInstalled(t *testing.T, when string, want []string) {
	t.Helper()
	st, err := h.mgr.Read()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range st.Entries() {
		got = append(got, fmt.Sprintf("%s -> %s", e.Dst, e.ToString()))
	}
	if !slices.Equal(got, want) {
		t.Errorf("%s: installed %q, want %q\nlog:\n%s", when, got, want, h.log)
	}
}

// count counts the log lines holding every one of subs.
func (h *fakeHost) count(subs ...string) int {
	n := 0
	for line := range strings.Lines(h.log.String()) {
		if !slices.ContainsFunc(subs, func(s string) bool { return !strings.Contains(line, s) }) {
			n++
		}
	}
	return n
}

// await waits, boundedly, for a log line holding every one of subs.
func (h *fakeHost) await(t *testing.T, subs ...string) bool {
	for range 500 {
		if h.count(subs...) > 0 {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

// awaitHealth waits, boundedly, for the first reconcile to end.
func (h *fakeHost) awaitHealth(t *testing.T) {
	t.Helper()
	for range 500 {
		if _, err := os.Stat(h.health); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no health file after 5s: the first reconcile did not end\nlog:\n%s", h.log)
}

func (h *fakeHost) flushed() []conntrack.Binding {
	h.ct.mu.Lock()
	defer h.ct.mu.Unlock()
	return slices.Clone(h.ct.deleted)
}

// lockedTables and lockedSets serialize the fakes, which the daemon's
// goroutine and the test's both use.
type lockedTables struct {
	mu *sync.Mutex
	t  *iptables.FakeTables
}

func (l *lockedTables) Save(f snat.Family) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.t.Save(f)
}
func (l *lockedTables) Restore(f snat.Family, payload string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.t.Restore(f, payload)
}
func (l *lockedTables) CanDropTable() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.t.CanDropTable()
}
func (l *lockedTables) Generation(f snat.Family) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.t.Generation(f)
}
func (l *lockedTables) SaveNAT(f snat.Family) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.t.SaveNAT(f)
}
func (l *lockedTables) SaveNATCounters(f snat.Family) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.t.SaveNATCounters(f)
}
func (l *lockedTables) DropTable(f snat.Family, name string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.t.DropTable(f, name)
}

type lockedSets struct {
	mu *sync.Mutex
	s  *iptables.FakeIPSets
}

func (l *lockedSets) Save() (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.s.Save()
}
func (l *lockedSets) Restore(payload string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.s.Restore(payload)
}
func (l *lockedSets) Headers() (map[string]int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.s.Headers()
}

// fakeRouter is a host whose IPv4 traffic leaves by eth0 through
// 192.0.2.1 with the natural source 192.0.2.250; its addresses come and
// go.
type fakeRouter struct {
	mu     sync.Mutex
	owned  map[netip.Addr]bool
	forgot int
}

func newFakeRouter(addrs ...string) *fakeRouter {
	r := &fakeRouter{owned: map[netip.Addr]bool{}}
	for _, a := range addrs {
		r.add(a)
	}
	return r
}

func (r *fakeRouter) add(a string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.owned[netip.MustParseAddr(a)] = true
}

func (r *fakeRouter) remove(a string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.owned, netip.MustParseAddr(a))
}

func (r *fakeRouter) Natural(dst netip.Prefix, out string) (string, netip.Addr, error) {
	iface, _, natural, err := r.Path(dst, out)
	return iface, natural, err
}

func (r *fakeRouter) Path(dst netip.Prefix, out string) (string, netip.Addr, netip.Addr, error) {
	if !dst.Addr().Is4() || (out != "" && out != "eth0") {
		return "", netip.Addr{}, netip.Addr{}, fmt.Errorf("%s: %w", dst, selector.ErrNoRoute)
	}
	return "eth0", netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.250"), nil
}

func (r *fakeRouter) Owner(a netip.Addr) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.owned[a] {
		return "eth0", nil
	}
	return "", fmt.Errorf("%s: %w", a, selector.ErrNotLocal)
}

func (r *fakeRouter) Gateways(iface string, is4 bool, _ func(int) bool) ([]netip.Addr, error) {
	return []netip.Addr{netip.MustParseAddr("192.0.2.1")}, nil
}

func (r *fakeRouter) OnLink(iface string, a netip.Addr) (bool, error) {
	return netip.MustParsePrefix("192.0.2.0/24").Contains(a), nil
}

func (r *fakeRouter) PrefixUse(netip.Prefix, func(int) bool) (selector.PrefixUse, error) {
	return selector.PrefixUse{}, nil
}

func (r *fakeRouter) Forget() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.forgot++
}

// fakeConntrack records the deletions asked of it.
type fakeConntrack struct {
	mu      sync.Mutex
	deleted []conntrack.Binding
}

func (c *fakeConntrack) DeleteBinding(b conntrack.Binding) (uint, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deleted = append(c.deleted, b)
	return 0, nil
}

// lockedBuffer is the daemon's log, read while it writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
