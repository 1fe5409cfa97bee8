package ha

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// What a node of the pair can say about itself, for `egress-snat ha
// status`: the role keepalived gave it last (the hook records it in
// Paths.StateFile) and whether conntrackd's sync works (its statistics,
// conntrackd -C CONF -s). Parsing and judging are here, on text, so that
// they are tested on conntrackd's real output (testdata/conntrackd,
// captured from conntrackd 1.4.7 in namespaces); running conntrackd is
// one small function beside them.

// State is what the hook recorded last in Paths.StateFile.
type State struct {
	// State is the state keepalived gave the hook: MASTER, BACKUP or
	// FAULT (or STOP, which keepalived gives instances, not groups).
	State string
	// Since is when the hook recorded it.
	Since time.Time
}

// ParseState reads the state file's text, "STATE UNIXTIME" as the hook
// writes it ("MASTER 1765043765.123456789").
func ParseState(text string) (State, error) {
	f := strings.Fields(text)
	if len(f) < 2 {
		return State{}, fmt.Errorf("state %q: want STATE UNIXTIME", strings.TrimSpace(text))
	}
	sec, frac, _ := strings.Cut(f[1], ".")
	s, err := strconv.ParseInt(sec, 10, 64)
	if err != nil {
		return State{}, fmt.Errorf("state %q: time %q is not seconds since 1970", strings.TrimSpace(text), f[1])
	}
	var ns int64
	if frac != "" {
		frac = (frac + "000000000")[:9]
		if ns, err = strconv.ParseInt(frac, 10, 64); err != nil {
			return State{}, fmt.Errorf("state %q: time %q is not seconds since 1970", strings.TrimSpace(text), f[1])
		}
	}
	return State{State: f[0], Since: time.Unix(s, ns)}, nil
}

// CacheStats are the counters of one of conntrackd's caches: the
// internal one (this node's kernel table) or the external one (what the
// peer replicated, which the hook commits on becoming master).
type CacheStats struct {
	Active                   uint64 // current active connections
	Created, CreateFailed    uint64
	Updated, UpdateFailed    uint64
	Destroyed, DestroyFailed uint64
}

// SyncStats are the numbers of conntrackd -s (conntrackd -s ct prints
// the same) that tell how the sync goes.
type SyncStats struct {
	Internal, External CacheStats
	// Link is the device of the active sync link ("sync").
	Link string
	// Traffic on the link since conntrackd started; a packet carries
	// one or more messages.
	BytesSent, BytesReceived     uint64
	PacketsSent, PacketsReceived uint64
	SendErrors, ReceiveErrors    uint64
	// Messages from the peer that were malformed, or lost (a gap in its
	// sequence numbers; FTFW asks for them again).
	Malformed, Lost uint64
}

// LinkStats are a sync link of conntrackd -s link.
type LinkStats struct {
	Device string
	Status string // RUNNING, or DOWN when the device is down
	Role   string // ACTIVE, or BACKUP for a redundant link
	// PacketsSent and PacketsReceived are as in SyncStats.
	PacketsSent, PacketsReceived uint64
	SendErrors, ReceiveErrors    uint64
}

// QueueStats are one of conntrackd's queues (conntrackd -s queue).
type QueueStats struct {
	Current, Max, NoSpace uint64
}

var (
	// "connections created:		           4	failed:	           0"
	colonNumbers = regexp.MustCompile(`([A-Za-z][A-Za-z ]*):\s+(\d+)`)
	// "                 708 Bytes sent                  708 Bytes recv"
	numberLabels = regexp.MustCompile(`(\d+) ([A-Za-z]+(?: [A-Za-z]+)?)`)
	// "UDP traffic (active device=sync):"
	activeDevice = regexp.MustCompile(`^UDP traffic \(active device=(\S+)\):$`)
	// "UDP traffic device=sync status=RUNNING role=ACTIVE:"
	linkHeader = regexp.MustCompile(`^UDP traffic device=(\S+) status=(\S+) role=(\S+):$`)
)

// ParseStats reads the output of conntrackd -s. It wants both caches and
// the sync link's traffic: the output of a conntrackd that syncs.
func ParseStats(out string) (SyncStats, error) {
	var s SyncStats
	section := ""
	seen := map[string]bool{}
	for _, line := range strings.Split(out, "\n") {
		trimmed := strings.TrimSpace(line)
		if trimmed == "" {
			continue
		}
		if m := activeDevice.FindStringSubmatch(trimmed); m != nil {
			section, s.Link = "link", m[1]
			seen[section] = true
			continue
		}
		switch trimmed {
		case "cache internal:", "cache external:", "traffic processed:", "message tracking:":
			section = strings.TrimSuffix(trimmed, ":")
			seen[section] = true
			continue
		}
		switch section {
		case "cache internal":
			cacheLine(&s.Internal, trimmed)
		case "cache external":
			cacheLine(&s.External, trimmed)
		case "link":
			for label, n := range labelled(trimmed) {
				switch label {
				case "Bytes sent":
					s.BytesSent = n
				case "Bytes recv":
					s.BytesReceived = n
				case "Pckts sent":
					s.PacketsSent = n
				case "Pckts recv":
					s.PacketsReceived = n
				case "Error send":
					s.SendErrors = n
				case "Error recv":
					s.ReceiveErrors = n
				}
			}
		case "message tracking":
			for label, n := range labelled(trimmed) {
				switch label {
				case "Malformed msgs":
					s.Malformed = n
				case "Lost msgs":
					s.Lost = n
				}
			}
		}
	}
	for _, want := range []string{"cache internal", "cache external", "link"} {
		if !seen[want] {
			if want == "link" {
				want = "UDP traffic (active device=...)"
			}
			return s, fmt.Errorf("conntrackd -s printed no %q section: is it running in FTFW mode with a sync link?\n%s", want, strings.TrimSpace(out))
		}
	}
	return s, nil
}

// cacheLine fills c from one line of a cache's section.
func cacheLine(c *CacheStats, line string) {
	m := colonNumbers.FindAllStringSubmatch(line, -1)
	if len(m) == 0 {
		return
	}
	n := func(i int) uint64 {
		if i >= len(m) {
			return 0
		}
		v, _ := strconv.ParseUint(m[i][2], 10, 64)
		return v
	}
	switch strings.TrimSpace(m[0][1]) {
	case "current active connections":
		c.Active = n(0)
	case "connections created":
		c.Created, c.CreateFailed = n(0), n(1)
	case "connections updated":
		c.Updated, c.UpdateFailed = n(0), n(1)
	case "connections destroyed":
		c.Destroyed, c.DestroyFailed = n(0), n(1)
	}
}

// labelled reads "708 Bytes sent   708 Bytes recv" as its labels' numbers.
func labelled(line string) map[string]uint64 {
	out := map[string]uint64{}
	for _, m := range numberLabels.FindAllStringSubmatch(line, -1) {
		v, _ := strconv.ParseUint(m[1], 10, 64)
		out[m[2]] = v
	}
	return out
}

// ParseLinks reads the output of conntrackd -s link: each sync link, the
// active one first as conntrackd lists them.
func ParseLinks(out string) ([]LinkStats, error) {
	var links []LinkStats
	for _, line := range strings.Split(out, "\n") {
		trimmed := strings.TrimSpace(line)
		if m := linkHeader.FindStringSubmatch(trimmed); m != nil {
			links = append(links, LinkStats{Device: m[1], Status: m[2], Role: m[3]})
			continue
		}
		if len(links) == 0 || trimmed == "" {
			continue
		}
		l := &links[len(links)-1]
		for label, n := range labelled(trimmed) {
			switch label {
			case "Pckts sent":
				l.PacketsSent = n
			case "Pckts recv":
				l.PacketsReceived = n
			case "Error send":
				l.SendErrors = n
			case "Error recv":
				l.ReceiveErrors = n
			}
		}
	}
	if len(links) == 0 {
		return nil, fmt.Errorf("conntrackd -s link printed no link:\n%s", strings.TrimSpace(out))
	}
	return links, nil
}

// ParseQueues reads the output of conntrackd -s queue, by queue name:
// txqueue (messages waiting to be sent), errorq, and rsqueue (messages
// sent and kept until the peer acknowledges them; FTFW resends from it).
func ParseQueues(out string) (map[string]QueueStats, error) {
	queues := map[string]QueueStats{}
	name := ""
	for _, line := range strings.Split(out, "\n") {
		trimmed := strings.TrimSpace(line)
		if q, ok := strings.CutPrefix(trimmed, "queue "); ok && strings.HasSuffix(q, ":") {
			name = strings.TrimSuffix(q, ":")
			queues[name] = QueueStats{}
			continue
		}
		m := colonNumbers.FindStringSubmatch(trimmed)
		if name == "" || m == nil {
			continue
		}
		v, _ := strconv.ParseUint(m[2], 10, 64)
		q := queues[name]
		switch m[1] {
		case "current elements":
			q.Current = v
		case "maximum elements":
			q.Max = v
		case "not enough space errors":
			q.NoSpace = v
		}
		queues[name] = q
	}
	if _, ok := queues["rsqueue"]; !ok {
		return nil, fmt.Errorf("conntrackd -s queue printed no rsqueue:\n%s", strings.TrimSpace(out))
	}
	return queues, nil
}

// SyncSample is one reading of a conntrackd's statistics.
type SyncSample struct {
	At     time.Time
	Stats  SyncStats
	Links  []LinkStats
	Queues map[string]QueueStats
}

// Stats runs one statistics query of conntrackd, "conntrackd -C CONF -s
// WHAT" ("" for plain -s), and returns its output; an error says why
// conntrackd could not answer, in its own words.
type Stats func(ctx context.Context, what string) (string, error)

// ConntrackdStats is the Stats of the conntrackd at program, reached
// through the control socket that conf names (conntrackd -C conf).
func ConntrackdStats(program, conf string) Stats {
	return func(ctx context.Context, what string) (string, error) {
		args := []string{"-C", conf, "-s"}
		if what != "" {
			args = append(args, what)
		}
		var stdout, stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, program, args...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			msg := conntrackdMessage(stderr.String())
			if msg == "" {
				msg = err.Error()
			}
			return "", fmt.Errorf("%s %s: %s", program, strings.Join(args, " "), msg)
		}
		return stdout.String(), nil
	}
}

// conntrackdLogPrefix is what conntrackd puts before each message:
// "[Sun Dec  6 19:02:05 2026] (pid=23468) [ERROR] ".
var conntrackdLogPrefix = regexp.MustCompile(`^\[[^]]*\] \(pid=\d+\) `)

// conntrackdMessage is conntrackd's stderr without its time stamps, on
// one line.
func conntrackdMessage(stderr string) string {
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(stderr), "\n") {
		if l = strings.TrimSpace(conntrackdLogPrefix.ReplaceAllString(l, "")); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "; ")
}

// ReadSync takes one sample: conntrackd -s, -s link and -s queue.
func ReadSync(ctx context.Context, stats Stats) (SyncSample, error) {
	s := SyncSample{At: time.Now()}
	out, err := stats(ctx, "")
	if err != nil {
		return s, err
	}
	if s.Stats, err = ParseStats(out); err != nil {
		return s, err
	}
	if out, err = stats(ctx, "link"); err != nil {
		return s, err
	}
	if s.Links, err = ParseLinks(out); err != nil {
		return s, err
	}
	if out, err = stats(ctx, "queue"); err != nil {
		return s, err
	}
	s.Queues, err = ParseQueues(out)
	return s, err
}

// SyncHealth is the judgement of two samples of a conntrackd, with the
// numbers of the later one.
type SyncHealth struct {
	// Healthy: the sync link is up, the peer was heard in the window,
	// and no send or receive error happened in it.
	Healthy bool
	// Problems say why it is not healthy; Notes are worth knowing but
	// not a fault.
	Problems, Notes []string

	Link       string // the active sync link's device
	LinkStatus string // RUNNING or DOWN
	// ExternalCache is how many of the peer's connections this node
	// holds, ready to commit; InternalCache how many of its own it
	// replicates.
	ExternalCache, InternalCache uint64
	// PacketsSent and PacketsReceived on the link since conntrackd
	// started; ReceivedInWindow of them in the window.
	PacketsSent, PacketsReceived, ReceivedInWindow uint64
	SendErrors, ReceiveErrors                      uint64
	Lost, Malformed                                uint64
	// AwaitingAck is how many messages wait for the peer's
	// acknowledgement (FTFW's resend queue).
	AwaitingAck uint64
	Window      time.Duration
}

// JudgeSync compares two samples of one conntrackd, first taken before
// last. The peer's conntrackd sends at least one message a second (FTFW's
// alive message when there is nothing else), so a window of more than a
// second in which nothing arrived means that the peer, or the path to it,
// is gone.
func JudgeSync(first, last SyncSample) SyncHealth {
	h := SyncHealth{
		Link:            last.Stats.Link,
		ExternalCache:   last.Stats.External.Active,
		InternalCache:   last.Stats.Internal.Active,
		PacketsSent:     last.Stats.PacketsSent,
		PacketsReceived: last.Stats.PacketsReceived,
		SendErrors:      last.Stats.SendErrors,
		ReceiveErrors:   last.Stats.ReceiveErrors,
		Lost:            last.Stats.Lost,
		Malformed:       last.Stats.Malformed,
		AwaitingAck:     last.Queues["rsqueue"].Current,
		Window:          last.At.Sub(first.At),
	}
	delta := func(a, b uint64) uint64 {
		if b < a { // conntrackd restarted in between
			return b
		}
		return b - a
	}
	h.ReceivedInWindow = delta(first.Stats.PacketsReceived, last.Stats.PacketsReceived)
	window := h.Window.Round(100 * time.Millisecond)
	for _, l := range last.Links {
		if l.Device == last.Stats.Link || h.LinkStatus == "" {
			h.LinkStatus = l.Status
		}
		if l.Device == last.Stats.Link {
			break
		}
	}
	if h.LinkStatus != "RUNNING" {
		h.Problems = append(h.Problems, fmt.Sprintf("the sync link %s is %s", h.Link, strings.ToLower(h.LinkStatus)))
	}
	if h.ReceivedInWindow == 0 {
		h.Problems = append(h.Problems, fmt.Sprintf("nothing received from the peer on %s in %s, where its conntrackd sends at least one message a second: "+
			"it is stopped, or the link or a firewall drops the sync traffic", h.Link, window))
	}
	if n := delta(first.Stats.SendErrors, last.Stats.SendErrors); n > 0 {
		h.Problems = append(h.Problems, fmt.Sprintf("%s on %s in %s", count(n, "send error", "send errors"), h.Link, window))
	}
	if n := delta(first.Stats.ReceiveErrors, last.Stats.ReceiveErrors); n > 0 {
		h.Problems = append(h.Problems, fmt.Sprintf("%s on %s in %s", count(n, "receive error", "receive errors"), h.Link, window))
	}
	if n := delta(first.Stats.Lost, last.Stats.Lost); n > 0 {
		h.Notes = append(h.Notes, fmt.Sprintf("%s from the peer lost in %s (FTFW asks for them again)", count(n, "message", "messages"), window))
	}
	if n := delta(first.Stats.External.CreateFailed, last.Stats.External.CreateFailed); n > 0 {
		h.Notes = append(h.Notes, fmt.Sprintf("%s of the peer's connections could not be added to the external cache in %s (is HashLimit too small?)", count(n, "one", "some"), window))
	}
	h.Healthy = len(h.Problems) == 0
	return h
}

func count(n uint64, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	if one == "one" {
		return strconv.FormatUint(n, 10)
	}
	return strconv.FormatUint(n, 10) + " " + many
}

// CheckSync samples conntrackd, then again every poll until the peer has
// been heard or max has passed, and judges the first and the last sample.
// A healthy pair answers within about a second; one whose peer is gone
// takes max, which should be well over a second.
func CheckSync(ctx context.Context, stats Stats, poll, max time.Duration) (SyncHealth, error) {
	first, err := ReadSync(ctx, stats)
	if err != nil {
		return SyncHealth{}, err
	}
	last := first
	for {
		elapsed := last.At.Sub(first.At)
		if elapsed >= max || last.Stats.PacketsReceived != first.Stats.PacketsReceived {
			break
		}
		select {
		case <-ctx.Done():
			return SyncHealth{}, ctx.Err()
		case <-time.After(poll):
		}
		if last, err = ReadSync(ctx, stats); err != nil {
			return SyncHealth{}, err
		}
	}
	return JudgeSync(first, last), nil
}

// ReadState reads the state file at path. A file that does not exist is
// an error that wraps fs.ErrNotExist: the hook has not run since boot.
func ReadState(path string) (State, error) {
	b, err := readSmall(path)
	if err != nil {
		return State{}, err
	}
	st, err := ParseState(string(b))
	if err != nil {
		return State{}, fmt.Errorf("%s: %w", path, err)
	}
	return st, nil
}

// readSmall reads a file of at most 1 MiB: the files of a node are small,
// and a path that names something else (a device, a named pipe) must not
// hang or fill the memory.
func readSmall(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, err
	} else if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, 1<<20+1))
	if err != nil {
		return nil, err
	}
	if len(b) > 1<<20 {
		return nil, fmt.Errorf("%s is larger than 1 MiB", path)
	}
	return b, nil
}
