package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestLogDurations: watch's logs give durations as Go duration strings in
// both formats, at the top level and in groups, never as nanoseconds.
func TestLogDurations(t *testing.T) {
	for _, format := range []string{"json", "text"} {
		var b bytes.Buffer
		h, err := newLogHandler(&b, format)
		if err != nil {
			t.Fatal(err)
		}
		slog.New(h).Info("converged", "resync", 500*time.Millisecond, "took", 12*time.Millisecond,
			slog.Group("verify", "every", 5*time.Minute), "applies", 3)
		line := b.String()
		if format == "json" {
			var rec struct {
				Resync  string `json:"resync"`
				Took    string `json:"took"`
				Applies int    `json:"applies"`
				Verify  struct {
					Every string `json:"every"`
				} `json:"verify"`
			}
			if err := json.Unmarshal([]byte(line), &rec); err != nil {
				t.Fatalf("json: %v: %s", err, line)
			}
			if rec.Resync != "500ms" || rec.Took != "12ms" || rec.Verify.Every != "5m0s" || rec.Applies != 3 {
				t.Errorf("json log %s: want resync 500ms, took 12ms, verify.every 5m0s, applies 3", line)
			}
			continue
		}
		for _, want := range []string{"resync=500ms", "took=12ms", "verify.every=5m0s", "applies=3"} {
			if !strings.Contains(line, want) {
				t.Errorf("text log %q lacks %s", line, want)
			}
		}
	}
	if _, err := newLogHandler(&bytes.Buffer{}, "xml"); err == nil || exitCode(err) != exitUsage {
		t.Errorf("--log-format xml: %v, want a usage error", err)
	}
}

// TestPlural: counts read as English.
func TestPlural(t *testing.T) {
	for _, c := range []struct {
		n    int
		want string
	}{{0, "0 flows"}, {1, "1 flow"}, {2, "2 flows"}} {
		if got := plural(c.n, "flow", "flows"); got != c.want {
			t.Errorf("plural(%d) = %q, want %q", c.n, got, c.want)
		}
	}
	if got := plural(uint(1), "conntrack entry", "conntrack entries"); got != "1 conntrack entry" {
		t.Errorf("plural(uint 1) = %q", got)
	}
}
