package pending

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStore(t *testing.T) {
	s := Store{Dir: t.TempDir(), Netns: 4026531840}
	if r, err := s.Load(); r != nil || err != nil {
		t.Fatalf("empty store: %v, %v", r, err)
	}
	want := &Record{Token: NewToken(), Deadline: time.Now().Add(time.Minute).Round(0), Previous: json.RawMessage(`[{"dst":"198.51.100.4/32"}]`)}
	if err := s.Save(want); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(filepath.Join(s.Dir, "pending-4026531840.json"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("record file: %v, %v", info, err)
	}
	got, err := s.Load()
	if err != nil || got.Token != want.Token || !got.Deadline.Equal(want.Deadline) || string(got.Previous) != string(want.Previous) || got.Netns != 4026531840 {
		t.Fatalf("Load = %+v, %v", got, err)
	}
	if err := s.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(); err != nil {
		t.Fatalf("removing nothing: %v", err)
	}
	if r, _ := s.Load(); r != nil {
		t.Fatal("record survived Remove")
	}
}

func TestLockExcludes(t *testing.T) {
	s := Store{Dir: t.TempDir(), Netns: 1}
	unlock, err := s.Lock(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lock(50 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "pending-apply lock") {
		t.Fatalf("second lock: %v", err)
	}
	unlock()
	unlock2, err := s.Lock(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	unlock2()
	// Another namespace's record has its own lock.
	if u, err := (Store{Dir: s.Dir, Netns: 2}).Lock(0); err != nil {
		t.Fatal(err)
	} else {
		u()
	}
}

func TestSpawnDetachedAndAlive(t *testing.T) {
	token := NewToken()
	pid, err := Spawn([]string{"/bin/sh", "-c", "sleep 5 # " + token})
	if err != nil {
		t.Fatal(err)
	}
	r := &Record{PID: pid, Token: token}
	deadline := time.Now().Add(2 * time.Second)
	for !Alive(r) {
		if time.Now().After(deadline) {
			t.Fatal("spawned process not seen alive")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stat, _ := os.ReadFile("/proc/" + itoa(pid) + "/stat")
	fields := strings.Fields(string(stat))
	// Fields 6 and 5 (1-based) are session and process group: its own.
	if len(fields) > 5 && (fields[5] != itoa(pid) || fields[4] != itoa(pid)) {
		t.Errorf("not in its own session and group: pgrp %s session %s, pid %d", fields[4], fields[5], pid)
	}
	if Alive(&Record{PID: pid, Token: NewToken()}) {
		t.Error("a pid without the token counts as ours")
	}
	if err := Stop(r); err != nil {
		t.Fatal(err)
	}
	for Alive(r) {
		if time.Now().After(deadline.Add(3 * time.Second)) {
			t.Fatal("Stop did not end it")
		}
		time.Sleep(10 * time.Millisecond)
		reap(pid)
	}
}
