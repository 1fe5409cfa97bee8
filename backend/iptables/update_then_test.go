package iptables

import (
	"errors"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/snat"
)

// TestUpdateThen: Request.Then runs under the lock after the kernel write; when it
// fails the kernel is put back; on a dry run and when desired fails it does
// not run.
func TestUpdateThen(t *testing.T) {
	m, ft, _ := newFakeManager()
	lock := m.Locker.(*countingLock)
	first := []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.22")}
	update(t, m, func(*snat.State) []snat.Entry { return first })
	before, _ := ft.Save(snat.IPv4)

	second := []snat.Entry{entry("198.51.100.4", "192.0.2.250", "192.0.2.23")}
	ran := 0
	_, _, err := m.Update(snat.Request{LockTimeout: time.Second, Desired: func(*snat.State) ([]snat.Entry, error) { return second, nil }, Then: func(snat.Plan) error {
		ran++
		if lock.held != 1 {
			t.Errorf("then ran with the lock held %d times, want 1", lock.held)
		}
		if now, _ := ft.Save(snat.IPv4); now == before {
			t.Error("then ran before the kernel write")
		}
		return errors.New("file not writable")
	}})
	if err == nil || ran != 1 {
		t.Fatalf("Update with a failing Then: err %v, ran %d; want an error, ran once", err, ran)
	}
	if now, _ := ft.Save(snat.IPv4); now != before {
		t.Errorf("a failed then left the kernel changed:\n%s\nwant:\n%s", now, before)
	}

	for name, call := range map[string]func(then func(snat.Plan) error) error{
		"dry run": func(then func(snat.Plan) error) error {
			_, _, err := m.Update(snat.Request{LockTimeout: time.Second, DryRun: true, Desired: func(*snat.State) ([]snat.Entry, error) { return second, nil }, Then: then})
			return err
		},
		"desired fails": func(then func(snat.Plan) error) error {
			_, _, err := m.Update(snat.Request{LockTimeout: time.Second, Desired: func(*snat.State) ([]snat.Entry, error) { return nil, errors.New("bad") }, Then: then})
			if err == nil {
				t.Error("desired failing: no error")
			}
			return nil
		},
	} {
		if err := call(func(snat.Plan) error { t.Errorf("%s: then ran", name); return nil }); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if now, _ := ft.Save(snat.IPv4); now != before {
		t.Errorf("dry run or failed desired changed the kernel")
	}
}
