// Command publisher moves events from the outbox table in PostgreSQL to NATS
// JetStream, and manages that table.
//
//	publisher [run] [flags]   publish READY events (the default)
//	publisher migrate         create or upgrade the tables
//	publisher status          counts, backlog, blocked entities, FAILED rows
//	publisher requeue         put FAILED events back to READY
//	publisher replay          publish SUCCESS events again
//	publisher pause           stop every publisher of the table claiming
//	publisher resume          let them claim again
//	publisher bench           measure throughput and latency here
//	publisher version         print the version
//
// Exit status: 0 on a clean stop, 2 on a usage error, 1 on any other error.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil, errors.Is(err, errHelp):
		os.Exit(0)
	case errors.As(err, new(usageError)):
		fmt.Fprintln(os.Stderr, "publisher:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "publisher:", err)
		os.Exit(1)
	}
}

type subcommand struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func subcommands() map[string]subcommand {
	return map[string]subcommand{
		"run":     {"publish READY events to NATS JetStream (the default)", runPublisher},
		"migrate": {"create or upgrade the outbox tables (--print shows the SQL)", runMigrate},
		"status":  {"show counts, backlog, blocked entities and FAILED events", runStatus},
		"requeue": {"put FAILED events back to READY", runRequeue},
		"replay":  {"publish SUCCESS events again, by entity, seq or time range", runReplay},
		"pause":   {"pause publishing: every publisher stops claiming, events stay READY", runPause},
		"resume":  {"resume publishing after pause", runResume},
		"bench":   {"measure throughput and latency on this machine", runBench},
		"version": {"print the version", runVersion},
	}
}

var order = []string{"run", "migrate", "status", "requeue", "replay", "pause", "resume", "bench", "version"}

// run dispatches to a subcommand; with no subcommand (or only flags) it runs
// the publisher.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmds := subcommands()
	name := "run"
	if len(args) > 0 {
		switch {
		case args[0] == "help" || args[0] == "-h" || args[0] == "-help" || args[0] == "--help":
			printUsage(stdout)
			return errHelp
		case !strings.HasPrefix(args[0], "-"):
			name, args = args[0], args[1:]
		}
	}
	c, ok := cmds[name]
	if !ok {
		printUsage(stderr)
		return usagef("unknown command %q", name)
	}
	// Secrets are kept out of all the command writes to stderr (its logs)
	// and of the error main prints.
	scrub := secretScrubber(args)
	return scrub.Error(c.run(ctx, args, stdout, scrub.Writer(stderr)))
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, `publisher moves events from a PostgreSQL outbox table to NATS JetStream.

Usage: publisher <command> [flags]

Commands:`)
	cmds := subcommands()
	for _, n := range order {
		fmt.Fprintf(w, "  %-8s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintln(w, `
Every flag can also be set by an environment variable: OUTBOX_<FLAG> with
dashes as underscores (--batch-size is OUTBOX_BATCH_SIZE); DATABASE_URL and
NATS_URL are accepted too. 'publisher <command> --help' lists a command's
flags. Exit status: 0 clean stop, 2 usage error, 1 runtime error.`)
}
