package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/egress-snat/egress-snat/config"
)

var healthFileFlag = &cli.StringFlag{Name: "health-file", TakesFile: true,
	Usage: "keep `FILE` for probes (egress-snat health): its time is the last turn of the loop, its first line \"ready\" when the last reconcile succeeded"}

var healthCommand = &cli.Command{
	Name:      "health",
	Usage:     "tell whether a watch is alive, or ready, from its --health-file (for liveness and readiness probes)",
	UsageText: "egress-snat health --file FILE [--max-age 30s] [--ready]",
	Description: `Reads the file a "watch --health-file FILE" keeps, and exits 0 when the
watch is alive: the file exists and its loop turned within --max-age (it
turns every --resync, half a second by default, and while it applies). With
--ready it also wants the last reconcile to have succeeded. It exits 1
otherwise, saying why, and 2 on bad input. It reads nothing else: no root
needed, no process started.

Alive is not in sync: drift that watch repairs, or a rule left out while its
source address is missing, keeps a watch alive and ready. So a liveness probe
restarts only a watch whose loop is stuck, and a readiness probe reports a
watch that cannot apply (the kernel refuses, the lock stays taken).

Examples (deploy/kubernetes/daemonset.yaml):
   egress-snat watch -f /etc/egress-snat/egress-snat.yaml --health-file /tmp/egress-snat.health
   egress-snat health --file /tmp/egress-snat.health --max-age 30s            # liveness
   egress-snat health --file /tmp/egress-snat.health --max-age 30s --ready    # readiness`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "file", Aliases: []string{"f"}, TakesFile: true, Usage: "(required) the `FILE` of watch --health-file"},
		&cli.DurationFlag{Name: "max-age", Value: 30 * time.Second, Usage: "how recently (`DURATION`) the loop must have turned"},
		&cli.BoolFlag{Name: "ready", Usage: "also want the last reconcile to have succeeded"},
	},
	Action: func(c *cli.Context) error {
		if err := required(c, "file"); err != nil {
			return err
		}
		path := c.String("file")
		maxAge, err := positiveDuration(c, "max-age")
		if err != nil {
			return err
		}
		st, err := os.Stat(path)
		if errors.Is(err, fs.ErrNotExist) {
			return cli.Exit(fmt.Sprintf("not alive: no %s (watch has not finished its first reconcile, or runs without --health-file %s)", path, path), exitFailure)
		}
		if err != nil {
			return cli.Exit(err.Error(), exitFailure)
		}
		if age := time.Since(st.ModTime()); age > maxAge {
			return cli.Exit(fmt.Sprintf("not alive: the loop of the watch keeping %s last turned %s ago (--max-age %s)", path, age.Round(time.Second), maxAge), exitFailure)
		}
		f, err := config.OpenBounded(path, 64<<10)
		if err != nil {
			return cli.Exit(err.Error(), exitFailure)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Scan()
		status := strings.TrimSpace(sc.Text())
		if c.Bool("ready") && status != "ready" {
			return cli.Exit(fmt.Sprintf("alive, %s (%s)", status, filepath.Base(path)), exitFailure)
		}
		fmt.Fprintf(c.App.Writer, "alive, %s\n", status)
		return nil
	},
}
