// Command order-service runs the credit-limit saga end to end on the
// transactional outbox, and checks that it ends as it must.
//
// The order service creates each order (PENDING) and its OrderCreated event
// in one transaction. The customer service consumes OrderCreated with
// dedup, reserves the customer's credit if the limit allows, and answers
// CreditReserved or CreditLimitExceeded through its own outbox, in the same
// transaction. The order service consumes the answers, with dedup, and
// approves or rejects the order. One publisher (the real publish loop of
// internal/poller) per outbox moves the events to NATS JetStream.
//
// The demo creates orders that pass and exceed the limit, injects a
// duplicate delivery, prints what happened and exits 1 if it differs from
// what must have happened.
//
// It uses PostgreSQL at DATABASE_URL (default: the local server) and NATS
// at NATS_URL (default: the local server). When no PostgreSQL answers it
// starts a throwaway cluster, if PostgreSQL's server binaries are
// installed; when no NATS with JetStream answers it starts one in process.
// Every schema, stream and server it creates is removed at the end.
//
// Usage:
//
//	go run ./examples/order-service [--timeout 30s] [--database-url URL] [--nats-url URL]
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Exit codes.
const (
	exitFailed = 1 // the demo could not run, or the saga ended wrongly
	exitUsage  = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.As(err, new(usageError)):
		fmt.Fprintln(os.Stderr, "order-service:", err)
		os.Exit(exitUsage)
	default:
		fmt.Fprintln(os.Stderr, "order-service:", err)
		os.Exit(exitFailed)
	}
}

// usageError is an invalid command line.
type usageError struct{ error }

// run runs the demo with the command-line arguments args (without the
// program name), printing progress and the report to stdout and warnings
// to stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("order-service", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the saga to finish")
	databaseURL := fs.String("database-url", cmp.Or(os.Getenv("DATABASE_URL"), defaultDatabaseURL),
		"PostgreSQL URL (env DATABASE_URL); when none answers there, a throwaway cluster is started if initdb and pg_ctl are installed")
	natsURL := fs.String("nats-url", cmp.Or(os.Getenv("NATS_URL"), defaultNATSURL),
		"NATS URL (env NATS_URL); when no JetStream answers there, an in-process server is started")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected arguments: %q", fs.Args())}
	}
	if *timeout <= 0 {
		return usageError{fmt.Errorf("--timeout must be positive, got %s", *timeout)}
	}

	pg, err := openPostgres(ctx, *databaseURL, binSearch{Path: os.Getenv("PATH"), Globs: postgresBinGlobs}, stdout)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, pg.Close(stdout)) }()
	nb, err := connectNATS(ctx, *natsURL, stdout)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, nb.Close()) }()
	fmt.Fprintf(stdout, "using PostgreSQL %s and NATS %s\n", pg.About, nb.About)

	return runSaga(ctx, sagaConfig{DSN: pg.DSN, NATS: nb.Conn, Timeout: *timeout, Out: stdout, Stderr: stderr}, creditLimitSaga())
}
