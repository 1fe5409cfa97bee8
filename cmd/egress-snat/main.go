// Command egress-snat makes outgoing connections of a multi-address Linux
// host leave with the source address the operator chooses.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "egress-snat:", err)
		os.Exit(exitCode(err))
	}
}
