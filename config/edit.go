package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"go.yaml.in/yaml/v3"

	"github.com/egress-snat/egress-snat/snat"
)

// Doc is a desired-state file opened for editing as a YAML node tree, so
// that an edit keeps the operator's comments, key order and the rules it
// does not touch. It is the permanent state of `--permanent` and `save`.
//
// A Doc only edits what the file says; it resolves nothing against the host.
// Bytes and Write check the result with Decode, so an edit never produces a
// file that `apply -f` would refuse.
type Doc struct {
	path   string
	root   *yaml.Node // the document node
	rules  *yaml.Node // the sequence under "rules"
	mode   fs.FileMode
	exists bool
}

// Match is what a rule selects besides its destinations: who sends (the
// rule's from, uid or cgroup; none is the host's own traffic) and the
// outgoing interface. A rule's identity is its destination plus its Match:
// putting a Spec replaces, for its destinations, the rule with the same
// Match, and leaves rules of other senders or interfaces alone. matchOf is
// the one place that reads a Match from a rule.
type Match struct {
	Sender snat.Sender
	Out    string
}

// matchesOf reads the Matches of a rule node: one per sender (a from list
// names several). A uid name or cgroup that no longer resolves matches
// nothing.
func matchesOf(rule *yaml.Node) []Match {
	out := ""
	if v := mapValue(rule, "out"); v != nil {
		out = v.Value
	}
	var r Rule
	if err := rule.Decode(&r); err != nil {
		return nil
	}
	senders, err := r.Senders()
	if err != nil {
		return nil
	}
	ms := make([]Match, len(senders))
	for i, s := range senders {
		ms[i] = Match{Sender: s, Out: out}
	}
	return ms
}

// matchOf is the rule's Match when it has one sender (split makes it so
// before an edit); ok is false otherwise.
func matchOf(rule *yaml.Node) (m Match, ok bool) {
	ms := matchesOf(rule)
	if len(ms) != 1 {
		return Match{}, false
	}
	return ms[0], true
}

// setMatch writes m's keys into a new rule node.
func setMatch(rule *yaml.Node, m Match) {
	switch s := m.Sender; s.Kind {
	case snat.SenderFrom:
		mapSet(rule, "from", scalar(dstString(s.From)))
	case snat.SenderUID:
		mapSet(rule, "uid", scalar(strconv.FormatUint(uint64(s.UID), 10)))
	case snat.SenderCgroup:
		mapSet(rule, "cgroup", scalar(s.Cgroup))
	}
	if m.Out != "" {
		mapSet(rule, "out", scalar(m.Out))
	}
}

// split gives each sender of a rule with a from list that includes m's
// sender a rule of its own, so that editing m's rule leaves the other
// senders' as they were.
func (d *Doc) split(m Match) { d.splitWhere(func(o Match) bool { return o == m }) }

// splitWhere is split for every Match that passes match.
func (d *Doc) splitWhere(match func(Match) bool) {
	var out []*yaml.Node
	for _, r := range d.rules.Content {
		ms := matchesOf(r)
		if len(ms) < 2 || !slices.ContainsFunc(ms, match) {
			out = append(out, r)
			continue
		}
		for _, one := range ms {
			c := cloneNode(r)
			mapSet(c, "from", scalar(dstString(one.Sender.From)))
			out = append(out, c)
		}
	}
	d.rules.Content = out
}

func cloneNode(n *yaml.Node) *yaml.Node {
	c := *n
	c.Content = make([]*yaml.Node, len(n.Content))
	for i, k := range n.Content {
		c.Content[i] = cloneNode(k)
	}
	return &c
}

// Spec is one rule to put: its destinations, its Match and its source (to,
// spread, and how: via, method).
type Spec struct {
	Match
	Dst    []netip.Prefix
	To     []netip.Addr
	Spread bool
	Via    netip.Addr
	Method snat.Method
	// Pool and Sticky: the source is a pool (To is then empty).
	Pool   netip.Prefix
	Sticky snat.Sticky
	// Ports is the source port range (to-ports), zero for none.
	Ports snat.Ports
	// Spill lets watch spill a busy destination port (spill).
	Spill bool
}

// OpenDoc reads path for editing. A missing file is an empty document
// ("rules: []"), written with mode 0644 on first Write. A file that does not
// parse, or that Decode refuses, is an error: an edit must never throw away
// a file it cannot read.
func OpenDoc(path string) (*Doc, error) {
	d := &Doc{path: path, mode: 0o644}
	b, err := ReadFileBounded(path, MaxFileSize)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return d, d.parse([]byte("rules: []\n"))
	case err != nil:
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	d.mode, d.exists = fi.Mode().Perm(), true
	if _, err := Decode(bytes.NewReader(b)); err != nil {
		return nil, fmt.Errorf("%q: %w (the file was not changed)", path, err)
	}
	if err := d.parse(b); err != nil {
		return nil, fmt.Errorf("%q: %w (the file was not changed)", path, err)
	}
	return d, nil
}

func (d *Doc) parse(b []byte) error {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return err
	}
	if root.Kind != yaml.DocumentNode || len(root.Content) != 1 || root.Content[0].Kind != yaml.MappingNode {
		return errors.New("want a mapping with a 'rules:' list")
	}
	top := root.Content[0]
	rules := mapValue(top, "rules")
	if rules == nil {
		return errors.New("no 'rules:' list")
	}
	if rules.Kind == yaml.ScalarNode && rules.Tag == "!!null" {
		// "rules:" with nothing after it: an empty list to add to.
		*rules = yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", LineComment: rules.LineComment}
	}
	if rules.Kind != yaml.SequenceNode {
		return fmt.Errorf("line %d: 'rules' is not a list", rules.Line)
	}
	d.root, d.rules = &root, rules
	return nil
}

// Path is the file the Doc was read from and is written to.
func (d *Doc) Path() string { return d.path }

// Exists reports whether the file existed when it was opened.
func (d *Doc) Exists() bool { return d.exists }

// Put makes s the rule for each of its destinations: every rule with s's
// Match loses those destinations (a rule left with none is deleted), and
// they are added to a rule with s's Match and source, or to a new one at the
// end. A rule that lists exactly s's destinations keeps its place and its
// comments and only gets the new source. Putting the same Spec twice
// changes nothing the second time.
func (d *Doc) Put(s Spec) {
	if len(s.Dst) == 0 {
		return
	}
	d.split(s.Match)
	for _, r := range d.rules.Content {
		if m, ok := matchOf(r); ok && m == s.Match && mapValue(r, "dst-file") == nil && slices.Equal(sortedDsts(r), sortedCopy(s.Dst)) {
			setSource(r, s)
			return
		}
	}
	d.remove(s.Dst, func(m Match) bool { return m == s.Match })
	for _, r := range d.rules.Content {
		if m, ok := matchOf(r); ok && m == s.Match && mapValue(r, "dst-file") == nil && mapValue(r, "dst") != nil && sameSource(r, s) {
			appendDsts(r, s.Dst)
			return
		}
	}
	d.rules.Style = 0 // "rules: []" grows into a block list
	d.rules.Content = append(d.rules.Content, newRule(s))
}

// Remove deletes dsts from every rule with Match m, shrinking their dst
// lists; a rule left with no destination is deleted. It returns the
// destinations no such rule listed. Destinations read from a dst-file are
// not the file's to edit and are left alone.
func (d *Doc) Remove(m Match, dsts []netip.Prefix) (missing []netip.Prefix) {
	d.split(m)
	found := d.remove(dsts, func(o Match) bool { return o == m })
	for _, p := range dsts {
		if !found[p] {
			missing = append(missing, p)
		}
	}
	return missing
}

// RemoveSender is Remove for the rules of sender s, whatever their
// interface, as unset removes them.
func (d *Doc) RemoveSender(s snat.Sender, dsts []netip.Prefix) (missing []netip.Prefix) {
	match := func(m Match) bool { return m.Sender == s }
	d.splitWhere(match)
	found := d.remove(dsts, match)
	for _, p := range dsts {
		if !found[p] {
			missing = append(missing, p)
		}
	}
	return missing
}

// RemoveAny is Remove for rules of any Match.
func (d *Doc) RemoveAny(dsts []netip.Prefix) (missing []netip.Prefix) {
	found := d.remove(dsts, func(Match) bool { return true })
	for _, p := range dsts {
		if !found[p] {
			missing = append(missing, p)
		}
	}
	return missing
}

// ReplaceSource makes to the source of dst in every rule of sender s that
// lists dst, whatever its interface, as rotate does: a rule that lists only
// dst gets the new source in place; from a rule that lists more, dst is
// split off into a new rule with the same Match. It reports whether any
// rule listed dst.
func (d *Doc) ReplaceSource(s snat.Sender, dst netip.Prefix, to netip.Addr) bool {
	ofSender := func(m Match) bool { return m.Sender == s }
	d.splitWhere(ofSender)
	found := false
	var split []Match
	for _, r := range d.rules.Content {
		dsts := dstsOf(r)
		if m, ok := matchOf(r); !ok || !ofSender(m) || !slices.Contains(dsts, dst) {
			continue
		}
		found = true
		if len(dsts) == 1 && mapValue(r, "dst-file") == nil && len(matchesOf(r)) == 1 {
			mapSet(r, "to", addrsNode([]netip.Addr{to}))
			mapDelete(r, "spread")
			mapDelete(r, "sticky")
			mapDelete(r, "to-ports")
			mapDelete(r, "spill")
			continue
		}
		split = append(split, matchesOf(r)[0])
	}
	for _, m := range split {
		d.Put(Spec{Match: m, Dst: []netip.Prefix{dst}, To: []netip.Addr{to}})
	}
	return found
}

// Clear removes every rule; the file's other comments stay.
func (d *Doc) Clear() {
	d.rules.Content = nil
	d.rules.Style = yaml.FlowStyle // "rules: []"
}

// remove deletes dsts from the rules whose Match passes match and reports
// which destinations it found.
func (d *Doc) remove(dsts []netip.Prefix, match func(Match) bool) map[netip.Prefix]bool {
	found := map[netip.Prefix]bool{}
	drop := map[netip.Prefix]bool{}
	for _, p := range dsts {
		drop[p] = true
	}
	kept := d.rules.Content[:0]
	for _, r := range d.rules.Content {
		m, ok := matchOf(r)
		if !ok || !match(m) {
			kept = append(kept, r)
			continue
		}
		v := mapValue(r, "dst")
		if v == nil {
			// A from rule without dst is about every destination.
			if all, ok := implicitDst(r); ok && drop[all] && mapValue(r, "dst-file") == nil {
				found[all] = true
				continue
			}
			kept = append(kept, r)
			continue
		}
		items := v.Content
		if v.Kind == yaml.ScalarNode {
			items = []*yaml.Node{v}
		}
		var left []*yaml.Node
		for _, it := range items {
			if p, err := ParseDst(it.Value); err == nil && drop[p] {
				found[p] = true
				continue
			}
			left = append(left, it)
		}
		switch {
		case len(left) == len(items):
			kept = append(kept, r)
		case len(left) > 0: // only a list can keep some
			v.Content = left
			kept = append(kept, r)
		case mapValue(r, "dst-file") != nil:
			mapDelete(r, "dst")
			kept = append(kept, r)
		default:
			// A rule with no destination left is gone, and so is its
			// comment; the next rule keeps its own.
		}
	}
	clear(d.rules.Content[len(kept):])
	d.rules.Content = kept
	return found
}

// Bytes renders the document, checked by Decode.
func (d *Doc) Bytes() ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(d.root); err != nil {
		return nil, fmt.Errorf("%s: rendering: %w", d.path, err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("%s: rendering: %w", d.path, err)
	}
	if _, err := Decode(bytes.NewReader(b.Bytes())); err != nil {
		return nil, fmt.Errorf("%s: the edited file would not be valid: %w", d.path, err)
	}
	return b.Bytes(), nil
}

// Write replaces the file with the document, atomically (see WriteFile).
func (d *Doc) Write() error {
	p, err := d.Prepare()
	if err != nil {
		return err
	}
	return p.Commit()
}

// Prepare renders the document and writes it, synced, to a temporary file
// next to the file, without replacing the file yet: Commit does that, Abort
// throws it away. A change that must land in the kernel and the file
// together prepares first, so that a file that cannot be written is known
// before the kernel is touched.
func (d *Doc) Prepare() (*Pending, error) {
	b, err := d.Bytes()
	if err != nil {
		return nil, err
	}
	return prepareFile(d.path, b, d.mode)
}

// Pending is a prepared replacement of a file.
type Pending struct {
	path, tmp string
	done      bool
}

// WriteFile replaces path with b so that a reader, or the next boot after a
// crash, sees the old file or the new one, never a part: it writes a
// temporary file in the same folder, syncs it, renames it over path and
// syncs the folder. On error, path is unchanged and the temporary file is
// removed.
func WriteFile(path string, b []byte, mode fs.FileMode) error {
	p, err := prepareFile(path, b, mode)
	if err != nil {
		return err
	}
	return p.Commit()
}

func prepareFile(path string, b []byte, mode fs.FileMode) (_ *Pending, err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
			err = fmt.Errorf("writing %s: %w (the file was not changed)", path, err)
		}
	}()
	if err = tmp.Chmod(mode); err != nil {
		return nil, err
	}
	if _, err = tmp.Write(b); err != nil {
		return nil, err
	}
	if err = tmp.Sync(); err != nil {
		return nil, err
	}
	if err = tmp.Close(); err != nil {
		return nil, err
	}
	return &Pending{path: path, tmp: tmp.Name()}, nil
}

// Commit renames the prepared file over the file and syncs the folder.
// After a failed Commit the file is unchanged.
func (p *Pending) Commit() error {
	if p.done {
		return nil
	}
	p.done = true
	if err := os.Rename(p.tmp, p.path); err != nil {
		os.Remove(p.tmp)
		return fmt.Errorf("writing %s: %w (the file was not changed)", p.path, err)
	}
	if df, err := os.Open(filepath.Dir(p.path)); err == nil {
		_ = df.Sync() // renamed; a failed sync only weakens crash safety
		df.Close()
	}
	return nil
}

// Abort removes the prepared file, leaving the file as it was. It does
// nothing after Commit, so it can be deferred.
func (p *Pending) Abort() {
	if p == nil || p.done {
		return
	}
	p.done = true
	os.Remove(p.tmp)
}

// Node helpers. A rule is a mapping node; its keys are scalars.

func mapValue(m *yaml.Node, key string) *yaml.Node {
	if m.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

// mapSet sets key to v, keeping the old value's comments, or appends it.
func mapSet(m *yaml.Node, key string, v *yaml.Node) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			old := m.Content[i+1]
			v.HeadComment, v.LineComment, v.FootComment = old.HeadComment, old.LineComment, old.FootComment
			m.Content[i+1] = v
			return
		}
	}
	m.Content = append(m.Content, scalar(key), v)
}

func mapDelete(m *yaml.Node, key string) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content = slices.Delete(m.Content, i, i+2)
			return
		}
	}
}

func scalar(s string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s}
}

// addrsNode is one address as a scalar, several as a flow list; a
// weighted spread (an entry's To form, see snat.Weigh) as its addresses
// with their weights, [192.0.2.22=3, 192.0.2.23=1].
func addrsNode(as []netip.Addr) *yaml.Node {
	if len(as) == 1 {
		return scalar(as[0].String())
	}
	n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Style: yaml.FlowStyle}
	addrs, weights, weighted := snat.Weights(as)
	for i, a := range addrs {
		v := a.String()
		if weighted {
			v += "=" + strconv.Itoa(weights[i])
		}
		n.Content = append(n.Content, scalar(v))
	}
	return n
}

func dstsNode(ps []netip.Prefix) *yaml.Node {
	n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Style: yaml.FlowStyle}
	for _, p := range ps {
		n.Content = append(n.Content, scalar(dstString(p)))
	}
	return n
}

// dstString writes a host prefix as a bare address, as people write it.
func dstString(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

func newRule(s Spec) *yaml.Node {
	r := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
	mapSet(r, "to", addrsNode(s.To))
	setMatch(r, s.Match)
	mapSet(r, "dst", dstsNode(s.Dst))
	setSource(r, s)
	return r
}

// setSource gives a rule node s's source and how, in place; keys s does
// not need are removed.
func setSource(r *yaml.Node, s Spec) {
	if s.Pool.IsValid() {
		mapSet(r, "to", scalar(s.Pool.String()))
	} else {
		mapSet(r, "to", addrsNode(s.To))
	}
	optional := func(key, value string, tag string) {
		if value == "" {
			mapDelete(r, key)
			return
		}
		mapSet(r, key, &yaml.Node{Kind: yaml.ScalarNode, Tag: tag, Value: value})
	}
	spread, via, method, sticky := "", "", "", ""
	if s.Pool.IsValid() && s.Sticky != "" && s.Sticky != snat.StickyConnection {
		sticky = string(s.Sticky)
	}
	if s.Spread {
		spread = "true"
	}
	if s.Via.IsValid() {
		via = s.Via.String()
	}
	if s.Method != "" && s.Method != snat.MethodSNAT {
		method = string(s.Method)
	}
	optional("spread", spread, "!!bool")
	optional("via", via, "!!str")
	optional("method", method, "!!str")
	optional("sticky", sticky, "!!str")
	ports := ""
	if !s.Ports.IsZero() {
		ports = s.Ports.String()
	}
	optional("to-ports", ports, "!!str")
	spill := ""
	if s.Spill {
		spill = "true"
	}
	optional("spill", spill, "!!bool")
}

func sameSource(r *yaml.Node, s Spec) bool {
	var have Rule
	if err := r.Decode(&have); err != nil {
		return false
	}
	via := netip.Addr{}
	if len(have.Via) == 1 {
		via = have.Via[0]
	}
	m, _ := snat.ParseMethod(have.Method)
	want := s.Method
	if want == "" {
		want = snat.MethodSNAT
	}
	sticky := func(k snat.Sticky) snat.Sticky {
		if k == "" {
			return snat.StickyConnection
		}
		return k
	}
	ports, _ := snat.ParsePorts(have.ToPorts)
	return slices.Equal(have.To.Addrs, s.To) && have.Spread == s.Spread && via == s.Via && m == want && ports == s.Ports && have.Spill == s.Spill &&
		have.To.Pool == s.Pool && (!s.Pool.IsValid() || sticky(snat.Sticky(have.Sticky)) == sticky(s.Sticky))
}

func appendDsts(r *yaml.Node, ps []netip.Prefix) {
	v := mapValue(r, "dst")
	if v.Kind == yaml.ScalarNode {
		mapSet(r, "dst", &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Style: yaml.FlowStyle, Content: []*yaml.Node{scalar(v.Value)}})
		v = mapValue(r, "dst")
	}
	for _, p := range ps {
		if !slices.Contains(dstsOf(r), p) {
			v.Content = append(v.Content, scalar(dstString(p)))
		}
	}
}

// dstsOf returns the destinations a rule node lists under dst, or the
// implicit every-destination of a from rule without dst.
func dstsOf(r *yaml.Node) []netip.Prefix {
	var ps Prefixes
	if v := mapValue(r, "dst"); v != nil {
		_ = v.Decode(&ps)
	} else if all, ok := implicitDst(r); ok && mapValue(r, "dst-file") == nil {
		ps = Prefixes{all}
	}
	return ps
}

// implicitDst is the destination of a from rule without dst: everything of
// its family.
func implicitDst(r *yaml.Node) (netip.Prefix, bool) {
	var have Rule
	if r.Decode(&have) != nil || len(have.From) == 0 || have.To.empty() {
		return netip.Prefix{}, false
	}
	return everything(have.To.first()), true
}

func sortedDsts(r *yaml.Node) []netip.Prefix { return sortedCopy(dstsOf(r)) }

func sortedCopy(ps []netip.Prefix) []netip.Prefix {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}
