package main

import (
	"runtime"
	"strings"
	"testing"
)

func TestVersionPrintsToolAndGoVersion(t *testing.T) {
	old := version
	version = "1.2.3-4-gabcdef0"
	t.Cleanup(func() { version = old })
	app := newApp()
	app.Version = version
	var out strings.Builder
	app.Writer = &out
	if err := app.Run([]string{"egress-snat", "--version"}); err != nil {
		t.Fatalf("--version: %v", err)
	}
	for _, want := range []string{"egress-snat 1.2.3-4-gabcdef0 ", runtime.Version()} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("--version printed %q, want it to contain %q", out.String(), want)
		}
	}
}
