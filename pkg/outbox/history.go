package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
)

// Status is an event's publication state.
type Status string

// Event states. READY events wait for the publisher; SUCCESS events were
// acknowledged by JetStream; FAILED events were refused for good and wait
// for an operator (publisher requeue).
const (
	StatusReady   Status = "READY"
	StatusSuccess Status = "SUCCESS"
	StatusFailed  Status = "FAILED"
)

// Record is a stored event as History returns it.
type Record struct {
	ID          uuid.UUID
	Seq         int64
	Subject     string
	Type        string
	EntityType  string
	EntityID    string
	Data        []byte // exactly as written
	ContentType string // Event.ContentType; empty for JSON
	Headers     map[string]string
	Status      Status
	Attempts    int
	LastError   string // empty unless a publish attempt failed
	CreatedAt   time.Time
	PublishedAt *time.Time // nil until published
}

// Queryer is what History needs: *sql.DB, *sql.Tx, *sqlx.DB and *sqlx.Tx
// satisfy it.
type Queryer interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

var defaultWriter, _ = NewWriter(Config{})

// History returns the events of one entity from the default "events" table
// in seq order: the outbox doubles as the entity's audit log.
func History(ctx context.Context, q Queryer, entityType, entityID string) ([]Record, error) {
	return defaultWriter.History(ctx, q, entityType, entityID)
}

// History returns the events of one entity from w's table in seq order.
func (w *Writer) History(ctx context.Context, q Queryer, entityType, entityID string) ([]Record, error) {
	rows, err := q.QueryContext(ctx, `SELECT event_id, seq, event_target, event_type, entity_type, entity_id,
			event_data, headers, event_status, attempts, coalesce(last_error, ''), created_at, published_at
		FROM `+w.table.Quoted()+`
		WHERE entity_type = $1 AND entity_id = $2
		ORDER BY seq`, entityType, entityID)
	if err != nil {
		return nil, fmt.Errorf("outbox: read history: %w", err)
	}
	defer rows.Close()
	var out []Record
	for rows.Next() {
		var (
			r       Record
			headers []byte
		)
		if err := rows.Scan(&r.ID, &r.Seq, &r.Subject, &r.Type, &r.EntityType, &r.EntityID,
			&r.Data, &headers, &r.Status, &r.Attempts, &r.LastError, &r.CreatedAt, &r.PublishedAt); err != nil {
			return nil, fmt.Errorf("outbox: read history: %w", err)
		}
		if err := json.Unmarshal(headers, &r.Headers); err != nil {
			return nil, fmt.Errorf("outbox: read history: headers of %s: %w", r.ID, err)
		}
		for k, v := range r.Headers {
			if strings.EqualFold(k, HeaderContentType) {
				r.ContentType = v
			}
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("outbox: read history: %w", err)
	}
	return out, nil
}
