package pending

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/backend/iptables"
	"github.com/egress-snat/egress-snat/routes"
	"github.com/egress-snat/egress-snat/snat"
)

// TestApplyConfirmRevert walks apply --confirm over the fakes of the
// kernel: Apply writes and leaves a record and a reverter; a second apply
// is refused with nothing changed; Revert, at the deadline, restores what
// was installed before and removes the record; Confirm keeps the state
// and stops the reverter; an apply that changes nothing leaves no record.
func TestApplyConfirmRevert(t *testing.T) {
	s := Store{Dir: t.TempDir(), Netns: 4026531840}
	ft, fs := iptables.NewFakeKernel()
	m := &snat.Manager{Backend: &iptables.Backend{Tables: ft, Sets: fs}, Routing: routes.NewFake(), Locker: snat.FileLock{Dir: t.TempDir()}}
	entry := func(dst, to string) snat.Entry {
		return snat.Entry{Match: snat.Match{Sender: snat.Host(), Dst: netip.MustParsePrefix(dst), Out: "eth0"},
			Natural: netip.MustParseAddr("192.0.2.250"), To: []netip.Addr{netip.MustParseAddr(to)}}
	}
	write := func(es ...snat.Entry) error {
		_, _, err := m.Update(snat.Request{LockTimeout: time.Second, Desired: func(*snat.State) ([]snat.Entry, error) { return es, nil }})
		return err
	}
	installed := func() []string {
		st, err := m.Read()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range st.Entries() {
			out = append(out, fmt.Sprintf("%s -> %s", e.Dst, e.ToString()))
		}
		return out
	}
	before, after := entry("198.51.100.4/32", "192.0.2.22"), entry("198.51.100.4/32", "192.0.2.23")
	if err := write(before); err != nil {
		t.Fatal(err)
	}
	apply := func(es ...snat.Entry) (*Record, error) {
		_, rec, err := s.Apply(m, Apply{
			Desired:     func(*snat.State) ([]snat.Entry, error) { return es, nil },
			Timeout:     time.Minute,
			LockTimeout: time.Second,
			// A stand-in for the reverter that holds the token on its
			// command line, as Alive wants, and never reverts itself.
			Reverter: func(token string) []string { return []string{"/bin/sh", "-c", "sleep 30; exit 0 # " + token} },
		})
		if rec != nil {
			t.Cleanup(func() { Stop(rec); time.Sleep(50 * time.Millisecond); reap(rec.PID) })
		}
		return rec, err
	}

	rec, err := apply(after)
	if err != nil || rec == nil || rec.PID <= 0 {
		t.Fatalf("apply --confirm: %+v, %v; want a record with its reverter", rec, err)
	}
	if got, want := installed(), []string{"198.51.100.4/32 -> 192.0.2.23"}; !slices.Equal(got, want) {
		t.Errorf("after apply --confirm: %q, want %q", got, want)
	}
	if saved, err := s.Load(); err != nil || saved == nil || saved.Token != rec.Token || saved.PID != rec.PID {
		t.Errorf("record on disk: %+v, %v; want %+v", saved, err, rec)
	}
	var refused *RefusedError
	if _, err := apply(entry("198.51.100.4/32", "192.0.2.24")); !errors.As(err, &refused) {
		t.Errorf("a second apply --confirm: %v, want it refused", err)
	}
	if err := s.Refuse(time.Second); !errors.As(err, &refused) {
		t.Errorf("Refuse while a record is pending: %v, want it refused", err)
	}
	if got, want := installed(), []string{"198.51.100.4/32 -> 192.0.2.23"}; !slices.Equal(got, want) {
		t.Errorf("after the refused apply: %q, want %q", got, want)
	}

	// The deadline comes: another token does nothing, the record's own
	// restores the entries installed before.
	saved, _ := s.Load()
	saved.Deadline = time.Now()
	if err := s.Save(saved); err != nil {
		t.Fatal(err)
	}
	var restored [][]snat.Entry
	restore := func(es []snat.Entry) error { restored = append(restored, es); return write(es...) }
	if err := s.Revert(NewToken(), time.Second, restore); err != nil || restored != nil {
		t.Errorf("revert with another token: %v, restored %v; want nothing done", err, restored)
	}
	if err := s.Revert(rec.Token, time.Second, restore); err != nil {
		t.Fatalf("revert: %v", err)
	}
	if got, want := installed(), []string{"198.51.100.4/32 -> 192.0.2.22"}; !slices.Equal(got, want) {
		t.Errorf("after the revert: %q, want %q", got, want)
	}
	if left, err := s.Load(); left != nil || err != nil {
		t.Errorf("record after the revert: %+v, %v; want none", left, err)
	}
	if err := s.Refuse(time.Second); err != nil {
		t.Errorf("Refuse with nothing pending: %v", err)
	}

	// Confirmed: the state stays, the record and the reverter go.
	if rec, err = apply(after); err != nil || rec == nil {
		t.Fatalf("apply --confirm again: %+v, %v", rec, err)
	}
	for deadline := time.Now().Add(2 * time.Second); !Alive(rec) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	got, running, err := s.Confirm(time.Second)
	if err != nil || got == nil || got.Token != rec.Token || !running {
		t.Errorf("confirm: %+v, running %v, %v; want the record, its reverter running", got, running, err)
	}
	if left, err := s.Load(); left != nil || err != nil {
		t.Errorf("record after confirm: %+v, %v; want none", left, err)
	}
	if got, running, err := s.Confirm(time.Second); got != nil || running || err != nil {
		t.Errorf("confirm with nothing pending: %+v, %v, %v", got, running, err)
	}
	if got, want := installed(), []string{"198.51.100.4/32 -> 192.0.2.23"}; !slices.Equal(got, want) {
		t.Errorf("after confirm: %q, want %q", got, want)
	}

	// Nothing to change: nothing to revert, no record.
	if rec, err := apply(after); err != nil || rec != nil {
		t.Errorf("apply --confirm that changes nothing: %+v, %v; want no record", rec, err)
	}
}
