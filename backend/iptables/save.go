package iptables

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// This file is the one reader of iptables-save output. Everything that
// looks at the kernel's iptables goes through ReadSave: the nat and mangle
// chains of ours (parse.go, mangle.go), whether a table is empty enough to
// drop (DropTable), the foreign rules ahead of our jump (ahead.go) and the
// SNAT rules' counters for stats (counters.go). One tokenizer (splitWords)
// and one --to-source parser (parseToSource) serve them all.

// Saved is iptables-save output, read: the tables asked for, in the order
// printed.
type Saved struct {
	Tables []*SavedTable
}

// SavedTable is one table of a save: its chains as declared and its rules
// in the order printed (iptables-save prints them chain by chain).
type SavedTable struct {
	Name   string
	Chains []SavedChain
	Rules  []SavedRule
}

// SavedChain is a chain declaration, ":NAME POLICY [packets:bytes]".
type SavedChain struct {
	Name string
	// Policy is a built-in chain's policy (ACCEPT, DROP), "-" for a user
	// chain, "" when the line has none.
	Policy string
	// Counters are the policy's, zero when the line has none.
	Counters Counters
}

// SavedRule is one rule, "[packets:bytes] -A CHAIN SPEC...".
type SavedRule struct {
	Chain string
	// Spec is the rule's words after "-A CHAIN", unquoted.
	Spec []string
	// Counters are zero unless the save was taken with -c.
	Counters Counters
}

// Counters are a rule's or a policy's packet and byte counters
// (iptables-save -c).
type Counters struct{ Packets, Bytes uint64 }

// ReadSave reads iptables-save (or ip6tables-save) output, with counters
// or without. With names, it reads only those tables and skips the lines
// of the others unread, so a malformed rule of another tool's table fails
// nothing of ours and a large filter table costs little. A table printed
// twice is read as one.
//
// It fails on a rule it cannot split into words (an unterminated quote)
// or whose counters are not numbers, naming the table ("nat table: ...").
// Lines of no kind it knows (COMMIT, comments) are skipped.
func ReadSave(text string, names ...string) (Saved, error) {
	var s Saved
	var cur *SavedTable // nil outside a table that was asked for
	for len(text) > 0 {
		var line string
		line, text, _ = strings.Cut(text, "\n")
		line = strings.TrimSpace(line)
		if name, ok := strings.CutPrefix(line, "*"); ok {
			cur = nil
			if len(names) == 0 || slices.Contains(names, name) {
				if cur = s.Table(name); cur == nil {
					cur = &SavedTable{Name: name}
					s.Tables = append(s.Tables, cur)
				}
			}
			continue
		}
		if cur == nil || line == "" || line[0] == '#' {
			continue
		}
		if decl, ok := strings.CutPrefix(line, ":"); ok {
			cur.Chains = append(cur.Chains, readChain(decl))
			continue
		}
		var c Counters
		if rest, ok := strings.CutPrefix(line, "["); ok {
			counters, rule, ok := strings.Cut(rest, "] ")
			if !ok {
				continue
			}
			var err error
			if c, err = readCounters(counters); err != nil {
				return s, fmt.Errorf("%s table: bad counters in %q", cur.Name, line)
			}
			line = rule
		}
		if !strings.HasPrefix(line, "-A ") {
			continue
		}
		words, err := splitWords(line)
		if err != nil {
			return s, fmt.Errorf("%s table: %w", cur.Name, err)
		}
		cur.Rules = append(cur.Rules, SavedRule{Chain: words[1], Spec: words[2:], Counters: c})
	}
	return s, nil
}

// Table returns the table called name, nil when the save has none (or it
// was not asked for).
func (s Saved) Table(name string) *SavedTable {
	for _, t := range s.Tables {
		if t.Name == name {
			return t
		}
	}
	return nil
}

// empty reports whether t holds nothing anyone added: only built-in chains,
// with no rules and policy ACCEPT. A missing table (nil) is not empty: there
// is nothing to drop.
func (t *SavedTable) empty() bool {
	if t == nil || len(t.Rules) > 0 {
		return false
	}
	return !slices.ContainsFunc(t.Chains, func(c SavedChain) bool { return !c.builtinAccept(t.Name) })
}

// builtinAccept reports whether c is a built-in chain of table with policy
// ACCEPT: a chain that is there whether or not anyone used the table.
func (c SavedChain) builtinAccept(table string) bool {
	return slices.Contains(builtinChains[table], c.Name) && c.Policy == "ACCEPT"
}

// readChain reads a chain declaration after its ":".
func readChain(decl string) SavedChain {
	f := strings.Fields(decl)
	var c SavedChain
	if len(f) > 0 {
		c.Name = f[0]
	}
	if len(f) > 1 {
		c.Policy = f[1]
	}
	if len(f) > 2 {
		// A policy's counters are read where they can be; nothing
		// depends on them.
		if counters, ok := strings.CutPrefix(f[2], "["); ok {
			c.Counters, _ = readCounters(strings.TrimSuffix(counters, "]"))
		}
	}
	return c
}

// readCounters reads "packets:bytes".
func readCounters(s string) (Counters, error) {
	p, b, _ := strings.Cut(s, ":")
	pk, err1 := strconv.ParseUint(p, 10, 64)
	by, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil {
		return Counters{}, fmt.Errorf("bad counters %q", s)
	}
	return Counters{pk, by}, nil
}

// splitWords splits an iptables-save line into words, honouring the double
// quotes iptables-save puts around comments with blanks (and the
// backslashes it puts before quotes inside them). It is also the fake's
// reader of restore input, which has the same syntax.
func splitWords(line string) ([]string, error) {
	if !strings.Contains(line, `"`) {
		// Without quotes there are no escapes: the words are the blank
		// separated fields, cut from one copy of the line (the caller may
		// keep them; they must not pin the whole save).
		words := strings.FieldsFunc(strings.Clone(line), func(c rune) bool { return c == ' ' || c == '\t' })
		if len(words) < 2 {
			return nil, fmt.Errorf("short rule %q", line)
		}
		return words, nil
	}
	return splitQuoted(line)
}

// splitQuoted is splitWords for a line with quotes.
func splitQuoted(line string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord, inQuote := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case inQuote && c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case c == '"':
			inQuote = !inQuote
			inWord = true
		case !inQuote && (c == ' ' || c == '\t'):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inQuote {
		return nil, fmt.Errorf("unterminated quote in %q", line)
	}
	if inWord {
		words = append(words, cur.String())
	}
	if len(words) < 2 {
		return nil, fmt.Errorf("short rule %q", line)
	}
	return words, nil
}

// builtinChains are each table's built-in chains, as iptables-save lists
// them: a table holding only these, empty and accepting, holds nothing.
var builtinChains = map[string][]string{
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
	"mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
}
