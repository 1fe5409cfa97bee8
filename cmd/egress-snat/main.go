// Command egress-snat makes outgoing connections of a multi-address Linux
// host leave with the source address the operator chooses.
package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"runtime/pprof"
)

func main() {
	// A run lives for a fraction of a second and allocates little that
	// outlives it; collecting less often saves a fifth of a large apply's
	// CPU. watch, which runs for long, sets its own.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	// But never let that grow the heap past what a large apply holds
	// live: at a million destinations the fivefold headroom was a peak of
	// 1.1 GB. Past the limit the collector runs as often as it must.
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(256 << 20)
	}
	// EGRESS_SNAT_CPUPROFILE=FILE writes a CPU profile of the run, for the
	// benchmark report's "where the time goes" (go tool pprof FILE).
	if path := os.Getenv("EGRESS_SNAT_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				defer func() { pprof.StopCPUProfile(); f.Close() }()
			}
		}
	}
	err := run(os.Args)
	// EGRESS_SNAT_MEMPROFILE=FILE writes the live heap at the end of the
	// run (for watch: when it stops), for the report's memory figures.
	if path := os.Getenv("EGRESS_SNAT_MEMPROFILE"); path != "" {
		if f, ferr := os.Create(path); ferr == nil {
			pprof.WriteHeapProfile(f)
			f.Close()
		}
	}
	if err != nil {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "egress-snat:", msg)
		}
		pprof.StopCPUProfile()
		os.Exit(exitCode(err))
	}
}
