// Package config reads the desired-state file of `egress-snat apply`:
//
//	rules:
//	  - to: 192.0.2.22
//	    dst: [198.51.100.0/24, 203.0.113.7]
//	    out: eth0                 # optional
//	  - to: [192.0.2.22, 192.0.2.23]
//	    spread: true              # new connections round-robin over to
//	    dst: [203.0.113.0/24]
//	  - to: [192.0.2.22=3, 192.0.2.23=1]
//	    spread: true              # three connections from .22 for each from .23
//	    dst: [198.51.100.128/25]
//	  - to: [192.0.2.24, 192.0.2.25] # failover: the first one on the host
//	    dst: [198.51.100.0/24]
//	  - to: 192.0.2.23
//	    dst-file: partners.txt    # one address or CIDR a line, '#' comments
//	  - to: 192.0.2.23
//	    from: [172.30.0.0/16]     # forwarded traffic from these sources
//	  - to: 192.0.2.100
//	    from: [10.50.0.0/24]
//	    standby: true             # a gateway pair's address: may be on the peer
//	  - to: 192.0.2.22
//	    uid: postfix              # or a uid; or cgroup: system.slice/x.service
//	    dst: [0.0.0.0/0]
//	  - to: 10.20.0.5             # an address of another NIC:
//	    dst: [203.0.113.0/24]     # leave by that NIC,
//	    via: 10.20.0.1            # through this gateway (optional)
//	  - to: 192.0.2.22
//	    dst: [198.51.100.9]
//	    method: route             # a route with src instead of SNAT
//	  - to: 2001:db8:1::/64       # a pool: an IPv6 prefix routed to the host
//	    sticky: destination       # connection (default), destination, sender or period
//	    dst: [2001:db8:ffff::/48]
//	  - to: 192.0.2.22
//	    dst: [203.0.113.9]
//	    to-ports: 40000-40999     # TCP and UDP source ports from this range
//	  - to: [192.0.2.22, 192.0.2.23]
//	    dst: [203.0.113.0/24]
//	    spill: true               # watch spills a busy destination port to .23
//
// A rule without from, uid or cgroup is about the host's own traffic; one
// with from is about forwarded traffic, and without dst means every
// destination of its family.
//
// Decoding is strict: an unknown key, a bad address or a bad prefix is an
// error naming the file and line. The package only parses; whether the
// addresses exist on the host is checked by snat.Resolve.
//
// One schema, two models of the file. File (Load, LoadIntents) is the file
// as read, for resolving: compact (about 37 bytes a destination at 100,000,
// dst-files included), which a daemon keeps for its life. Doc (OpenDoc) is
// the file as the operator wrote it, a YAML node tree that an edit changes
// without losing comments, key order and style (--permanent, save): five
// times the size, and without the dst-files' contents, which an edit must
// not inline. A Doc checks itself with Decode before and after an edit and
// reads a rule's match through Rule, so the two cannot disagree on what a
// file means.
package config

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/egress-snat/egress-snat/internal/who"
	"github.com/egress-snat/egress-snat/snat"
)

// File is the whole desired state.
type File struct {
	Rules []Rule `yaml:"rules"`
}

// Rule gives destinations one source; several to spread over (Spread); or
// an ordered failover list, of which the first address on the host is used.
type Rule struct {
	To      Sources  `yaml:"to"`
	From    Froms    `yaml:"from"`
	UID     string   `yaml:"uid"`
	Cgroup  string   `yaml:"cgroup"`
	Dst     Prefixes `yaml:"dst"`
	DstFile string   `yaml:"dst-file"`
	Out     string   `yaml:"out"`
	Spread  bool     `yaml:"spread"`
	Via     Addrs    `yaml:"via"`
	Method  string   `yaml:"method"`
	Standby bool     `yaml:"standby"`
	Sticky  string   `yaml:"sticky"`
	ToPorts string   `yaml:"to-ports"`
	Spill   bool     `yaml:"spill"`

	line int
	// dstFile holds the destinations read from DstFile.
	dstFile []netip.Prefix
}

// Addrs is one address or a list of them.
type Addrs []netip.Addr

// Sources is a rule's to: one address or a list of them, a failover list
// or, with spread, the addresses to spread over, each with an optional
// =WEIGHT (192.0.2.22=3: three connections for each of a weight of 1).
type Sources struct {
	// Addrs are the addresses in an entry's To form: a weighted list
	// expanded into turns (snat.Weigh).
	Addrs []netip.Addr
	// Weighted says a weight was given: only a spread list takes one.
	Weighted bool
	// Pool is the IPv6 prefix given instead of addresses (a pool, see
	// snat's pool.go); Addrs is then empty.
	Pool netip.Prefix
}

// weightString renders the sources with their weights, as the file gives
// them: "[192.0.2.22=3, 192.0.2.23=1]".
func (s Sources) weightString() string {
	return "[" + strings.ReplaceAll(snat.Entry{To: s.Addrs}.ToString(), ",", ", ") + "]"
}

// first is an address of the sources' family.
func (s Sources) first() netip.Addr {
	if s.Pool.IsValid() {
		return s.Pool.Addr()
	}
	return s.Addrs[0]
}

// empty reports whether no source is given.
func (s Sources) empty() bool { return len(s.Addrs) == 0 && !s.Pool.IsValid() }

func (s *Sources) UnmarshalYAML(n *yaml.Node) error {
	items, err := scalarOrList(n)
	if err != nil {
		return err
	}
	vals := make([]string, len(items))
	for i, it := range items {
		vals[i] = it.Value
		if !snat.IsPoolSyntax(it.Value) {
			continue
		}
		if len(items) > 1 || n.Kind != yaml.ScalarNode {
			return fmt.Errorf("line %d: a pool (%s) is one prefix, alone, not in a list", it.Line, Excerpt(it.Value))
		}
		p, err := snat.ParsePool(it.Value)
		if err != nil {
			return fmt.Errorf("line %d: %w", it.Line, err)
		}
		s.Pool = p
		return nil
	}
	to, weighted, err := snat.ParseSpread(vals)
	if err != nil {
		// The line of the item at fault when one is named, else the list's.
		line := n.Line
		for _, it := range items {
			if strings.Contains(err.Error(), it.Value) || strings.Contains(err.Error(), Excerpt(it.Value)) {
				line = it.Line
				break
			}
		}
		return fmt.Errorf("line %d: %w", line, err)
	}
	s.Addrs, s.Weighted = to, weighted
	return nil
}

// Prefixes is one destination or a list; a bare address is a host.
type Prefixes []netip.Prefix

// Froms is one --from source prefix or a list; a bare address is a host.
type Froms []netip.Prefix

func (p *Froms) UnmarshalYAML(n *yaml.Node) error {
	items, err := scalarOrList(n)
	if err != nil {
		return err
	}
	for _, it := range items {
		pr, err := ParseFrom(it.Value)
		if err != nil {
			return fmt.Errorf("line %d: from: %w", it.Line, err)
		}
		*p = append(*p, pr)
	}
	return nil
}

// ParseFrom reads a source prefix of forwarded traffic (--from, from:): a
// prefix without host bits, or an address meaning that host.
func ParseFrom(s string) (netip.Prefix, error) {
	return ParseDst(s)
}

func (a *Addrs) UnmarshalYAML(n *yaml.Node) error {
	items, err := scalarOrList(n)
	if err != nil {
		return err
	}
	for _, it := range items {
		ad, err := netip.ParseAddr(it.Value)
		if err != nil || ad.Zone() != "" {
			return fmt.Errorf("line %d: %s is not an IP address", it.Line, Excerpt(it.Value))
		}
		if slices.Contains(*a, ad) {
			return fmt.Errorf("line %d: the list names %s twice", it.Line, ad)
		}
		*a = append(*a, ad)
	}
	return nil
}

func (p *Prefixes) UnmarshalYAML(n *yaml.Node) error {
	items, err := scalarOrList(n)
	if err != nil {
		return err
	}
	for _, it := range items {
		pr, err := ParseDst(it.Value)
		if err != nil {
			return fmt.Errorf("line %d: %w", it.Line, err)
		}
		*p = append(*p, pr)
	}
	return nil
}

// UnmarshalYAML accepts the keys of RuleKeys only. Node.Decode does not
// inherit the decoder's KnownFields, so a rule checks its own keys.
func (r *Rule) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			if k := n.Content[i]; !isRuleKey(k.Value) {
				return fmt.Errorf("line %d: unknown key %s in a rule (want %s)", k.Line, Excerpt(k.Value), ruleKeyList())
			}
		}
	}
	type plain Rule // without this method, so Decode does not recurse
	var p plain
	if err := n.Decode(&p); err != nil {
		return err
	}
	*r = Rule(p)
	r.line = n.Line
	return nil
}

// scalarOrList returns the scalar items of a value that is one scalar or a
// list of them, each with its own line for error messages.
func scalarOrList(n *yaml.Node) ([]*yaml.Node, error) {
	switch n.Kind {
	case yaml.ScalarNode:
		return []*yaml.Node{n}, nil
	case yaml.SequenceNode:
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode {
				return nil, fmt.Errorf("line %d: want an address, got a %s", c.Line, kindName(c.Kind))
			}
		}
		return n.Content, nil
	}
	return nil, fmt.Errorf("line %d: want an address or a list of them, got a %s", n.Line, kindName(n.Kind))
}

func kindName(k yaml.Kind) string {
	switch k {
	case yaml.MappingNode:
		return "mapping"
	case yaml.SequenceNode:
		return "list"
	case yaml.AliasNode:
		return "alias"
	}
	return "scalar"
}

// ParseDst reads a destination: a prefix without host bits, or an address.
func ParseDst(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, fmt.Errorf("%s is not a valid prefix", Excerpt(s))
		}
		if p.Masked() != p {
			return p, fmt.Errorf("%q has host bits set; did you mean %s?", s, p.Masked())
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%s is not a valid address or prefix", Excerpt(s))
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// Load reads path and the dst-files it names (relative to its folder).
// Each must be a regular file; path may hold MaxFileSize bytes, each
// dst-file MaxDstFileSize.
func Load(path string) (*File, error) {
	b, err := ReadFileBounded(path, MaxFileSize)
	if err != nil {
		return nil, err
	}
	f, err := Decode(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%q: %w", path, err)
	}
	for i := range f.Rules {
		r := &f.Rules[i]
		if r.DstFile == "" {
			continue
		}
		name := r.DstFile
		if !filepath.IsAbs(name) {
			name = filepath.Join(filepath.Dir(path), name)
		}
		r.dstFile, err = readDstFile(name)
		if err != nil {
			return nil, fmt.Errorf("%q: rule %d (line %d): dst-file: %w", path, i+1, r.line, err)
		}
	}
	return f, nil
}

// LoadIntents is the one loader of a desired-state file for a run: Load,
// then Intents, which checks what Load cannot (that a uid or cgroup exists
// here). Any problem is bad input (snat.InvalidError). apply and check use
// the intents; a daemon keeps the file and drops them (a rule keeps its
// destinations in 32 bytes each, an intent takes 200) until it resolves.
func LoadIntents(path string) (*File, []snat.Intent, error) {
	f, err := Load(path)
	if err != nil {
		return nil, nil, &snat.InvalidError{Err: err}
	}
	intents, err := f.Intents()
	if err != nil {
		return nil, nil, &snat.InvalidError{Err: err}
	}
	return f, intents, nil
}

// Decode parses a desired-state document strictly and checks each rule on
// its own (families, at least one source and destination). It reads no
// dst-file.
func Decode(r io.Reader) (*File, error) {
	doc, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var f File
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("empty file: want a 'rules:' list (an empty list, 'rules: []', removes every rule)")
		}
		return nil, tidyYAMLError(problemLine(doc, err))
	}
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return nil, errors.New("more than one YAML document; want exactly one")
	}
	var errs []error
	for i, r := range f.Rules {
		if err := r.check(); err != nil {
			errs = append(errs, fmt.Errorf("rule %d (line %d): %w", i+1, r.line, err))
		}
	}
	return &f, errors.Join(errs...)
}

func (r Rule) check() error {
	if r.To.empty() {
		return errors.New("'to' is required")
	}
	if r.To.Weighted && !r.Spread {
		return fmt.Errorf("'to' %s gives weights, which share new connections out over the addresses: add 'spread: true' (a list without it is a failover list, one address at a time)", r.To.weightString())
	}
	senders := 0
	for _, set := range []bool{len(r.From) > 0, r.UID != "", r.Cgroup != ""} {
		if set {
			senders++
		}
	}
	if senders > 1 {
		return errors.New("'from', 'uid' and 'cgroup' select different traffic: give one of them")
	}
	if len(r.Dst) == 0 && r.DstFile == "" && senders == 0 {
		return errors.New("'dst' or 'dst-file' is required (a rule with from, uid or cgroup may leave it out: every destination)")
	}
	if len(r.Via) > 1 {
		return errors.New("'via' is one gateway")
	}
	if len(r.Via) == 1 && r.Via[0].Is4() != r.To.first().Is4() {
		return fmt.Errorf("via %s and source %s are of different address families", r.Via[0], r.To.first())
	}
	m, err := snat.ParseMethod(r.Method)
	if err != nil {
		return err
	}
	if err := r.checkPool(m); err != nil {
		return err
	}
	if r.Spill {
		if addrs, _, _ := snat.Weights(r.To.Addrs); len(addrs) < 2 {
			return errors.New("'spill' needs a list of two addresses or more in 'to', to spill over")
		}
		if m == snat.MethodRoute {
			return errors.New("'spill' needs method snat: a route does not translate ports")
		}
	}
	if r.Standby && len(r.From) == 0 {
		return errors.New("'standby' is for a gateway's forwarded traffic: give 'from' (the host's own connections cannot wait for an address the peer holds)")
	}
	if r.Standby && m == snat.MethodRoute {
		return errors.New("'standby' needs method snat: a route's src must be an address the host has")
	}
	for _, p := range r.From {
		if p.Addr().Is4() != r.To.first().Is4() {
			return fmt.Errorf("from %s and source %s are of different address families", p, r.To.first())
		}
	}
	if r.Out != "" {
		if err := CheckInterface(r.Out); err != nil {
			return fmt.Errorf("'out': %w", err)
		}
	}
	for _, a := range r.To.Addrs[min(1, len(r.To.Addrs)):] {
		if a.Is4() != r.To.first().Is4() {
			return fmt.Errorf("'to' mixes address families: %s and %s", r.To.first(), a)
		}
	}
	for _, d := range r.Dst {
		if d.Addr().Is4() != r.To.first().Is4() {
			return fmt.Errorf("destination %s and source %s are of different address families", d, r.To.first())
		}
	}
	return nil
}

// checkPool checks what a pool (to: PREFIX) may come with, and that sticky
// comes only with one.
func (r Rule) checkPool(m snat.Method) error {
	p := r.To.Pool
	if r.ToPorts != "" {
		ports, err := snat.ParsePorts(r.ToPorts)
		if err != nil {
			return fmt.Errorf("'to-ports': %w", err)
		}
		switch {
		case p.IsValid():
			return fmt.Errorf("'to' %s is a pool, whose addresses do not run out of ports: leave out 'to-ports'", p)
		case m == snat.MethodRoute:
			return fmt.Errorf("'to-ports' %s needs method snat: a route does not translate ports", ports)
		}
	}
	if !p.IsValid() {
		if r.Sticky != "" {
			return fmt.Errorf("'sticky' is for a pool: 'to' an IPv6 prefix of /%d to /%d", snat.PoolMinBits, snat.PoolMaxBits)
		}
		return nil
	}
	if _, err := snat.ParseSticky(r.Sticky); err != nil {
		return err
	}
	switch {
	case r.Spread:
		return fmt.Errorf("'to' %s is a pool, which spreads by itself ('sticky' says how): leave out 'spread'", p)
	case len(r.Via) > 0:
		return fmt.Errorf("'to' %s is a pool: traffic leaves by the destination's route; 'via' is for an address of another interface", p)
	case m == snat.MethodRoute:
		return fmt.Errorf("'to' %s is a pool, which needs method snat: a route's src must be an address the host has", p)
	case r.Standby:
		return fmt.Errorf("'to' %s is a pool: 'standby' is for an address the peer gateway may hold", p)
	}
	return nil
}

// maxDstLine bounds one line of a dst-file: an address or prefix with a
// comment is far shorter, and a file that is not a list of destinations
// (a binary, one huge line) is refused at its first long line.
const maxDstLine = 64 << 10

func readDstFile(path string) ([]netip.Prefix, error) {
	fh, err := OpenBounded(path, MaxDstFileSize)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	id, err := fh.(*boundedFile).id()
	if err != nil {
		return nil, err
	}
	if dsts, ok := dstFiles.get(id); ok {
		return dsts, nil
	}
	// Not sized from the file's length: watch keeps these prefixes, and
	// a guess's spare capacity would stay with them.
	var out []netip.Prefix
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 0, 4096), maxDstLine)
	n := 1
	for ; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		p, err := ParseDst(line)
		if err != nil {
			return nil, fmt.Errorf("%q line %d: %w", path, n, err)
		}
		out = append(out, p)
	}
	switch err := sc.Err(); {
	case errors.Is(err, bufio.ErrTooLong):
		return nil, fmt.Errorf("%q line %d: longer than %d KiB; want one address or prefix a line", path, n, maxDstLine>>10)
	case err != nil:
		return nil, err
	}
	// In the chain's order (longest prefix first, then by address): the
	// entries resolved from them then need no sort of 200-byte entries,
	// which at 100,000 destinations cost more than this one of prefixes.
	sortPrefixes(out)
	dstFiles.put(id, out, time.Now())
	return out, nil
}

// sortPrefixes sorts longest prefix first, then by address. An IPv4 list
// (the common case, and a million lines long at most) is sorted as packed
// integers, several times faster than comparing prefixes.
func sortPrefixes(ps []netip.Prefix) {
	keys := make([]uint64, 0, len(ps))
	for _, p := range ps {
		if !p.Addr().Is4() {
			slices.SortFunc(ps, func(a, b netip.Prefix) int {
				if a.Bits() != b.Bits() {
					return b.Bits() - a.Bits()
				}
				return a.Addr().Compare(b.Addr())
			})
			return
		}
		a := p.Addr().As4()
		keys = append(keys, uint64(32-p.Bits())<<32|uint64(a[0])<<24|uint64(a[1])<<16|uint64(a[2])<<8|uint64(a[3]))
	}
	slices.Sort(keys)
	for i, k := range keys {
		a := netip.AddrFrom4([4]byte{byte(k >> 24), byte(k >> 16), byte(k >> 8), byte(k)})
		ps[i] = netip.PrefixFrom(a, 32-int(k>>32))
	}
}

// Senders returns whose traffic the rule is about: its from prefixes, its
// uid or cgroup (which must exist on this host), or the host's own.
func (r Rule) Senders() ([]snat.Sender, error) {
	switch {
	case len(r.From) > 0:
		out := make([]snat.Sender, len(r.From))
		for i, p := range r.From {
			out[i] = snat.From(p)
		}
		return out, nil
	case r.UID != "":
		uid, err := who.LookupUID(r.UID)
		if err != nil {
			return nil, err
		}
		return []snat.Sender{snat.UID(uid)}, nil
	case r.Cgroup != "":
		p, err := who.CheckCgroup(r.Cgroup)
		if err != nil {
			return nil, err
		}
		return []snat.Sender{snat.Cgroup(p)}, nil
	}
	return []snat.Sender{snat.Host()}, nil
}

// Intents returns the file's rules as intents for snat.Resolve: one per
// sender and destination.
func (f *File) Intents() ([]snat.Intent, error) {
	n := 0
	for _, r := range f.Rules {
		n += max(1, len(r.From)) * (len(r.Dst) + len(r.dstFile))
	}
	out := make([]snat.Intent, 0, n)
	var errs []error
	for i, r := range f.Rules {
		senders, err := r.Senders()
		if err != nil {
			errs = append(errs, fmt.Errorf("rule %d (line %d): %w", i+1, r.line, err))
			continue
		}
		dsts := slices.Concat(r.Dst, r.dstFile)
		if len(dsts) == 0 {
			dsts = []netip.Prefix{everything(r.To.first())}
		}
		for _, d := range dsts {
			if d.Addr().Is4() != r.To.first().Is4() {
				errs = append(errs, fmt.Errorf("rule %d (line %d): destination %s and source %s are of different address families", i+1, r.line, d, r.To.first()))
				continue
			}
			method, _ := snat.ParseMethod(r.Method) // checked by Decode
			ports, _ := snat.ParsePorts(r.ToPorts)  // checked by Decode
			var via netip.Addr
			if len(r.Via) == 1 {
				via = r.Via[0]
			}
			for _, s := range senders {
				out = append(out, snat.Intent{Sender: s, Dst: d, To: r.To.Addrs, Out: r.Out, Spread: r.Spread, Via: via, Method: method, Standby: r.Standby,
					Pool: r.To.Pool, Sticky: snat.Sticky(r.Sticky), Ports: ports, Spill: r.Spill})
			}
		}
	}
	return out, errors.Join(errs...)
}

// everything is the prefix of every destination of a's family.
func everything(a netip.Addr) netip.Prefix {
	if a.Is4() {
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
}
