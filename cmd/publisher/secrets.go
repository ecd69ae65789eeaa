package main

import (
	"os"
	"strings"

	"github.com/pgnats/outbox/internal/redact"
)

// secretScrubber returns a Scrubber for every connection string and
// secret that args or the environment can give a command: database and
// NATS URLs, the NATS password and token. The commands redact what they
// print themselves; this catches what they pass on from libraries (a
// driver error quoting the DSN, a log record of the poller).
func secretScrubber(args []string) *redact.Scrubber {
	// The values the command will use: a flag given wins over the
	// environment, where the first non-empty variable wins. Only those
	// are secrets of this run; scrubbing others (a DATABASE_URL the flag
	// overrides) would only garble the output.
	values := func(flag string, env ...string) []string {
		if vs := flagValues(args, flag); len(vs) > 0 {
			return vs
		}
		for _, e := range append([]string{envName(flag)}, env...) {
			if v := os.Getenv(e); v != "" {
				return []string{v}
			}
		}
		return nil
	}
	return redact.NewScrubber(
		values("database-url", "DATABASE_URL"),
		values("nats-url", "NATS_URL"),
		append(append(values("nats-password"), values("nats-token")...),
			append(values("console-password"), values("console-token")...)...))
}

// flagValues returns the values given to flag in args, in the forms the
// flag package accepts: -flag value, -flag=value, and the same with two
// dashes. It reads every argument, since it runs before parsing.
func flagValues(args []string, flag string) []string {
	var vs []string
	for i, a := range args {
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != flag {
			continue
		}
		switch {
		case hasValue:
			vs = append(vs, value)
		case i+1 < len(args):
			vs = append(vs, args[i+1])
		}
	}
	return vs
}
