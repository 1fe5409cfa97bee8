package permanent_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/config"
	"github.com/egress-snat/egress-snat/permanent"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// host is a kernel of fakes and a permanent file.
type host struct {
	ft   *iptables.FakeTables
	m    *snat.Manager
	path string
}

func newHost(t *testing.T, file string) *host {
	t.Helper()
	ft, fs := iptables.NewFakeKernel()
	h := &host{ft: ft, path: filepath.Join(t.TempDir(), "egress-snat.yaml"),
		m: &snat.Manager{Backend: &iptables.Backend{Tables: ft, Sets: fs}, Routing: routes.NewFake(), Locker: snat.FileLock{Dir: t.TempDir()}}}
	if file != "" {
		if err := os.WriteFile(h.path, []byte(file), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

func entry(dst, to string) snat.Entry {
	return snat.Entry{Match: snat.Match{Sender: snat.Host(), Dst: netip.MustParsePrefix(dst), Out: "eth0"},
		Natural: netip.MustParseAddr("192.0.2.250"), To: []netip.Addr{netip.MustParseAddr(to)}}
}

func intent(dst, to string) snat.Intent {
	return snat.Intent{Sender: snat.Host(), Dst: netip.MustParsePrefix(dst), To: []netip.Addr{netip.MustParseAddr(to)}}
}

// installed is the kernel's entries as "DST -> TO".
func (h *host) installed(t *testing.T) []string {
	t.Helper()
	st, err := h.m.Read()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range st.Entries() {
		out = append(out, fmt.Sprintf("%s -> %s", e.Dst, e.ToString()))
	}
	return out
}

// file is the permanent file's intents as "DST -> TO", and whether a
// temporary file was left beside it.
func (h *host) file(t *testing.T) []string {
	t.Helper()
	_, intents, err := config.LoadIntents(h.path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, in := range intents {
		out = append(out, fmt.Sprintf("%s -> %s", in.Dst, in.To[0]))
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(h.path), ".*tmp*")); len(left) > 0 {
		t.Errorf("temporary files left beside the file: %q", left)
	}
	return out
}

func (h *host) update(dryRun bool, want []snat.Entry, intents []snat.Intent) error {
	_, _, err := permanent.Update(h.m, snat.Request{LockTimeout: time.Second, DryRun: dryRun,
		Desired: func(*snat.State) ([]snat.Entry, error) { return want, nil }}, h.path, permanent.Put(intents))
	return err
}

// TestUpdate: the kernel and the file change in one step, or neither does.
func TestUpdate(t *testing.T) {
	const before = "# the operator's comment\nrules:\n  - to: 192.0.2.22\n    dst: 198.51.100.4\n"
	t.Run("both", func(t *testing.T) {
		h := newHost(t, before)
		if err := h.update(false, []snat.Entry{entry("198.51.100.5/32", "192.0.2.23")}, []snat.Intent{intent("198.51.100.5/32", "192.0.2.23")}); err != nil {
			t.Fatal(err)
		}
		if got, want := h.installed(t), []string{"198.51.100.5/32 -> 192.0.2.23"}; !slices.Equal(got, want) {
			t.Errorf("kernel: %q, want %q", got, want)
		}
		if got, want := h.file(t), []string{"198.51.100.4/32 -> 192.0.2.22", "198.51.100.5/32 -> 192.0.2.23"}; !slices.Equal(got, want) {
			t.Errorf("file: %q, want %q", got, want)
		}
		if b, _ := os.ReadFile(h.path); !strings.Contains(string(b), "# the operator's comment") {
			t.Errorf("the edit lost the file's comment:\n%s", b)
		}
		if fi, err := os.Stat(h.path); err != nil || fi.Mode().Perm() != 0o640 {
			t.Errorf("file mode after the edit: %v, %v; want 0640 kept", fi.Mode(), err)
		}
	})
	t.Run("bad file", func(t *testing.T) {
		h := newHost(t, "rules:\n  - to: 192.0.2.22\n    dst: 198.51.100.300\n")
		err := h.update(false, []snat.Entry{entry("198.51.100.5/32", "192.0.2.23")}, []snat.Intent{intent("198.51.100.5/32", "192.0.2.23")})
		var inv *snat.InvalidError
		if !errors.As(err, &inv) || !strings.Contains(err.Error(), "--permanent") {
			t.Errorf("a file that does not parse: %v, want bad input naming --permanent", err)
		}
		if got := h.installed(t); got != nil {
			t.Errorf("kernel after a refused file: %q, want nothing written", got)
		}
	})
	t.Run("kernel refuses", func(t *testing.T) {
		h := newHost(t, before)
		h.ft.FailRestore = map[snat.Family]error{snat.IPv4: errors.New("the kernel said no")}
		if err := h.update(false, []snat.Entry{entry("198.51.100.5/32", "192.0.2.23")}, []snat.Intent{intent("198.51.100.5/32", "192.0.2.23")}); err == nil {
			t.Fatal("a refused kernel write succeeded")
		}
		if got, want := h.file(t), []string{"198.51.100.4/32 -> 192.0.2.22"}; !slices.Equal(got, want) {
			t.Errorf("file after the kernel refused: %q, want it as it was", got)
		}
	})
	t.Run("dry run", func(t *testing.T) {
		h := newHost(t, before)
		if err := h.update(true, []snat.Entry{entry("198.51.100.5/32", "192.0.2.23")}, []snat.Intent{intent("198.51.100.5/32", "192.0.2.23")}); err != nil {
			t.Fatal(err)
		}
		if got := h.installed(t); got != nil {
			t.Errorf("kernel after a dry run: %q", got)
		}
		if got, want := h.file(t), []string{"198.51.100.4/32 -> 192.0.2.22"}; !slices.Equal(got, want) {
			t.Errorf("file after a dry run: %q, want it as it was", got)
		}
	})
	t.Run("then", func(t *testing.T) {
		h := newHost(t, before)
		_, _, err := permanent.Update(h.m, snat.Request{Then: func(snat.Plan) error { return nil }}, h.path, permanent.Clear)
		if err == nil {
			t.Error("a request with a Then of its own was taken")
		}
	})
}

// TestSave: the file states what is installed, keeping its comments; a
// dry run writes nothing; a file that does not parse is not overwritten.
func TestSave(t *testing.T) {
	h := newHost(t, "# kept\nrules:\n  - to: 192.0.2.22\n    dst: 203.0.113.7\n")
	if _, _, err := h.m.Update(snat.Request{LockTimeout: time.Second, Desired: func(*snat.State) ([]snat.Entry, error) {
		return []snat.Entry{entry("198.51.100.4/32", "192.0.2.23"), entry("198.51.100.5/32", "192.0.2.23")}, nil
	}}); err != nil {
		t.Fatal(err)
	}
	b, n, unsaved, err := permanent.Save(h.m, h.path, time.Second, true)
	if err != nil || n != 2 || len(unsaved) != 0 || !strings.Contains(string(b), "198.51.100.5") {
		t.Fatalf("dry run: %d entries, unsaved %v, %v\n%s", n, unsaved, err, b)
	}
	if got, want := h.file(t), []string{"203.0.113.7/32 -> 192.0.2.22"}; !slices.Equal(got, want) {
		t.Errorf("file after a dry run: %q, want it as it was", got)
	}
	if _, _, _, err := permanent.Save(h.m, h.path, time.Second, false); err != nil {
		t.Fatal(err)
	}
	if got, want := h.file(t), []string{"198.51.100.4/32 -> 192.0.2.23", "198.51.100.5/32 -> 192.0.2.23"}; !slices.Equal(got, want) {
		t.Errorf("file after save: %q, want %q", got, want)
	}
	if b, _ := os.ReadFile(h.path); !strings.Contains(string(b), "# kept") {
		t.Errorf("save lost the file's comment:\n%s", b)
	}
	bad := newHost(t, "rules: [\n")
	if _, _, _, err := permanent.Save(bad.m, bad.path, time.Second, false); !errors.As(err, new(*snat.InvalidError)) {
		t.Errorf("save over a file that does not parse: %v, want bad input", err)
	}
	if b, _ := os.ReadFile(bad.path); string(b) != "rules: [\n" {
		t.Errorf("save changed a file it could not read: %q", b)
	}
}

// TestSpecOf: an entry becomes the rule apply -f turns back into it; the
// kept source of forwarded traffic cannot be stated.
func TestSpecOf(t *testing.T) {
	s, ok := permanent.SpecOf(entry("198.51.100.4/32", "192.0.2.23"))
	if !ok || s.Dst[0] != netip.MustParsePrefix("198.51.100.4/32") || s.To[0] != netip.MustParseAddr("192.0.2.23") || s.Out != "eth0" || s.Spread {
		t.Errorf("SpecOf: %+v, %v", s, ok)
	}
	keep := entry("198.51.100.4/32", "192.0.2.23")
	keep.To = nil
	if s, ok := permanent.SpecOf(keep); !ok || s.To[0] != keep.Natural {
		t.Errorf("SpecOf of a kept natural source: %+v, %v; want it named as the source", s, ok)
	}
	forwarded := snat.Entry{Match: snat.Match{Sender: snat.From(netip.MustParsePrefix("10.77.0.0/24")), Dst: netip.MustParsePrefix("198.51.100.6/32"), Out: "eth0"}}
	if s, ok := permanent.SpecOf(forwarded); ok {
		t.Errorf("SpecOf of a kept forwarded source: %+v, want none", s)
	}
}
