package main

import (
	"context"
	"database/sql"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/schema"
)

// processedRetention holds the flags of the processed_message retention
// chore of `publisher run`.
type processedRetention struct {
	retention time.Duration
	table     string
}

func (o *processedRetention) register(c *command) {
	c.Duration(&o.retention, "processed-retention", 0,
		"delete processed_message rows (pkg/dedup's records) older than this, on --retention-schedule (0: keep them); at least the max_age of the streams of recent events")
	c.String(&o.table, "processed-table", schema.DefaultProcessed, "with --processed-retention: table pkg/dedup records handled messages in")
}

func (o *processedRetention) validate() error {
	if o.retention < 0 {
		return usagef("run: --processed-retention must not be negative")
	}
	if o.retention > 0 {
		if _, err := schema.ParseName(o.table); err != nil {
			return usagef("run: --processed-table %q: %v", o.table, err)
		}
	}
	return nil
}

// check refuses, as a usage error, a --processed-retention shorter than
// the max_age of a stream holding the subjects of recent events. When the
// streams cannot be asked it only warns: an unreachable broker must not
// keep the publisher from starting.
func (o *processedRetention) check(ctx context.Context, db *sql.DB, js jetstream.JetStream, table string, log *slog.Logger) error {
	if o.retention <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	streams, err := poller.RecentStreams(ctx, db, js, table)
	if err != nil {
		log.Warn("could not check --processed-retention against the streams' max_age", "err", err)
		return nil
	}
	for _, s := range streams {
		err := poller.CheckProcessedRetention(o.retention, s)
		if err == nil {
			continue
		}
		fix := "set --processed-retention to at least " + s.MaxAge.String() + ", or to 0 to keep processed_message rows"
		if s.MaxAge <= 0 {
			fix = "set --processed-retention 0 to keep processed_message rows, or give stream " + s.Name + " a max_age and set --processed-retention to at least that"
		}
		return usagef("run: --processed-retention %s: %v; a message delivered again after its processed_message row is deleted would be processed twice; %s",
			o.retention, err, fix)
	}
	return nil
}
