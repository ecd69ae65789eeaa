package outbox_test

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// Write refuses what the NATS client, the NATS server or an index would
// refuse later, with a *ValidationError before any SQL: the caller's
// transaction and its business row survive.
func TestWriteRefusesWhatCannotBePublished(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	_, err := db.Exec(`CREATE TABLE orders (id text PRIMARY KEY)`)
	require.NoError(t, err)
	w := newWriter(t, outbox.Config{})

	randomHex := func(n int) string {
		b := make([]byte, n/2)
		_, _ = rand.Read(b)
		return hex.EncodeToString(b)
	}
	header := func(k, v string) func(*outbox.Event) {
		return func(e *outbox.Event) { e.Headers = map[string]string{k: v} }
	}
	tests := []struct {
		name  string
		edit  func(*outbox.Event)
		field string
	}{
		{"header name with slash", header("x-tenant/id", "1"), "Headers"},
		{"header name with at", header("user@org", "1"), "Headers"},
		{"header name with equals", header("a=b", "1"), "Headers"},
		{"header name with braces", header("{k}", "1"), "Headers"},
		{"header value of 70000 bytes", header("big", strings.Repeat("v", 70_000)), "Headers"},
		{"entity id of 3000 random hex characters", func(e *outbox.Event) { e.EntityID = randomHex(3000) }, "EntityID"},
		{"entity type over its maximum", func(e *outbox.Event) { e.EntityType = strings.Repeat("t", outbox.MaxEntityTypeBytes+1) }, "EntityType"},
		{"type of 1000000 bytes", func(e *outbox.Event) { e.Type = strings.Repeat("T", 1_000_000) }, "Type"},
		{"subject of 5000 bytes", func(e *outbox.Event) { e.Subject = "bh01." + strings.Repeat("a", 5000) }, "Subject"},
		{"JSON string of 1048400 bytes", func(e *outbox.Event) {
			e.Data = json.RawMessage(`"` + strings.Repeat("x", 1_048_400-2) + `"`)
		}, "Data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := "o-" + testenv.Suffix()
			bad := outbox.Event{EntityType: "order", EntityID: id, Type: "OrderCreated", Data: json.RawMessage(`{}`)}
			tt.edit(&bad)
			tx, err := db.BeginTx(ctx, nil)
			require.NoError(t, err)
			defer tx.Rollback() //nolint:errcheck // no-op after commit
			_, err = tx.ExecContext(ctx, `INSERT INTO orders (id) VALUES ($1)`, id)
			require.NoError(t, err)

			ids, err := w.Write(ctx, tx, bad)
			require.ErrorIs(t, err, outbox.ErrInvalidEvent)
			var verr *outbox.ValidationError
			require.ErrorAs(t, err, &verr)
			require.Equal(t, tt.field, verr.Field, verr.Reason)
			require.Less(t, len(verr.Reason), 300, "the reason quotes no huge value")
			require.Nil(t, ids)

			require.NoError(t, tx.Commit(), "the business transaction is still usable")
			var n int
			require.NoError(t, db.QueryRow(`SELECT count(*) FROM orders WHERE id = $1`, id).Scan(&n))
			require.Equal(t, 1, n)
		})
	}
}

// The longest accepted entity fields fit every index of the events table.
func TestWriteStoresLongestEntityFields(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})
	b := make([]byte, outbox.MaxEntityIDBytes/2)
	_, _ = rand.Read(b)
	ev := outbox.Event{EntityType: strings.Repeat("t", outbox.MaxEntityTypeBytes), EntityID: hex.EncodeToString(b),
		Type: strings.Repeat("T", outbox.MaxTypeBytes), Subject: "a.b", Data: json.RawMessage(`{}`)}
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	_, err = w.Write(ctx, tx, ev)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	require.Equal(t, 1, countEvents(t, db, "events"))
}

// Write refuses anything that is not a transaction, and a nil one of any
// type, before any SQL, saying what to pass.
func TestWriteRefusesNonTransaction(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})
	conn, err := db.DB.DB.Conn(ctx)
	require.NoError(t, err)
	defer conn.Close()

	for _, tt := range []struct {
		name string
		tx   outbox.Execer
	}{
		{"sql.DB", db.DB.DB},
		{"sqlx.DB", db.DB},
		{"sql.Conn", conn},
		{"nil sql.Tx", (*sql.Tx)(nil)},
		{"nil sqlx.Tx", (*sqlx.Tx)(nil)},
		{"nil", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var (
				ids any
				err error
			)
			require.NotPanics(t, func() { ids, err = w.Write(ctx, tt.tx, validEvent()) })
			require.ErrorContains(t, err, "pass the *sql.Tx or *sqlx.Tx")
			require.NotErrorIs(t, err, outbox.ErrInvalidEvent)
			require.Nil(t, ids)
			require.Zero(t, countEvents(t, db, "events"), "nothing written")
		})
	}
}
