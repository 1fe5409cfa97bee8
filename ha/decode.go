package ha

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// DecodeConfig reads a Config from YAML whose keys are Config's fields,
// one to one, in the form of their yaml tags (client-vip: 10.50.0.1/24,
// node: {name: gw-a, priority: 150, sync-addr: 10.51.0.1}, durations as
// "100ms"). It is strict: an unknown key, a value of the wrong type, or
// more than one document is an error naming the line. It does not
// validate the pair; Validate (and Files) do.
func DecodeConfig(r io.Reader) (Config, error) {
	doc, err := io.ReadAll(r)
	if err != nil {
		return Config{}, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var c Config
	if err := dec.Decode(&c); err != nil {
		if errors.Is(err, io.EOF) {
			return Config{}, errors.New("empty file: want the node, the peer and the addresses (see egress-snat ha config --help)")
		}
		return Config{}, tidyYAML(doc, err)
	}
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return Config{}, errors.New("more than one YAML document; want exactly one")
	}
	return c, nil
}

// yamlTypes are the Go type names yaml.v3 puts in its messages, and what
// a reader of the file knows them as.
var yamlTypes = strings.NewReplacer(
	"in type ha.Config", "in the pair's settings",
	"in type ha.Node", "in node or peer",
	"in type ha.SyncLink", "in sync",
	"in type ha.Paths", "in paths",
	"into netip.Prefix", "into an address with its prefix length (192.0.2.100/24)",
	"into []netip.Prefix", "into a list of addresses with their prefix lengths",
	"into netip.Addr", "into an address",
	"into time.Duration", "into a duration (100ms, 2s)",
	"into ha.Config", "into the pair's settings (a mapping)",
	"into ha.Node", "into a node (a mapping: name, priority, sync-addr)",
	"into ha.SyncLink", "into sync (a mapping: interface, port)",
	"into ha.Paths", "into paths (a mapping)",
)

var (
	yamlPrefix = regexp.MustCompile(`^yaml: (unmarshal errors:\n\s*)?`)
	// What netip's UnmarshalText says, which yaml.v3 passes on without
	// the line: netip.ParsePrefix("10.50.0.1/33"): prefix length out of
	// range, or ParseAddr("10.51.0.x"): unexpected character (at "x")
	netipError = regexp.MustCompile(`^(?:netip\.)?Parse(Prefix|Addr)\(("(?:[^"\\]|\\.)*")\): (.*)$`)
)

// tidyYAML words yaml.v3's error for the reader of the file: no "yaml:"
// prefix, no Go type names, one line per problem joined with "; ", and
// the line of a bad address, which yaml.v3 leaves out.
func tidyYAML(doc []byte, err error) error {
	msg := yamlPrefix.ReplaceAllString(err.Error(), "")
	if m := netipError.FindStringSubmatch(msg); m != nil {
		value, _ := strconv.Unquote(m[2])
		want := "an address with its prefix length, such as 192.0.2.100/24"
		if m[1] == "Addr" {
			want = "an address, such as 10.51.0.1"
		}
		where := ""
		for i, l := range strings.Split(string(doc), "\n") {
			if value != "" && strings.Contains(l, value) {
				where = fmt.Sprintf("line %d: ", i+1)
				break
			}
		}
		return fmt.Errorf("%s%s: %s (want %s)", where, m[2], m[3], want)
	}
	var lines []string
	for _, l := range strings.Split(msg, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, yamlTypes.Replace(l))
		}
	}
	return fmt.Errorf("%s", strings.Join(lines, "; "))
}
