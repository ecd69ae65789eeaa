package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wmsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	_ "github.com/lib/pq"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// bench holds one run's connections and the names of its scratch tables
// and stream, all unique to the run so that runs never meet.
type bench struct {
	cfg     config
	db      *sql.DB
	nc      *nats.Conn
	js      jetstream.JetStream
	topic   string // watermill-sql topic, the forwarder's topic
	subject string // destination subject of every event
	stream  string
	schema  wmsql.DefaultPostgreSQLSchema
	offsets wmsql.DefaultPostgreSQLOffsetsAdapter
	sub     *wmsql.Subscriber
}

func setup(ctx context.Context, cfg config) (b *bench, err error) {
	id := make([]byte, 4)
	_, _ = rand.Read(id)
	suffix := hex.EncodeToString(id)
	b = &bench{
		cfg:     cfg,
		topic:   "outbox_bench_" + suffix,
		subject: "wmbench." + suffix + ".drain",
		stream:  "WMBENCH_" + suffix,
		schema: wmsql.DefaultPostgreSQLSchema{
			SubscribeBatchSize: cfg.Batch,
		},
	}
	defer func() {
		if err != nil {
			b.cleanup()
		}
	}()

	if b.db, err = sql.Open("postgres", cfg.DatabaseURL); err != nil {
		return b, err
	}
	if err = b.db.PingContext(ctx); err != nil {
		return b, fmt.Errorf("PostgreSQL is unreachable (set --database-url or DATABASE_URL): %w", err)
	}
	if b.nc, err = nats.Connect(cfg.NATSURL); err != nil {
		return b, fmt.Errorf("NATS is unreachable at %s (set --nats-url or NATS_URL): %w", cfg.NATSURL, err)
	}
	if b.js, err = jetstream.New(b.nc); err != nil {
		return b, err
	}
	// The same stream as `publisher bench` drains into.
	if _, err = b.js.CreateStream(ctx, jetstream.StreamConfig{
		Name: b.stream, Subjects: []string{"wmbench." + suffix + ".>"},
		Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
	}); err != nil {
		return b, fmt.Errorf("create stream: %w", err)
	}

	b.sub, err = wmsql.NewSubscriber(wmsql.BeginnerFromStdSQL(b.db), wmsql.SubscriberConfig{
		SchemaAdapter:  b.schema,
		OffsetsAdapter: b.offsets,
		PollInterval:   cfg.Poll,
	}, watermill.NopLogger{})
	if err != nil {
		return b, fmt.Errorf("sql subscriber: %w", err)
	}
	if err = b.sub.SubscribeInitialize(b.topic); err != nil {
		return b, fmt.Errorf("create watermill tables: %w", err)
	}
	return b, nil
}

// cleanup drops the run's tables and stream and closes its connections.
func (b *bench) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if b.sub != nil {
		_ = b.sub.Close()
	}
	if b.db != nil {
		for _, table := range []string{b.schema.MessagesTable(b.topic), b.offsets.MessagesOffsetsTable(b.topic)} {
			// The names are Watermill's, built from a topic of hex digits.
			_, _ = b.db.ExecContext(ctx, `DROP TABLE IF EXISTS `+table)
		}
		_ = b.db.Close()
	}
	if b.js != nil {
		_ = b.js.DeleteStream(ctx, b.stream)
	}
	if b.nc != nil {
		b.nc.Close()
	}
}

// streamMessages is how many messages the run's stream holds.
func (b *bench) streamMessages(ctx context.Context) (uint64, error) {
	s, err := b.js.Stream(ctx, b.stream)
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.Msgs, nil
}

func (b *bench) settings() settings {
	return settings{
		WriteEventsPerTx:   b.cfg.WriteTx,
		SubscribeBatchSize: b.cfg.Batch,
		PollInterval:       b.cfg.Poll.String(),
		AckDeadline:        "30s (default)",
		ResendInterval:     "1s (default; only after a nack)",
		PayloadColumn:      "JSON (default)",
		OffsetsAdapter:     "DefaultPostgreSQLOffsetsAdapter",
		NATSPublisher:      "watermill-nats pkg/nats Publisher, JetStream enabled, AutoProvision off",
		TrackMsgID:         b.cfg.TrackMsgID,
		Stream:             "file storage, 2m duplicate window, 1 replica",
		Notes: "components/forwarder with one handler; the SQL subscriber hands the router one message at a time " +
			"and the NATS publisher waits for each PubAck, so there is one JetStream round trip per event. " +
			"SubscribeBatchSize is raised from its default 100 to the project's batch (500): each SELECT sorts the whole " +
			"remaining backlog, so larger batches mean fewer such scans. PollInterval applies only after an empty query.",
	}
}
