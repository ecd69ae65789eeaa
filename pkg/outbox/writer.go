// Package outbox writes events into the outbox table inside the caller's
// own database transaction, so an event exists if and only if the business
// change it describes committed. A separate publisher process (cmd/publisher)
// moves the events to NATS JetStream.
//
// Events of one entity (EntityType, EntityID) are published in the order
// they were written. That order is taken at INSERT time, so two transactions
// that write events for the same entity must be serialised by the service,
// as any correct update of an aggregate is: lock the aggregate's row
// (SELECT ... FOR UPDATE) before writing its events.
package outbox

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"reflect"

	"github.com/google/uuid"
	"github.com/lib/pq"
	"go.opentelemetry.io/otel/propagation"

	"github.com/pgnats/outbox/internal/wire"
	"github.com/pgnats/outbox/schema"
)

// DefaultMaxControlLine is the default of Config.MaxControlLine:
// nats-server's default max_control_line, in bytes.
const DefaultMaxControlLine = wire.DefaultMaxControlLine

// DefaultMaxBytes is the default limit on an event's size: its message's
// header block (with every header the publisher adds) plus its payload, as
// the NATS client sends it. NATS's default max_payload of 1 MiB.
const DefaultMaxBytes = wire.DefaultMaxPayload

// Limits on an event's text fields, in bytes. EntityType and EntityID are
// indexed together, and an index entry holds at most 2704 bytes.
const (
	MaxEntityTypeBytes = wire.MaxEntityType
	MaxEntityIDBytes   = wire.MaxEntityID
	MaxTypeBytes       = wire.MaxType
)

// Event is one message to publish. EntityType, EntityID, Type and Data are
// required.
//
// Write accepts an event only if the NATS client and a NATS server with
// default limits will take its message, the same rule the publisher checks
// again before sending: every text valid UTF-8 without NUL, CR or LF; header
// values, EntityType, EntityID and Type neither starting nor ending with a
// space or a tab (the NATS client trims them) and not holding the text
// "Nats-Msg-Id" (nats-server 2.9 would then miss the message id); the
// limits below; and the message, with the headers the publisher adds, within
// Config.MaxBytes, a 64 KiB header block and the server's protocol line
// (Config.MaxControlLine, 4096 bytes by default).
type Event struct {
	// EntityType and EntityID name the aggregate the event belongs to;
	// events of one entity are published in write order. At most
	// MaxEntityTypeBytes and MaxEntityIDBytes.
	EntityType string
	EntityID   string
	// Type is the event's name, such as "OrderCreated". At most
	// MaxTypeBytes.
	Type string
	// Subject is the NATS subject to publish to. Empty means
	// "<EntityType>.<Type>". Dot-separated tokens, none empty, without
	// wildcards, whitespace or control characters, and short enough for
	// the server's protocol line (a little under Config.MaxControlLine:
	// the line also holds a reply subject and two sizes).
	Subject string
	// Data is the payload, stored and published byte for byte: a consumer
	// receives exactly these bytes. For JSON (ContentType empty or a JSON
	// type), json.RawMessage and []byte are kept as they are and must be
	// valid JSON; any other value is marshalled with encoding/json. For any
	// other content type Data must be []byte, and is not looked into.
	Data any
	// ContentType is the payload's media type, such as
	// "application/protobuf" or "application/avro". Empty means JSON, and
	// no header is added; otherwise the event carries it in a
	// "Content-Type" header (HeaderContentType). A Content-Type entry in
	// Headers counts the same (in any case, but only one); the two must not
	// disagree.
	ContentType string
	// Headers are extra NATS headers. Names are printable ASCII without
	// spaces or any of "()/,:;<=>?@[\]{} (the NATS client refuses them);
	// names starting with "Nats-" or "Outbox-" are reserved. Values lose
	// leading and trailing spaces and tabs on the way, as the NATS client
	// trims them. Write adds the trace context of its ctx (see
	// Config.Propagator) unless Headers already holds one.
	Headers map[string]string
}

// Execer is what Write needs from a transaction: *sql.Tx and *sqlx.Tx
// satisfy it. Write refuses a value that is not a transaction (one without
// Commit and Rollback methods, such as *sql.DB, *sqlx.DB or *sql.Conn):
// events written outside the caller's transaction would not be tied to its
// business change.
type Execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// transaction is how Write tells a transaction from a pool or a connection.
type transaction interface {
	Commit() error
	Rollback() error
}

// checkTx reports why tx is not a transaction Write can use.
func checkTx(tx Execer) error {
	const pass = "pass the *sql.Tx or *sqlx.Tx that makes the business change"
	if tx == nil {
		return errors.New("outbox: Write needs a transaction, got nil: " + pass)
	}
	if v := reflect.ValueOf(tx); v.Kind() == reflect.Pointer && v.IsNil() {
		return fmt.Errorf("outbox: Write needs a transaction, got a nil %T: %s", tx, pass)
	}
	if _, ok := tx.(transaction); !ok {
		return fmt.Errorf("outbox: Write needs a transaction, got %T, which would write the events outside one: %s", tx, pass)
	}
	return nil
}

// Config configures a Writer. The zero value uses every default.
type Config struct {
	// Table is the events table, optionally schema-qualified.
	// Default "events".
	Table string
	// MaxBytes bounds an event's message as the NATS client sends it:
	// payload plus header block, counting every header the publisher adds
	// at its longest. Default DefaultMaxBytes; keep it at or under the NATS
	// server's max_payload and the stream's max_msg_size.
	MaxBytes int
	// MaxControlLine is the NATS server's max_control_line, in bytes: the
	// longest protocol line it accepts, which holds the subject. A message
	// whose line is longer makes the server close the connection, and the
	// server's INFO does not announce the limit, so set it to the server's
	// value when that is lower than the default; the publisher's
	// --nats-max-control-line must say the same. Default
	// DefaultMaxControlLine (4096).
	MaxControlLine int
	// NewID makes event ids. Default uuid.NewV7 (time-ordered).
	NewID func() (uuid.UUID, error)
	// Propagator injects the trace context of Write's ctx into each
	// event's headers ("traceparent" and "tracestate" with
	// propagation.TraceContext), unless the event already carries a header
	// the propagator owns. Default: otel.GetTextMapPropagator(), read on
	// each Write, which adds nothing until the application sets one (for
	// example otel.SetTextMapPropagator(propagation.TraceContext{})).
	Propagator propagation.TextMapPropagator
}

// Writer inserts events. It holds no connection and is safe for concurrent
// use.
type Writer struct {
	table    schema.Name
	maxBytes int
	maxLine  int
	newID    func() (uuid.UUID, error)
	prop     propagation.TextMapPropagator // nil: the global one
	insert   string
}

// NewWriter returns a Writer for cfg, or an error naming the invalid
// setting.
func NewWriter(cfg Config) (*Writer, error) {
	table, err := schema.ParseName(cmp.Or(cfg.Table, schema.DefaultEvents))
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	if cfg.MaxBytes < 0 {
		return nil, fmt.Errorf("outbox: MaxBytes must not be negative, got %d", cfg.MaxBytes)
	}
	if cfg.MaxControlLine < 0 {
		return nil, fmt.Errorf("outbox: MaxControlLine must not be negative, got %d", cfg.MaxControlLine)
	}
	newID := cfg.NewID
	if newID == nil {
		newID = uuid.NewV7
	}
	return &Writer{
		table:    table,
		maxBytes: cmp.Or(cfg.MaxBytes, DefaultMaxBytes),
		maxLine:  cmp.Or(cfg.MaxControlLine, DefaultMaxControlLine),
		newID:    newID,
		prop:     cfg.Propagator,
		insert: `INSERT INTO ` + table.Quoted() + `
			(event_id, event_target, event_type, entity_type, entity_id, event_data, headers)
			SELECT id, target, typ, etype, eid, data, hdrs::jsonb
			FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[])
				WITH ORDINALITY AS e(id, target, typ, etype, eid, data, hdrs, ord)
			ORDER BY ord`,
	}, nil
}

// Write validates every event, then inserts them all with one statement in
// tx and returns their ids in the order given. If any event is invalid it
// returns an error matching ErrInvalidEvent (a *ValidationError) before any
// SQL runs, so tx is still usable. tx must be the caller's transaction: a
// nil one, or a value that is not a transaction (see Execer), is refused,
// also before any SQL. Events are published in the order given.
// The trace context of ctx is added to each event's headers (see
// Config.Propagator), so consumers can continue the trace.
func (w *Writer) Write(ctx context.Context, tx Execer, events ...Event) ([]uuid.UUID, error) {
	if len(events) == 0 {
		return nil, nil
	}
	n := len(events)
	ids := make([]uuid.UUID, n)
	var (
		idText  = make([]string, n)
		targets = make([]string, n)
		types   = make([]string, n)
		etypes  = make([]string, n)
		eids    = make([]string, n)
		data    = make([][]byte, n)
		headers = make([]string, n)
	)
	trace := w.traceOf(ctx)
	for i, ev := range events {
		ev.Headers = trace.apply(ev.Headers)
		ev, err := withContentType(i, ev)
		if err != nil {
			return nil, err
		}
		p, err := w.prepare(i, ev)
		if err != nil {
			return nil, err
		}
		id, err := w.newID()
		if err != nil {
			return nil, fmt.Errorf("outbox: new event id: %w", err)
		}
		ids[i], idText[i] = id, id.String()
		targets[i], types[i], etypes[i], eids[i] = p.subject, ev.Type, ev.EntityType, ev.EntityID
		data[i], headers[i] = p.data, string(p.headers)
	}
	if err := checkTx(tx); err != nil {
		return nil, err
	}
	_, err := tx.ExecContext(ctx, w.insert,
		pq.Array(idText), pq.Array(targets), pq.Array(types), pq.Array(etypes),
		pq.Array(eids), pq.ByteaArray(data), pq.Array(headers))
	if err != nil {
		return nil, fmt.Errorf("outbox: insert %d events: %w", n, err)
	}
	return ids, nil
}
