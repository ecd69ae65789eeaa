package main

import (
	"context"
	"fmt"
	"io"
	"runtime/debug"
)

func runVersion(_ context.Context, args []string, stdout, _ io.Writer) error {
	c := newCommand("version", "", "Print the publisher's version and the Go version it was built with.")
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	version, goVersion := "(devel)", "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVersion = bi.GoVersion
		if bi.Main.Version != "" {
			version = bi.Main.Version
		}
	}
	fmt.Fprintf(stdout, "publisher %s (%s)\n", version, goVersion)
	return nil
}
