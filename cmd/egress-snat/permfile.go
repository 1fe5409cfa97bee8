package main

import (
	"errors"
	"io/fs"
	"os"

	"github.com/urfave/cli/v2"
)

// watchPath is the file watch follows: -f, else the permanent file, which
// must exist then (the boot unit only starts when it does).
func watchPath(c *cli.Context) (string, error) {
	if p := c.String("file"); p != "" {
		return p, nil
	}
	path := configPath(c)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return "", usageError("watch: no -f, and the permanent file %s does not exist (make it with egress-snat save, or a set --permanent)", path)
	}
	return path, nil
}

// checkFile is the file check compares with: -f, else the permanent file
// when it exists. Without either it says plainly what it cannot see.
func checkFile(c *cli.Context) (string, error) {
	if p := c.String("file"); p != "" {
		return p, nil
	}
	path, err := permanentFile(c)
	if err == nil && path == "" {
		c.App.ErrWriter.Write([]byte("note: no permanent file " + configPath(c) + ": checking only the rules installed now, so rules that were flushed away (a firewall reload) cannot be seen; make one with egress-snat save\n"))
	}
	return path, err
}
