// Command watermill measures Watermill's SQL-to-JetStream forwarder on the
// same workload as `publisher bench`'s drain: a backlog of events written
// through watermill-sql's publisher (wrapped by the forwarder's envelope
// publisher, as a service using Watermill's outbox would), then timed while
// the forwarder (watermill-sql subscriber with the PostgreSQL offsets
// adapter, watermill-nats JetStream publisher) moves it to a stream.
//
// It lives in its own module so that the project's module never depends on
// Watermill. It prints one JSON object and removes its tables and stream.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "watermill bench:", err)
		}
		os.Exit(1)
	}
}

// config is the workload and the forwarder's settings.
type config struct {
	DatabaseURL string
	NATSURL     string
	Events      int
	Payload     int
	Entities    int
	WriteTx     int           // events per write transaction
	Batch       int           // watermill-sql SubscribeBatchSize
	Poll        time.Duration // watermill-sql PollInterval (used only when a query finds nothing)
	TrackMsgID  bool          // Nats-Msg-Id = message UUID, as the project's publisher sends
	Timeout     time.Duration
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("watermill", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.DatabaseURL, "database-url",
		envOr("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"), "PostgreSQL URL [$DATABASE_URL]")
	fs.StringVar(&c.NATSURL, "nats-url", envOr("NATS_URL", "nats://127.0.0.1:4222"), "NATS URL [$NATS_URL]")
	fs.IntVar(&c.Events, "events", 50000, "backlog size")
	fs.IntVar(&c.Payload, "payload", 256, "payload bytes per event")
	fs.IntVar(&c.Entities, "entities", 1000, "entities the backlog spreads over (message metadata)")
	fs.IntVar(&c.WriteTx, "write-tx", 100, "events per write transaction (the write is not timed)")
	fs.IntVar(&c.Batch, "batch", 500, "watermill-sql SubscribeBatchSize: its default is 100; 500 is the batch publisher bench drains with")
	fs.DurationVar(&c.Poll, "poll", 10*time.Millisecond, "watermill-sql PollInterval: the wait after a query that found nothing (its default is 1s)")
	fs.BoolVar(&c.TrackMsgID, "track-msg-id", true, "watermill-nats TrackMsgId: send Nats-Msg-Id for JetStream de-duplication")
	fs.DurationVar(&c.Timeout, "timeout", 10*time.Minute, "give up when the forwarder has not delivered the backlog by then")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if c.Events < 1 || c.Payload < 2 || c.Entities < 1 || c.WriteTx < 1 || c.Batch < 1 || c.Poll <= 0 {
		return c, errors.New("--events, --entities, --write-tx and --batch must be positive, --payload at least 2, --poll above zero")
	}
	// watermill-sql writes one multi-row INSERT per Publish call, three
	// parameters a row, and PostgreSQL allows 65,535 parameters.
	c.WriteTx = min(c.WriteTx, 20000)
	return c, nil
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// result is the JSON the command prints.
type result struct {
	EventsPerSec   float64           `json:"events_per_sec"`
	Events         int               `json:"events"`
	PayloadBytes   int               `json:"payload_bytes"`
	Entities       int               `json:"entities"`
	Seconds        float64           `json:"seconds"`
	StreamMessages uint64            `json:"stream_messages"`
	WriteSeconds   float64           `json:"write_seconds"`
	Versions       map[string]string `json:"versions"`
	Settings       settings          `json:"settings"`
}

type settings struct {
	WriteEventsPerTx   int    `json:"write_events_per_tx"`
	SubscribeBatchSize int    `json:"subscribe_batch_size"`
	PollInterval       string `json:"poll_interval"`
	AckDeadline        string `json:"ack_deadline"`
	ResendInterval     string `json:"resend_interval"`
	PayloadColumn      string `json:"payload_column"`
	OffsetsAdapter     string `json:"offsets_adapter"`
	NATSPublisher      string `json:"nats_publisher"`
	TrackMsgID         bool   `json:"track_msg_id"`
	Stream             string `json:"stream"`
	Notes              string `json:"notes"`
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	b, err := setup(ctx, cfg)
	if err != nil {
		return err
	}
	defer b.cleanup()

	writeStart := time.Now()
	if err := b.writeBacklog(ctx); err != nil {
		return err
	}
	writeSecs := time.Since(writeStart).Seconds()

	elapsed, err := b.forward(ctx)
	if err != nil {
		return err
	}
	inStream, err := b.streamMessages(ctx)
	if err != nil {
		return err
	}
	if inStream != uint64(cfg.Events) {
		return fmt.Errorf("stream holds %d messages, want %d", inStream, cfg.Events)
	}

	res := result{
		EventsPerSec:   float64(cfg.Events) / elapsed.Seconds(),
		Events:         cfg.Events,
		PayloadBytes:   cfg.Payload,
		Entities:       cfg.Entities,
		Seconds:        elapsed.Seconds(),
		StreamMessages: inStream,
		WriteSeconds:   writeSecs,
		Versions:       moduleVersions(),
		Settings:       b.settings(),
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(res)
}
