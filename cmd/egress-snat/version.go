package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/urfave/cli/v2"
)

// version is set by the Makefile from git describe (-X main.version=...).
// A plain `go build` leaves "dev"; `go install ...@v1.2.3` records the
// module version in the build info, which versionString falls back to.

func init() { cli.VersionPrinter = printVersion }

// printVersion is what --version prints: the tool's version and the Go
// that built it, the two things a bug report needs.
func printVersion(c *cli.Context) {
	fmt.Fprintf(c.App.Writer, "%s %s (%s, %s/%s)\n", c.App.Name, versionString(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func versionString() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}
