package routes

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Fake is an in-memory System for unit tests. It applies the batch lines
// this package writes, refuses to delete what is not there (as ip does),
// and like `ip -force -batch` runs every line and reports the first
// failure at the end.
type Fake struct {
	state map[bool]*State
	// Fail makes Batch of that family (true: IPv4) fail.
	Fail map[bool]error
}

// NewFake returns empty routing.
func NewFake() *Fake {
	return &Fake{state: map[bool]*State{true: {}, false: {}}, Fail: map[bool]error{}}
}

func (f *Fake) Read(is4 bool) (State, error) {
	s := *f.state[is4]
	s.Rules, s.Routes = slices.Clone(s.Rules), slices.Clone(s.Routes)
	s.sort()
	return s, nil
}

func (f *Fake) Batch(is4 bool, input string) error {
	if err := f.Fail[is4]; err != nil {
		return err
	}
	s := f.state[is4]
	var first error
	for n, line := range strings.Split(strings.TrimSpace(input), "\n") {
		if line == "" {
			continue
		}
		if err := apply(s, strings.Fields(line)); err != nil && first == nil {
			first = fmt.Errorf("fake ip -batch line %d %q: %w", n+1, line, err)
		}
	}
	return first
}

func apply(s *State, w []string) error {
	if len(w) < 3 {
		return fmt.Errorf("short line")
	}
	obj, op, args := w[0], w[1], w[2:]
	opts := map[string]string{}
	var dst string
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "nop", "local":
			opts[args[i]] = "1"
		case "via", "dev", "src", "table", "proto", "pref", "from", "lookup", "suppress_prefixlength", "protocol", "fwmark", "goto":
			if i+1 >= len(args) {
				return fmt.Errorf("%s without a value", args[i])
			}
			opts[args[i]] = args[i+1]
			i++
		default:
			if dst != "" {
				return fmt.Errorf("unexpected %q", args[i])
			}
			dst = args[i]
		}
	}
	switch obj {
	case "route":
		r, err := parseRoute(dst, opts)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(s.Routes, func(x Route) bool { return x.key() == r.key() })
		switch op {
		case "replace":
			if i >= 0 {
				s.Routes[i] = r
			} else {
				s.Routes = append(s.Routes, r)
			}
		case "del":
			if i < 0 {
				return fmt.Errorf("no such route")
			}
			s.Routes = slices.Delete(s.Routes, i, i+1)
		default:
			return fmt.Errorf("route %s", op)
		}
	case "rule":
		r, err := parseRule(opts)
		if err != nil {
			return err
		}
		i := slices.Index(s.Rules, r)
		switch op {
		case "add":
			s.Rules = append(s.Rules, r)
		case "del":
			if i < 0 {
				return fmt.Errorf("no such rule")
			}
			s.Rules = slices.Delete(s.Rules, i, i+1)
		default:
			return fmt.Errorf("rule %s", op)
		}
	default:
		return fmt.Errorf("object %q", obj)
	}
	return nil
}

func parseRoute(dst string, o map[string]string) (Route, error) {
	var r Route
	var err error
	if r.Table, err = strconv.Atoi(o["table"]); err != nil {
		return r, fmt.Errorf("table %q", o["table"])
	}
	switch {
	case dst == "default" && strings.Contains(o["via"]+o["src"], ":"):
		r.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	case dst == "default":
		r.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	default:
		if r.Dst, err = netip.ParsePrefix(dst); err != nil {
			return r, err
		}
	}
	if v := o["via"]; v != "" {
		if r.Via, err = netip.ParseAddr(v); err != nil {
			return r, err
		}
	}
	if v := o["src"]; v != "" {
		if r.Src, err = netip.ParseAddr(v); err != nil {
			return r, err
		}
	}
	r.Dev, r.Local = o["dev"], o["local"] != ""
	return r, nil
}

func parseRule(o map[string]string) (IPRule, error) {
	r := IPRule{SuppressPrefixLen: -1}
	var err error
	if r.Priority, err = strconv.Atoi(o["pref"]); err != nil {
		return r, fmt.Errorf("pref %q", o["pref"])
	}
	switch {
	case o["goto"] != "":
		if r.Goto, err = strconv.Atoi(o["goto"]); err != nil {
			return r, fmt.Errorf("goto %q", o["goto"])
		}
	case o["nop"] != "":
		r.Nop = true
	default:
		if r.Table, err = strconv.Atoi(o["lookup"]); err != nil {
			return r, fmt.Errorf("lookup %q", o["lookup"])
		}
	}
	if v := o["from"]; v != "" {
		if r.From, err = netip.ParsePrefix(v); err != nil {
			return r, err
		}
	}
	if v := o["fwmark"]; v != "" {
		val, mask, _ := strings.Cut(v, "/")
		n, err := strconv.ParseUint(val, 0, 32)
		if err != nil {
			return r, err
		}
		r.Mark, r.MarkMask = uint32(n), 0xffffffff
		if mask != "" {
			m, err := strconv.ParseUint(mask, 0, 32)
			if err != nil {
				return r, err
			}
			r.MarkMask = uint32(m)
		}
	}
	if v, ok := o["suppress_prefixlength"]; ok {
		if r.SuppressPrefixLen, err = strconv.Atoi(v); err != nil {
			return r, err
		}
	}
	return r, nil
}

// Rules returns the fake's rules of the family.
func (f *Fake) Rules(is4 bool) ([]IPRule, error) {
	s, err := f.Read(is4)
	return s.Rules, err
}
