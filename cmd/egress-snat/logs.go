package main

import (
	"io"
	"log/slog"
)

// newLogHandler is watch's log handler for --log-format format, writing to
// w. Durations are written the one way in both formats, as Go duration
// strings ("500ms", "1m30s": the spelling the flags take). Left alone, the
// JSON handler would write them as integer nanoseconds
// ("resync":500000000) where the text handler writes strings.
func newLogHandler(w io.Writer, format string) (slog.Handler, error) {
	opts := &slog.HandlerOptions{ReplaceAttr: durationsAsStrings}
	switch format {
	case "text":
		return slog.NewTextHandler(w, opts), nil
	case "json":
		return slog.NewJSONHandler(w, opts), nil
	}
	return nil, usageError("--log-format %q: want text or json", format)
}

// durationsAsStrings renders a time.Duration attribute, in a group or not,
// as its String().
func durationsAsStrings(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		a.Value = slog.StringValue(a.Value.Duration().String())
	}
	return a
}
