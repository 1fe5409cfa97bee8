// Command egress-snat makes outgoing connections of a multi-address Linux
// host leave with the source address the operator chooses.
package main

import (
	"fmt"
	"os"
	"runtime/debug"
)

func main() {
	// A run lives for a fraction of a second and allocates little that
	// outlives it; collecting less often saves a fifth of a large apply's
	// CPU. watch, which runs for long, sets its own.
	debug.SetGCPercent(400)
	if err := run(os.Args); err != nil {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "egress-snat:", msg)
		}
		os.Exit(exitCode(err))
	}
}
