package main

import (
	"runtime"
	"runtime/debug"
	"strings"
)

// moduleVersions reports the versions of Watermill's modules, the NATS and
// PostgreSQL clients and Go that this binary was built with.
func moduleVersions() map[string]string {
	out := map[string]string{"go": runtime.Version()}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return out
	}
	for _, d := range info.Deps {
		if strings.HasPrefix(d.Path, "github.com/ThreeDotsLabs/") ||
			d.Path == "github.com/nats-io/nats.go" || d.Path == "github.com/lib/pq" {
			out[d.Path] = d.Version
		}
	}
	return out
}
