// Command egress-snat makes outgoing connections of a multi-address Linux
// host leave with the source address the operator chooses.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := run(os.Args); err != nil {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "egress-snat:", msg)
		}
		os.Exit(exitCode(err))
	}
}
