package config_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-snat/egress-snat/config"
)

// loadWithin runs config.Load and fails the test if it takes longer than a
// few seconds: every refusal here must be immediate, not a hang.
func loadWithin(t *testing.T, path string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := config.Load(path)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatalf("config.Load(%q) still running after 5s", path)
		return nil
	}
}

// TestConfigRefusesSpecialFiles: a named pipe without a writer, a device, a
// directory and a socket are refused at once, as the file or as a dst-file,
// naming the path and its kind.
func TestConfigRefusesSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ path, kind string }{
		{fifo, "named pipe"},
		{"/dev/zero", "character device"},
		{"/dev/null", "character device"},
		{sub, "directory"},
		{sock, "socket"},
	} {
		t.Run("file "+tt.kind+" "+filepath.Base(tt.path), func(t *testing.T) {
			err := loadWithin(t, tt.path)
			if !errors.Is(err, config.ErrNotRegular) {
				t.Fatalf("Load(%q) = %v, want ErrNotRegular", tt.path, err)
			}
			wantErrNaming(t, "Load", err, []string{`"` + tt.path + `"`, "not a regular file", tt.kind})
		})
		t.Run("dst-file "+tt.kind+" "+filepath.Base(tt.path), func(t *testing.T) {
			d := writeFiles(t, map[string]string{"c.yaml": "rules:\n  - to: 192.0.2.22\n    dst-file: " + tt.path + "\n"})
			err := loadWithin(t, filepath.Join(d, "c.yaml"))
			if !errors.Is(err, config.ErrNotRegular) {
				t.Fatalf("Load = %v, want ErrNotRegular", err)
			}
			wantErrNaming(t, "Load", err, []string{"rule 1 (line 2)", `"` + tt.path + `"`, tt.kind})
		})
	}
}

// TestConfigSizeLimits: a file over its limit is refused from its size,
// before it is read, and the message says what the limit is. Sparse files
// make this cheap.
func TestConfigSizeLimits(t *testing.T) {
	dir := t.TempDir()
	sparse := func(name string, size int64) string {
		p := filepath.Join(dir, name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	big := sparse("big.yaml", config.MaxFileSize+1)
	err := loadWithin(t, big)
	if !errors.Is(err, config.ErrTooLarge) {
		t.Fatalf("Load(big) = %v, want ErrTooLarge", err)
	}
	wantErrNaming(t, "Load", err, []string{`"` + big + `"`, "16 MiB"})

	sparse("big.txt", config.MaxDstFileSize+1)
	c := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(c, []byte("rules:\n  - to: 192.0.2.22\n    dst-file: big.txt\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err = loadWithin(t, c)
	if !errors.Is(err, config.ErrTooLarge) {
		t.Fatalf("Load(dst-file big.txt) = %v, want ErrTooLarge", err)
	}
	wantErrNaming(t, "Load", err, []string{"big.txt", "256 MiB"})

	// A file exactly at the limit is read; one byte more is not, even when
	// only the read (not the size check) can see it.
	exact := filepath.Join(dir, "exact")
	if err := os.WriteFile(exact, []byte("0123456789"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := config.ReadFileBounded(exact, 10); err != nil || string(b) != "0123456789" {
		t.Errorf("ReadFileBounded(10 bytes, 10) = %q, %v", b, err)
	}
	if _, err := config.ReadFileBounded(exact, 9); !errors.Is(err, config.ErrTooLarge) {
		t.Errorf("ReadFileBounded(10 bytes, 9) = %v, want ErrTooLarge", err)
	}
}

// TestConfigExcerpt: values are quoted on one line and cut to 40
// characters.
func TestConfigExcerpt(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"", `""`},
		{"198.51.100.300", `"198.51.100.300"`},
		{"a\nb", `"a\nb"`},
		{strings.Repeat("x", 40), `"` + strings.Repeat("x", 40) + `"`},
		{strings.Repeat("x", 41), `"` + strings.Repeat("x", 40) + `"…`},
		{strings.Repeat("é", 50), `"` + strings.Repeat("é", 40) + `"…`},
	} {
		if got := config.Excerpt(tt.in); got != tt.want {
			t.Errorf("Excerpt(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

// TestConfigDstFileContentExcerpt: a dst-file that is not a list of
// destinations (here a password file) is quoted by a short excerpt only,
// and a file of one huge line is refused at that line.
func TestConfigDstFileContentExcerpt(t *testing.T) {
	hash := "$6$rounds=656000$" + strings.Repeat("A", 86)
	dir := writeFiles(t, map[string]string{
		"c.yaml":    "rules:\n  - to: 192.0.2.22\n    dst-file: shadow\n",
		"shadow":    "root:" + hash + ":20228:0:99999:7:::\n",
		"long.yaml": "rules:\n  - to: 192.0.2.22\n    dst-file: long\n",
		"long":      strings.Repeat("1", 200<<10) + "\n",
	})
	err := loadWithin(t, filepath.Join(dir, "c.yaml"))
	if err == nil {
		t.Fatal("Load accepted a password file as a dst-file")
	}
	msg := err.Error()
	wantErrNaming(t, "Load", err, []string{`shadow" line 1`, `"root:$6$rounds=656000$AAAAAAAAAAAAAAAAAA"…`})
	if strings.Contains(msg, hash) || strings.Contains(msg, "20228") || strings.Contains(msg, "\n") {
		t.Errorf("message quotes more than an excerpt, or spans lines: %s", msg)
	}

	err = loadWithin(t, filepath.Join(dir, "long.yaml"))
	wantErrNaming(t, "Load", err, []string{`long" line 1`, "longer than 64 KiB"})
	if len(err.Error()) > 500 {
		t.Errorf("message of %d bytes for a long line", len(err.Error()))
	}
}

// TestConfigRefusesDuplicatesAndBadOut: a 'to' list naming an address
// twice, and an 'out' that cannot be an interface name, are refused naming
// the value, on one line.
func TestConfigRefusesDuplicatesAndBadOut(t *testing.T) {
	for _, tt := range []struct {
		name, doc string
		want      []string
	}{
		{"to twice", "rules:\n  - to: [192.0.2.22, 192.0.2.22]\n    dst: [198.51.100.4]\n", []string{"line 2", "names 192.0.2.22 twice"}},
		{"spread to twice", "rules:\n  - to: [192.0.2.22, 192.0.2.23, 192.0.2.22]\n    spread: true\n    dst: [198.51.100.4]\n", []string{"names 192.0.2.22 twice"}},
		{"IPv6 to twice, spelt differently", "rules:\n  - to: [2001:db8::22, 2001:DB8:0::22]\n    dst: [2001:db8:ffff::4]\n", []string{"names 2001:db8::22 twice"}},
		{"out with a newline", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: \"eth0\\nINJECTED\"\n", []string{`"eth0\nINJECTED"`, "not an interface name"}},
		{"out with a blank", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: eth 0\n", []string{`"eth 0"`}},
		{"out too long", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: a-very-long-interface-name\n", []string{`"a-very-long-interface-name"`}},
		{"out with a slash", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    out: eth0/1\n", []string{`"eth0/1"`}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Decode(strings.NewReader(tt.doc))
			wantErrNaming(t, "Decode", err, tt.want)
			if err != nil && strings.Contains(err.Error(), "\n") {
				t.Errorf("message spans lines: %q", err)
			}
		})
	}
}

func TestConfigCheckInterface(t *testing.T) {
	for _, ok := range []string{"eth0", "eth0.100", "br-1a2b3c4d5e6f", "veth_x@1", "wg0", "a23456789012345"} {
		if err := config.CheckInterface(ok); err != nil {
			t.Errorf("CheckInterface(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "eth 0", "eth0\n", "eth0/1", "eth0:1", "a234567890123456", "eth\x00", "éth0", "\teth0"} {
		if err := config.CheckInterface(bad); err == nil {
			t.Errorf("CheckInterface(%q) accepted", bad)
		}
	}
}

// TestConfigYAMLErrorsOneLine: the YAML decoder's own messages quote parts
// of the file; each of them stays one bounded line.
func TestConfigYAMLErrorsOneLine(t *testing.T) {
	for _, tt := range []struct {
		name, doc string
		want      string
	}{
		{"a value with a newline", "rules: \"a\\nINJECTED line\"\n", `a\nINJEC`},
		{"a bool with a newline", "rules:\n  - to: 192.0.2.22\n    dst: [198.51.100.4]\n    spread: \"y\\nINJECTED line\"\n", `y\nINJEC`},
		{"a long unknown key", "rules: []\n" + strings.Repeat("k", 1000) + ": 1\n", "kkkk"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Decode(strings.NewReader(tt.doc))
			wantErrNaming(t, "Decode", err, []string{tt.want})
			if err == nil {
				return
			}
			for _, line := range strings.Split(err.Error(), "\n") {
				if strings.HasPrefix(line, "INJECTED") || len(line) > 300 {
					t.Errorf("message line %q", line)
				}
			}
		})
	}
}
