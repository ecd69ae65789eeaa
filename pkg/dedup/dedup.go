// Package dedup makes a message consumer idempotent: it records each
// (consumer, message id) pair in the processed_message table in the same
// transaction as the handler's own writes, so a message delivered twice has
// its effect once.
//
// Processor.Process is the core; Processor.Handler adapts it to a NATS
// JetStream consumer that reads the message id from the outbox event id
// header, acks after commit, naks with a delay on error and terminates on a
// permanent error.
package dedup

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strconv"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/pgnats/outbox/schema"
)

// Config configures a Processor. The zero value of each field means its
// default.
type Config struct {
	// Table is the processed-message table, optionally schema-qualified.
	// Default: "processed_message" (schema.DefaultProcessed), resolved
	// through the connection's search_path.
	Table string
	// Logger receives debug records of skipped duplicates, warnings of
	// failed rollbacks and errors, with the stack, of handlers that
	// panicked. Default: discard.
	Logger *slog.Logger
	// Metrics counts processed, duplicate and failed messages and times
	// the handlers, per consumer (see NewMetrics). Default: nil, record
	// nothing.
	Metrics *Metrics
}

// Processor runs message handlers at most once per (consumer, message id).
// It is safe for concurrent use by multiple goroutines.
type Processor struct {
	db      *sqlx.DB
	log     *slog.Logger
	metrics *Metrics
	insert  string
}

// New returns a Processor that records processed messages in cfg.Table
// through db. It returns an error wrapping schema.ErrInvalidName if the
// table name is not a valid identifier. It does not check that the table
// exists: create it with schema.Migrate.
func New(db *sqlx.DB, cfg Config) (*Processor, error) {
	if db == nil {
		return nil, errors.New("nil database")
	}
	name, err := schema.ParseName(cmp.Or(cfg.Table, schema.DefaultProcessed))
	if err != nil {
		return nil, fmt.Errorf("dedup table: %w", err)
	}
	return &Processor{
		db:      db,
		log:     cmp.Or(cfg.Logger, slog.New(slog.DiscardHandler)),
		metrics: cfg.Metrics,
		insert:  `INSERT INTO ` + name.Quoted() + ` (consumer_id, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`,
	}, nil
}

// Result is the outcome of a Process call that returned no error. Its zero
// value is no outcome: the one returned with an error.
type Result int

// Outcomes of Process.
const (
	// Processed means the handler ran and its transaction committed.
	Processed Result = iota + 1
	// Duplicate means the message had already been processed by the
	// consumer; the handler did not run.
	Duplicate
)

// String returns "processed", "duplicate" or "Result(n)".
func (r Result) String() string {
	switch r {
	case Processed:
		return "processed"
	case Duplicate:
		return "duplicate"
	}
	return "Result(" + strconv.Itoa(int(r)) + ")"
}

// Process runs fn once per (consumer, msgID), in a transaction that also
// records the pair, and commits both together.
//
// If the pair is already recorded, Process rolls back without calling fn
// and returns Duplicate. If another transaction holds the pair uncommitted
// (a concurrent delivery of the same message), Process waits for it: when
// it commits this call returns Duplicate, when it rolls back this call
// processes the message. That holds at the READ COMMITTED isolation level,
// PostgreSQL's default; under a stricter default_transaction_isolation the
// waiting call may instead return a serialization error, to be retried.
//
// fn receives the transaction and must do all its database work in it (it
// may write outbox events there); it must not commit or roll it back. If fn
// returns an error, Process rolls back, so neither fn's writes nor the
// record are kept, and returns an error wrapping fn's (errors.Is and
// errors.As see through it) with a zero Result; the message can be
// processed by a later call. An empty consumer or msgID is rejected with a
// *KeyError, and a nil fn with ErrNilHandler, before any SQL runs.
//
// A panic in fn does not escape: Process recovers it, rolls back (so the
// message is neither recorded nor has any effect), logs it at error level
// with the stack to Config.Logger, and returns a *PanicError (matching
// ErrHandlerPanic) with a zero Result. One bad message thus cannot crash
// every consumer instance it is redelivered to.
func (p *Processor) Process(ctx context.Context, consumer, msgID string, fn func(ctx context.Context, tx *sqlx.Tx) error) (Result, error) {
	return p.processLogged(ctx, p.log, consumer, msgID, fn)
}

// processLogged is Process logging to log, which is the Processor's logger
// or the JetStream handler's.
func (p *Processor) processLogged(ctx context.Context, log *slog.Logger, consumer, msgID string, fn func(ctx context.Context, tx *sqlx.Tx) error) (Result, error) {
	start := time.Now()
	res, err := p.process(ctx, log, consumer, msgID, fn)
	p.metrics.observe(consumer, res, err, start)
	return res, err
}

func (p *Processor) process(ctx context.Context, log *slog.Logger, consumer, msgID string, fn func(ctx context.Context, tx *sqlx.Tx) error) (Result, error) {
	if consumer == "" {
		return 0, &KeyError{Field: "consumer"}
	}
	if msgID == "" {
		return 0, &KeyError{Field: "msgID"}
	}
	if fn == nil {
		return 0, ErrNilHandler
	}
	tx, err := p.db.BeginTxx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("begin: %w", err)
	}
	// A no-op after Commit; the connection goes back to the pool on every
	// path.
	defer rollback(tx, log, consumer, msgID)

	res, err := tx.ExecContext(ctx, p.insert, consumer, msgID)
	if err != nil {
		return 0, fmt.Errorf("record message: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("record message: %w", err)
	}
	if n == 0 {
		log.DebugContext(ctx, "duplicate message skipped", "consumer", consumer, "message_id", msgID)
		return Duplicate, nil
	}
	if err := call(ctx, tx, log, consumer, msgID, fn); err != nil {
		return 0, fmt.Errorf("handle message: %w", err)
	}
	// A handler that swallowed an SQL error leaves the transaction aborted;
	// Commit then fails, so the message is not reported processed.
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("commit: %w", err)
	}
	return Processed, nil
}

// call runs fn and turns a panic in it into a *PanicError, logged with the
// stack of the goroutine that panicked.
func call(ctx context.Context, tx *sqlx.Tx, log *slog.Logger, consumer, msgID string, fn func(ctx context.Context, tx *sqlx.Tx) error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			pe := &PanicError{Value: v, Stack: debug.Stack()}
			log.ErrorContext(ctx, "message handler panicked; rolled back", "consumer", consumer, "message_id", msgID,
				"panic", fmt.Sprint(v), "stack", string(pe.Stack))
			err = pe
		}
	}()
	return fn(ctx, tx)
}

func rollback(tx *sqlx.Tx, log *slog.Logger, consumer, msgID string) {
	// ErrTxDone: already committed, or rolled back by a cancelled context.
	if err := tx.Rollback(); err != nil && !errors.Is(err, sql.ErrTxDone) {
		log.Warn("dedup rollback failed", "consumer", consumer, "message_id", msgID, "error", err)
	}
}
