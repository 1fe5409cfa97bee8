package ha

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// captured returns testdata/conntrackd/NAME, real output of conntrackd
// 1.4.7 (see the README there).
func captured(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "conntrackd", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestParseStats(t *testing.T) {
	got, err := ParseStats(captured(t, "healthy-b-s.txt"))
	if err != nil {
		t.Fatal(err)
	}
	want := SyncStats{
		Internal:  CacheStats{Active: 6, Created: 6, Updated: 30},
		External:  CacheStats{Active: 6, Created: 6, Updated: 12},
		Link:      "sync",
		BytesSent: 1144, BytesReceived: 1128,
		PacketsSent: 22, PacketsReceived: 21,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("ParseStats (-want +got):\n%s", diff)
	}
	got, err = ParseStats(captured(t, "linkdown-b-s.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if got.SendErrors != 2 || got.ReceiveErrors != 0 || got.PacketsSent != 31 || got.PacketsReceived != 27 {
		t.Errorf("link down: %+v, want 2 send errors, 31 sent, 27 received", got)
	}
	// The numbers of the message tracking section, where the capture has
	// zeros: the same text with other numbers.
	text := strings.Replace(captured(t, "fresh-s.txt"), "0 Malformed msgs                    0 Lost msgs",
		"3 Malformed msgs                    17 Lost msgs", 1)
	if got, err := ParseStats(text); err != nil || got.Malformed != 3 || got.Lost != 17 {
		t.Errorf("message tracking: %+v, %v; want 3 malformed, 17 lost", got, err)
	}
}

// TestParseStatsRefuses: output without the sections of a syncing
// conntrackd (another mode, a future format) is an error that shows it.
func TestParseStatsRefuses(t *testing.T) {
	for name, text := range map[string]string{
		"empty":       "",
		"no external": strings.Replace(captured(t, "fresh-s.txt"), "cache external:", "cache other:", 1),
		"no sync link": "cache internal:\ncurrent active connections:\t 0\n\ncache external:\ncurrent active connections:\t 0\n\n" +
			"traffic processed:\n 0 Bytes 0 Pckts\n",
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := ParseStats(text); err == nil || !strings.Contains(err.Error(), "conntrackd -s printed no") {
				t.Errorf("ParseStats: %v, want an error saying which section is missing", err)
			}
		})
	}
}

func TestParseLinks(t *testing.T) {
	got, err := ParseLinks(captured(t, "linkdown-b-link.txt"))
	if err != nil {
		t.Fatal(err)
	}
	want := []LinkStats{{Device: "sync", Status: "DOWN", Role: "ACTIVE", PacketsSent: 31, PacketsReceived: 27, SendErrors: 2}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("ParseLinks (-want +got):\n%s", diff)
	}
	if _, err := ParseLinks(captured(t, "fresh-s.txt")); err == nil {
		t.Error("ParseLinks of conntrackd -s (not -s link): no error")
	}
}

func TestParseQueues(t *testing.T) {
	got, err := ParseQueues(captured(t, "peerdead-b-queue-later.txt"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]QueueStats{
		"txqueue": {Current: 0, Max: 2147483647},
		"errorq":  {Current: 0, Max: 128},
		"rsqueue": {Current: 2, Max: 131072},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("ParseQueues (-want +got):\n%s", diff)
	}
	if _, err := ParseQueues(captured(t, "fresh-link.txt")); err == nil {
		t.Error("ParseQueues of conntrackd -s link: no error")
	}
}

// fakeStats answers conntrackd -s, -s link and -s queue from captured
// files, one sample after another: samples[i] names the files of the i-th
// (the last one repeats).
func fakeStats(t *testing.T, samples ...[3]string) Stats {
	i, calls := 0, 0
	return func(_ context.Context, what string) (string, error) {
		s := samples[min(i, len(samples)-1)]
		calls++
		if calls%3 == 0 {
			i++
		}
		switch what {
		case "":
			return captured(t, s[0]), nil
		case "link":
			return captured(t, s[1]), nil
		case "queue":
			return captured(t, s[2]), nil
		}
		t.Fatalf("conntrackd -s %s: not captured", what)
		return "", nil
	}
}

func TestCheckSync(t *testing.T) {
	healthy := [3]string{"healthy-b-s.txt", "healthy-b-link.txt", "healthy-b-queue.txt"}
	healthyLater := [3]string{"healthy-b-s-later.txt", "healthy-b-link-later.txt", "healthy-b-queue.txt"}
	dead := [3]string{"peerdead-b-s.txt", "peerdead-b-link.txt", "peerdead-b-queue.txt"}
	deadLater := [3]string{"peerdead-b-s-later.txt", "peerdead-b-link-later.txt", "peerdead-b-queue-later.txt"}
	down := [3]string{"linkdown-b-s.txt", "linkdown-b-link.txt", "linkdown-b-queue.txt"}
	for _, tc := range []struct {
		name         string
		samples      [][3]string
		healthy      bool
		problems     []string
		wantReceived uint64
	}{
		{"healthy", [][3]string{healthy, healthyLater}, true, nil, 2},
		{"peer gone", [][3]string{dead, deadLater}, false, []string{"nothing received from the peer on sync in"}, 0},
		{"link down", [][3]string{deadLater, down}, false, []string{"the sync link sync is down", "nothing received", "2 send errors on sync"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := CheckSync(context.Background(), fakeStats(t, tc.samples...), time.Millisecond, 50*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if h.Healthy != tc.healthy || len(h.Problems) != len(tc.problems) {
				t.Errorf("healthy %v, problems %q; want %v, %d problems", h.Healthy, h.Problems, tc.healthy, len(tc.problems))
			}
			for i, p := range tc.problems {
				if i < len(h.Problems) && !strings.Contains(h.Problems[i], p) {
					t.Errorf("problem %d: %q, want it to say %q", i, h.Problems[i], p)
				}
			}
			if h.ReceivedInWindow != tc.wantReceived || h.ExternalCache != 6 || h.InternalCache != 6 || h.Link != "sync" {
				t.Errorf("%+v: want %d received in the window, 6 in each cache, link sync", h, tc.wantReceived)
			}
		})
	}
}

// TestCheckSyncStopsWhenHeard: a healthy pair answers at its first
// sample after the peer was heard, not at the end of the window.
func TestCheckSyncStopsWhenHeard(t *testing.T) {
	healthy := [3]string{"healthy-b-s.txt", "healthy-b-link.txt", "healthy-b-queue.txt"}
	later := [3]string{"healthy-b-s-later.txt", "healthy-b-link-later.txt", "healthy-b-queue.txt"}
	start := time.Now()
	h, err := CheckSync(context.Background(), fakeStats(t, healthy, healthy, later), time.Millisecond, time.Minute)
	if err != nil || !h.Healthy || time.Since(start) > 10*time.Second {
		t.Errorf("CheckSync: %+v, %v after %s; want healthy at once", h, err, time.Since(start))
	}
}

func TestJudgeSyncNotes(t *testing.T) {
	s1, err := ParseStats(captured(t, "healthy-b-s.txt"))
	if err != nil {
		t.Fatal(err)
	}
	s2 := s1
	s2.PacketsReceived += 3
	s2.Lost += 4
	s2.External.CreateFailed += 5
	links, _ := ParseLinks(captured(t, "healthy-b-link.txt"))
	now := time.Now()
	h := JudgeSync(SyncSample{At: now, Stats: s1, Links: links}, SyncSample{At: now.Add(1500 * time.Millisecond), Stats: s2, Links: links})
	if !h.Healthy || len(h.Notes) != 2 || !strings.Contains(h.Notes[0], "4 messages from the peer lost in 1.5s") ||
		!strings.Contains(h.Notes[1], "5 of the peer's connections could not be added") {
		t.Errorf("JudgeSync: healthy %v, notes %q; want healthy with a note on the 4 lost and the 5 failed", h.Healthy, h.Notes)
	}
}

// TestConntrackdMessage: conntrackd's error, as it prints it when no
// conntrackd answers, without its time stamp.
func TestConntrackdMessage(t *testing.T) {
	if got, want := conntrackdMessage(captured(t, "notrunning.txt")), "[ERROR] can't connect: is conntrackd running? appropriate permissions?"; got != want {
		t.Errorf("conntrackdMessage = %q, want %q", got, want)
	}
	stub := filepath.Join(t.TempDir(), "conntrackd")
	os.WriteFile(stub, []byte("#!/bin/sh\necho \"[Sun Dec  6 19:02:05 2026] (pid=1) [ERROR] $*\" >&2\nexit 1\n"), 0o755)
	_, err := ConntrackdStats(stub, "/etc/x.conf")(context.Background(), "link")
	if err == nil || !strings.HasSuffix(err.Error(), " -C /etc/x.conf -s link: [ERROR] -C /etc/x.conf -s link") {
		t.Errorf("a failing conntrackd: %v, want its message without the time stamp", err)
	}
}

func TestParseState(t *testing.T) {
	st, err := ParseState("MASTER 1765043765.123456789\n")
	if err != nil || st.State != "MASTER" || !st.Since.Equal(time.Unix(1765043765, 123456789)) {
		t.Errorf("ParseState: %+v, %v", st, err)
	}
	if st, err := ParseState("BACKUP 1765043765.5"); err != nil || st.Since.Nanosecond() != 500000000 {
		t.Errorf("ParseState of a short fraction: %+v, %v", st, err)
	}
	for _, bad := range []string{"", "MASTER", "MASTER yesterday", "MASTER 12.x"} {
		if _, err := ParseState(bad); err == nil {
			t.Errorf("ParseState(%q): no error", bad)
		}
	}
	if _, err := ReadState(filepath.Join(t.TempDir(), "none")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ReadState of no file: %v, want ErrNotExist", err)
	}
}
