package main

import (
	"fmt"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
)

// nearest returns the candidate that word most likely is a typo of: the
// closest by edit distance (an insertion, deletion, substitution or swap of
// two neighbours each count one), if it is within a third of word's length
// (at least one edit), else "". Of equally close ones, the first wins. A
// word of one or two letters is too short to guess from by distance (any
// other short name is as close): it gets the first candidate it begins, if
// any ("nf": nft).
func nearest(word string, candidates []string) string {
	if len([]rune(word)) < 3 {
		for _, c := range candidates {
			if word != "" && strings.HasPrefix(c, word) {
				return c
			}
		}
		return ""
	}
	best, bestDist := "", max(1, len([]rune(word))/3)+1
	for _, c := range candidates {
		if d := editDistance(word, c); d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance of a and b.
func editDistance(a, b string) int {
	s, t := []rune(a), []rune(b)
	d := make([][]int, len(s)+1)
	for i := range d {
		d[i] = make([]int, len(t)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(s); i++ {
		for j := 1; j <= len(t); j++ {
			cost := 1
			if s[i-1] == t[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && s[i-1] == t[j-2] && s[i-2] == t[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(s)][len(t)]
}

// commandNames are the names an operator may type: the visible commands and
// help.
func commandNames(app *cli.App) []string {
	names := []string{}
	for _, c := range app.Commands {
		if !c.Hidden {
			names = append(names, c.Names()...)
		}
	}
	return append(names, "help")
}

// unknownCommand is the error of a command name that is none: exit 2, with
// the nearest command when there is one.
func unknownCommand(app *cli.App, name string) error {
	msg := fmt.Sprintf("unknown command %q", name)
	if near := nearest(name, commandNames(app)); near != "" {
		msg += fmt.Sprintf("; did you mean %s?", near)
	}
	return usageError("%s (see egress-snat --help)", msg)
}

// undefinedFlag is what urfave/cli's parser (the standard flag package)
// says of a flag it does not know.
const undefinedFlag = "flag provided but not defined: -"

// flagHint adds to a flag parser's error the nearest flag of flags (those
// of the command, or the global ones), or says that a global flag given
// after the command belongs before it. It returns "" when it has nothing
// to add.
func flagHint(err error, flags, global []cli.Flag, command string) string {
	name, ok := strings.CutPrefix(err.Error(), undefinedFlag)
	if !ok {
		return ""
	}
	name = strings.TrimLeft(name, "-")
	if command != "" && lookupFlag(global, name) != nil {
		return fmt.Sprintf("; --%s is a global flag: give it before the command (egress-snat --%s ... %s ...)", name, name, command)
	}
	var names []string
	for _, fl := range flags {
		names = append(names, fl.Names()...)
	}
	names = append(names, "help")
	near := nearest(name, names)
	if near == "" {
		return ""
	}
	if len([]rune(near)) == 1 {
		return "; did you mean -" + near + "?"
	}
	return "; did you mean --" + near + "?"
}

// helpTopicHint adds the nearest command to urfave/cli's error for
// "egress-snat help TOPIC" of an unknown topic.
func helpTopicHint(app *cli.App, msg string) string {
	topic, ok := strings.CutPrefix(msg, "No help topic for '")
	if !ok {
		return msg
	}
	topic = strings.TrimSuffix(topic, "'")
	if near := nearest(topic, commandNames(app)); near != "" && !slices.Contains(commandNames(app), topic) {
		return msg + "; did you mean " + near + "?"
	}
	return msg
}
