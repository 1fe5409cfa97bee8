package main

// Bad input the CLI refuses before it looks at the host: these run as
// plain unit tests, without root and without a namespace.

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// runRefused runs the app on args with bounded time and returns the exit
// status and the message main would print.
func runRefused(t *testing.T, args ...string) (int, string) {
	t.Helper()
	app := newApp()
	var out bytes.Buffer
	app.Writer, app.ErrWriter = &out, &out
	done := make(chan error, 1)
	go func() { done <- tidyExit(app, app.Run(append([]string{"egress-snat"}, args...))) }()
	select {
	case err := <-done:
		if err == nil {
			return 0, out.String()
		}
		return exitCode(err), err.Error()
	case <-time.After(5 * time.Second):
		t.Fatalf("egress-snat %q: still running after 5s", args)
		return 0, ""
	}
}

// TestFlagRefusals: each case of issue #15 that the CLI can judge alone is
// refused with exit 2, at once, and a one-line message naming the value.
func TestFlagRefusals(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fifo := filepath.Join(dir, "partners.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	viaFIFO := write("fifo.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: partners.fifo\n")
	write("shadow", "root:$6$rounds=656000$"+strings.Repeat("A", 86)+":20228:0:99999:7:::\n")
	viaShadow := write("shadow.yaml", "rules:\n  - to: 192.0.2.22\n    dst-file: shadow\n")
	twice := write("twice.yaml", "rules:\n  - to: [192.0.2.22, 192.0.2.22]\n    dst: [198.51.100.4]\n")

	for _, tt := range []struct {
		name    string
		args    []string
		want    []string
		notWant []string
	}{
		{"dst-file FIFO apply", []string{"apply", "-f", viaFIFO}, []string{`partners.fifo"`, "not a regular file", "named pipe"}, nil},
		{"dst-file FIFO check", []string{"check", "-f", viaFIFO}, []string{"not a regular file"}, nil},
		{"dst-file FIFO watch", []string{"watch", "-f", viaFIFO}, []string{"not a regular file"}, nil},
		{"file FIFO", []string{"apply", "-f", fifo}, []string{`partners.fifo"`, "not a regular file"}, nil},
		{"file /dev/zero", []string{"apply", "--dry-run", "-f", "/dev/zero"}, []string{`"/dev/zero"`, "character device"}, nil},
		{"dst-file content excerpt", []string{"apply", "-f", viaShadow}, []string{`"root:$6$rounds=656000$AAAAAAAAAAAAAAAAAA"…`}, []string{"20228", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}},
		{"--lock-timeout -1s", []string{"--lock-timeout", "-1s", "list"}, []string{"--lock-timeout -1s"}, nil},
		{"--lock-timeout 0", []string{"--lock-timeout", "0s", "set", "--to", "192.0.2.22"}, []string{"--lock-timeout 0s"}, nil},
		{"--resync 0", []string{"watch", "-f", twice, "--resync", "0s"}, []string{"--resync 0s"}, nil},
		{"--full-resync 0", []string{"watch", "-f", twice, "--full-resync", "0s"}, []string{"--full-resync 0s"}, nil},
		{"--confirm 0", []string{"apply", "-f", twice, "--confirm", "0s"}, []string{"--confirm 0s"}, nil},
		{"--confirm -1m", []string{"apply", "-f", twice, "--confirm", "-1m"}, []string{"--confirm -1m0s"}, nil},
		{"--verify-every -1s", []string{"watch", "-f", twice, "--verify-every", "-1s"}, []string{"--verify-every -1s"}, nil},
		{"--settle -1ms", []string{"watch", "-f", twice, "--settle", "-1ms"}, []string{"--settle -1ms"}, nil},
		{"--pool A,A", []string{"rotate", "--pool", "192.0.2.22,192.0.2.22"}, []string{"--pool names 192.0.2.22 twice"}, nil},
		{"--pool A,B,A", []string{"rotate", "--pool", "192.0.2.22", "--pool", "192.0.2.23,192.0.2.22"}, []string{"--pool names 192.0.2.22 twice"}, nil},
		{"--to A,A --spread", []string{"set", "--to", "192.0.2.22,192.0.2.22", "--spread"}, []string{"--to names 192.0.2.22 twice"}, nil},
		{"to: [A, A]", []string{"apply", "-f", twice}, []string{"names 192.0.2.22 twice", "line 2"}, nil},
		{"newline in --out", []string{"set", "--to", "192.0.2.22", "--out", "eth0\nINJECTED line"}, []string{`"eth0\nINJECTED line"`}, nil},
		{"newline in --out of explain", []string{"explain", "--dst", "198.51.100.4", "--out", "eth0\n"}, []string{`"eth0\n"`}, nil},
		{"newline in --dst", []string{"set", "--to", "192.0.2.22", "--dst", "198.51.100.4\nINJECTED"}, []string{`"198.51.100.4\nINJECTED"`}, nil},
		{"newline in --to", []string{"set", "--to", "192.0.2.22\nINJECTED"}, []string{`"192.0.2.22\nINJECTED"`}, nil},
		{"newline in --order", []string{"rotate", "--pool", "192.0.2.22", "--order", "next\nINJECTED"}, []string{`"next\nINJECTED"`}, nil},
		{"newline in --iptables-backend", []string{"--iptables-backend", "nft\nINJECTED", "list"}, []string{`"nft\nINJECTED"`}, nil},
		{"newline in a flag name", []string{"set", "--to\nINJECTED", "192.0.2.22"}, []string{`to\nINJECTED`}, nil},
		{"newline in a duration", []string{"--lock-timeout", "1s\nINJECTED", "list"}, []string{`1s\nINJECTED`}, nil},
		{"newline in a command name", []string{"sett\nINJECTED"}, []string{`"sett\nINJECTED"`}, nil},
		{"unknown help topic", []string{"help", "nope\nINJECTED"}, []string{`nope\nINJECTED`}, nil},
		{"long --to", []string{"set", "--to", strings.Repeat("1", 100000)}, []string{`"` + strings.Repeat("1", 40) + `"…`}, nil},
		{"--spill with one address", []string{"set", "--to", "192.0.2.22", "--spill"}, []string{"--spill needs two --to addresses", "192.0.2.22"}, nil},
		{"--spill with a pool", []string{"set", "--to", "2001:db8:1::/64", "--spill"}, []string{"2001:db8:1::/64", "--spill"}, nil},
		{"--spill --method route", []string{"set", "--to", "192.0.2.22,192.0.2.23", "--spill", "--method", "route"}, []string{"--spill needs --method snat"}, nil},
		{"A,B without --spread or --spill", []string{"set", "--to", "192.0.2.22,192.0.2.23"}, []string{"--spread", "--spill"}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, msg := runRefused(t, tt.args...)
			if code != exitUsage {
				t.Errorf("egress-snat %q: exit %d, want %d; message %q", tt.args, code, exitUsage, msg)
			}
			if strings.Contains(strings.TrimSuffix(msg, "\n"), "\n") {
				t.Errorf("egress-snat %q: message spans lines: %q", tt.args, msg)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("egress-snat %q: message %q, want it to name %q", tt.args, msg, w)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(msg, w) {
					t.Errorf("egress-snat %q: message %q quotes %q", tt.args, msg, w)
				}
			}
			if len(msg) > 400 {
				t.Errorf("egress-snat %q: message of %d bytes", tt.args, len(msg))
			}
		})
	}
}
