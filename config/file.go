package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"unicode"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"
)

// Size limits of the files egress-snat reads. A desired-state file of a
// few thousand rules is well under a megabyte; a dst-file holds one
// destination a line, and a million of them (IPv6 /128s with comments) fit
// in 256 MiB.
const (
	MaxFileSize    = 16 << 20  // a desired-state (YAML) file
	MaxDstFileSize = 256 << 20 // a dst-file
)

// ErrNotRegular is the error of a path that is not a regular file: a named
// pipe would block the read until some writer came, a device such as
// /dev/zero never ends, a directory has no content to read.
var ErrNotRegular = errors.New("not a regular file")

// ErrTooLarge is the error of a file over its size limit.
var ErrTooLarge = errors.New("file too large")

// ReadFileBounded reads the whole of path, which must be a regular file of
// at most max bytes. Every file egress-snat reads comes through here or
// through OpenBounded.
func ReadFileBounded(path string, max int64) ([]byte, error) {
	r, err := OpenBounded(path, max)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}

// OpenBounded opens path for reading. It refuses, at once, anything but a
// regular file: the open does not block (O_NONBLOCK: a FIFO without a
// writer would otherwise hang the run for good), and the open descriptor,
// not the path, is checked, so a file swapped in between cannot slip past.
// The reader fails with ErrTooLarge as soon as more than max bytes are
// read, even if the file grows after the check.
func OpenBounded(path string, max int64) (io.ReadCloser, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	var st unix.Stat_t
	if err != nil {
		// A socket cannot be opened at all (ENXIO); say what it is.
		if unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT != unix.S_IFREG {
			return nil, notRegular(path, st.Mode)
		}
		return nil, &os.PathError{Op: "open", Path: strconv.Quote(path), Err: err}
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "stat", Path: strconv.Quote(path), Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, notRegular(path, st.Mode)
	}
	if st.Size > max {
		unix.Close(fd)
		return nil, tooLarge(path, max)
	}
	// O_NONBLOCK stays set: Linux ignores it for reads of a real file, and
	// a pseudo-file that calls itself regular but waits for data (such as
	// /proc/kmsg or a tracing pipe) then fails with EAGAIN instead of
	// hanging the run.
	f := os.NewFile(uintptr(fd), path)
	return &boundedFile{f: f, path: path, max: max, left: max + 1}, nil
}

func notRegular(path string, mode uint32) error {
	return fmt.Errorf("%q: %w (%s): egress-snat reads only regular files", path, ErrNotRegular, fileKind(mode))
}

func tooLarge(path string, max int64) error {
	return fmt.Errorf("%q: %w (the limit is %s)", path, ErrTooLarge, mib(max))
}

func mib(n int64) string {
	if n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

// id is the open file's identity and change times (see dstCache).
func (b *boundedFile) id() (fileID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(b.f.Fd()), &st); err != nil {
		return fileID{}, &os.PathError{Op: "stat", Path: strconv.Quote(b.path), Err: err}
	}
	return idOf(&st), nil
}

// boundedFile reads at most max bytes and fails on the byte after.
type boundedFile struct {
	f    *os.File
	path string
	max  int64
	left int64
}

func (b *boundedFile) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, tooLarge(b.path, b.max)
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.f.Read(p)
	b.left -= int64(n)
	if b.left <= 0 {
		return n, tooLarge(b.path, b.max)
	}
	return n, err
}

func (b *boundedFile) Close() error { return b.f.Close() }

func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFIFO:
		return "a named pipe"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	}
	return "not a file"
}

// ExcerptLen is the most characters of a file's content, or of any value,
// that an error message quotes.
const ExcerptLen = 40

// Excerpt quotes s for an error message, on one line: Go-quoted (%q), and
// cut to ExcerptLen characters with "…" after the closing quote when cut,
// so that a stray secret file or a megabyte line is not echoed whole.
func Excerpt(s string) string {
	n := 0
	for i := range s {
		if n == ExcerptLen {
			return strconv.Quote(s[:i]) + "…"
		}
		n++
	}
	return strconv.Quote(s)
}

// CheckInterface refuses a name that cannot be a network interface: Linux
// takes 1 to 15 bytes, none of them '/', ':' or blank, and not "." or "..".
// egress-snat also wants printable ASCII, so that a name echoed in a message
// or written into an iptables-restore payload stays one word on one line.
func CheckInterface(name string) error {
	const why = "(want 1 to 15 printable ASCII characters, none of them blank, '/' or ':')"
	if name == "" || len(name) > 15 || name == "." || name == ".." {
		return fmt.Errorf("%s is not an interface name %s", Excerpt(name), why)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c <= ' ' || c > '~' || c == '/' || c == ':' {
			return fmt.Errorf("%s is not an interface name %s", Excerpt(name), why)
		}
	}
	return nil
}

// OneLine escapes the control characters of a message (a newline becomes
// \n), so that a value echoed inside it, as the flag parser and the YAML
// decoder do, cannot start a line of its own in a terminal or a log.
func OneLine(s string) string {
	if !strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unicode.IsPrint(r) {
			b.WriteRune(r)
			continue
		}
		q := strconv.QuoteRune(r)
		b.WriteString(q[1 : len(q)-1])
	}
	return b.String()
}

// maxYAMLErrorLen bounds one error of the YAML decoder, which quotes keys
// (up to 1024 characters) and values (cut, but with raw newlines) of the
// file.
const maxYAMLErrorLen = 200

// tidyYAMLError makes each error of the YAML decoder one bounded line.
func tidyYAMLError(err error) error {
	tidy := func(s string) string {
		s = OneLine(s)
		if n := 0; len(s) > maxYAMLErrorLen {
			for i := range s {
				if n == maxYAMLErrorLen {
					return s[:i] + "…"
				}
				n++
			}
		}
		return s
	}
	var te *yaml.TypeError
	if errors.As(err, &te) {
		out := &yaml.TypeError{Errors: make([]string, len(te.Errors))}
		for i, e := range te.Errors {
			out.Errors[i] = tidy(e)
		}
		return out
	}
	if msg := err.Error(); tidy(msg) != msg {
		return errors.New(tidy(msg))
	}
	return err
}

// maxProblemSearch bounds the documents whose syntax errors problemLine
// places: about 20 parses of a 4 MiB file take a second or two.
const maxProblemSearch = 4 << 20

// yamlLine is the "yaml: line N: " a syntax error of the YAML parser starts
// with.
var yamlLine = regexp.MustCompile(`^yaml: line (\d+): `)

// problemLine makes a syntax error of the YAML parser name the line of the
// mistake. The parser names the line where the enclosing block began
// instead (off by one, too, when that is the first line): a rule's key
// indented one space too far or too little, on line 3, is reported on line
// 1. The line of the mistake is the first one at which a prefix of the
// document fails with the same error; it is found by bisection, a handful
// of parses (up to maxProblemSearch; a longer file keeps the parser's
// line). Any other error is returned as it is.
func problemLine(doc []byte, err error) error {
	var te *yaml.TypeError
	if errors.As(err, &te) || len(doc) > maxProblemSearch {
		return err
	}
	m := yamlLine.FindStringSubmatch(err.Error())
	if m == nil {
		return err
	}
	said, _ := strconv.Atoi(m[1])
	full := parseError(doc)
	if full == "" || full != err.Error() {
		return err // not a syntax error of the document as a whole
	}
	ends := []int{0} // ends[i] is the end of line i
	for i, c := range doc {
		if c == '\n' {
			ends = append(ends, i+1)
		}
	}
	if ends[len(ends)-1] != len(doc) {
		ends = append(ends, len(doc))
	}
	// The first lo lines parse, or fail otherwise; the first hi fail so.
	lo, hi := 0, len(ends)-1
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if parseError(doc[:ends[mid]]) == full {
			hi = mid
		} else {
			lo = mid
		}
	}
	if hi <= said {
		return err
	}
	msg := strings.TrimPrefix(err.Error(), m[0])
	return fmt.Errorf("yaml: line %d: %s (is it indented as the lines above it?)", hi, msg)
}

// parseError is the first error of parsing every document of doc, as text;
// "" when it parses.
func parseError(doc []byte) string {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			return ""
		}
		if err != nil {
			return err.Error()
		}
	}
}
