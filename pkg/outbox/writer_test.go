package outbox_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
	"github.com/pgnats/outbox/schema"
)

// storedEvent is a row of the events table.
type storedEvent struct {
	ID          uuid.UUID      `db:"event_id"`
	Seq         int64          `db:"seq"`
	Subject     string         `db:"event_target"`
	Type        string         `db:"event_type"`
	EntityType  string         `db:"entity_type"`
	EntityID    string         `db:"entity_id"`
	Data        string         `db:"event_data"`
	Headers     string         `db:"headers"`
	Status      string         `db:"event_status"`
	Attempts    int            `db:"attempts"`
	LastError   sql.NullString `db:"last_error"`
	AvailableAt time.Time      `db:"available_at"`
	CreatedAt   time.Time      `db:"created_at"`
	PublishedAt sql.NullTime   `db:"published_at"`
}

// storedEvents reads every row of table in seq order.
func storedEvents(t *testing.T, q sqlx.Queryer, table string) []storedEvent {
	t.Helper()
	var rows []storedEvent
	require.NoError(t, sqlx.Select(q, &rows, `SELECT * FROM `+table+` ORDER BY seq`))
	return rows
}

// queryRower is *sql.DB, *sql.Tx, *sqlx.DB or *sqlx.Tx.
type queryRower interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func countEvents(t *testing.T, q queryRower, table string) int {
	t.Helper()
	var n int
	require.NoError(t, q.QueryRowContext(context.Background(), `SELECT count(*) FROM `+table).Scan(&n))
	return n
}

func newWriter(t *testing.T, cfg outbox.Config) *outbox.Writer {
	t.Helper()
	w, err := outbox.NewWriter(cfg)
	require.NoError(t, err)
	return w
}

func TestWriteStoresEventsInOrder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})

	events := []outbox.Event{
		{EntityType: "order", EntityID: "o-2", Type: "OrderCreated", Data: map[string]int{"total": 2},
			Headers: map[string]string{"traceparent": "00-abc-01", "X-Tenant": "acme corp"}},
		{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: json.RawMessage(`{"total": 1}`)},
		{EntityType: "order", EntityID: "o-2", Type: "OrderPaid", Subject: "billing.paid", Data: json.RawMessage(`[true, null]`)},
	}
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	ids, err := w.Write(ctx, tx, events...)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())

	require.Len(t, ids, len(events))
	seen := map[uuid.UUID]bool{}
	for i, id := range ids {
		require.Equal(t, uuid.Version(7), id.Version(), "id %d %s", i, id)
		require.False(t, seen[id], "id %d %s repeats", i, id)
		seen[id] = true
	}

	rows := storedEvents(t, db, "events")
	require.Len(t, rows, len(events))
	wantSubjects := []string{"order.OrderCreated", "order.OrderCreated", "billing.paid"}
	wantHeaders := []string{`{"traceparent": "00-abc-01", "X-Tenant": "acme corp"}`, `{}`, `{}`}
	wantData := []string{`{"total": 2}`, `{"total": 1}`, `[true, null]`}
	for i, r := range rows {
		ev := events[i]
		require.Equal(t, ids[i], r.ID, "row %d is not event %d: seq must follow the given order", i, i)
		if i > 0 {
			require.Greater(t, r.Seq, rows[i-1].Seq)
		}
		require.Equal(t, wantSubjects[i], r.Subject)
		require.Equal(t, ev.Type, r.Type)
		require.Equal(t, ev.EntityType, r.EntityType)
		require.Equal(t, ev.EntityID, r.EntityID)
		require.JSONEq(t, wantData[i], r.Data)
		require.JSONEq(t, wantHeaders[i], r.Headers)
		require.Equal(t, string(outbox.StatusReady), r.Status)
		require.Zero(t, r.Attempts)
		require.False(t, r.LastError.Valid)
		require.False(t, r.PublishedAt.Valid)
		require.False(t, r.CreatedAt.IsZero())
		require.False(t, r.AvailableAt.After(r.CreatedAt), "a new event is available at once")
	}
}

func TestWriteNoEvents(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})

	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	ids, err := w.Write(ctx, tx)
	require.NoError(t, err)
	require.Empty(t, ids)
	require.NoError(t, tx.Commit())
	require.Zero(t, countEvents(t, db, "events"))
}

func TestWriteInvalidEventKeepsTransactionUsable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	_, err := db.Exec(`CREATE TABLE orders (id text PRIMARY KEY)`)
	require.NoError(t, err)
	w := newWriter(t, outbox.Config{})

	// Each of these is refused before any SQL runs, so the transaction
	// stays usable.
	tests := []struct {
		name string
		data any
	}{
		{"invalid subject", nil}, // replaced below by a bad Subject
		{"JSON invalid UTF-8", []byte("{\"a\":\"\xff\xfe\"}")},
		{"JSON invalid", json.RawMessage(`{"a":`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := "o-" + testenv.Suffix()
			bad := outbox.Event{EntityType: "order", EntityID: id, Type: "OrderCreated", Data: tt.data}
			if tt.data == nil {
				bad.Data, bad.Subject = json.RawMessage(`{}`), "order.*"
			}
			good := outbox.Event{EntityType: "order", EntityID: id, Type: "OrderCreated", Data: json.RawMessage(`{}`)}

			before := countEvents(t, db, "events")
			tx, err := db.BeginTx(ctx, nil)
			require.NoError(t, err)
			defer tx.Rollback() //nolint:errcheck // no-op after commit

			_, err = tx.ExecContext(ctx, `INSERT INTO orders (id) VALUES ($1)`, id)
			require.NoError(t, err)
			ids, err := w.Write(ctx, tx, good, bad, good)
			require.ErrorIs(t, err, outbox.ErrInvalidEvent)
			var verr *outbox.ValidationError
			require.ErrorAs(t, err, &verr)
			require.Equal(t, 1, verr.Index)
			require.Nil(t, ids)
			require.Equal(t, before, countEvents(t, tx, "events"), "nothing of the rejected batch is inserted")

			// The transaction is still usable: more SQL and a commit work.
			var orders int
			require.NoError(t, tx.QueryRowContext(ctx, `SELECT count(*) FROM orders WHERE id = $1`, id).Scan(&orders))
			require.Equal(t, 1, orders)
			ids, err = w.Write(ctx, tx, good)
			require.NoError(t, err)
			require.NoError(t, tx.Commit())

			history, err := outbox.History(ctx, db, "order", id)
			require.NoError(t, err)
			require.Len(t, history, 1)
			require.Equal(t, ids[0], history[0].ID)
		})
	}
}

// TestWriteStoresPayloadsByteForByte: History returns every payload exactly
// as written, however jsonb would have normalised or refused it.
func TestWriteStoresPayloadsByteForByte(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})

	tests := []struct {
		name        string
		data        any
		contentType string
		want        string
	}{
		{name: "key order, duplicate key, number spelling, escapes, spacing",
			data: json.RawMessage(`{"zeta":1,"alpha":2,"alpha":3,"n":1E2,"s":"\u00e9","f":1.50}`),
			want: `{"zeta":1,"alpha":2,"alpha":3,"n":1E2,"s":"\u00e9","f":1.50}`},
		{name: "insignificant whitespace", data: []byte(" [ 1 ,\n\t2 ] "), want: " [ 1 ,\n\t2 ] "},
		{name: "escaped NUL", data: json.RawMessage(`{"a":"x\u0000y"}`), want: `{"a":"x\u0000y"}`},
		{name: "lone surrogate", data: json.RawMessage(`"\ud800"`), want: `"\ud800"`},
		{name: "surrogate pair", data: json.RawMessage(`"\ud83d\ude00"`), want: `"\ud83d\ude00"`},
		{name: "number over numeric's range", data: json.RawMessage(`[1e1000000, 1.5e-16383]`), want: `[1e1000000, 1.5e-16383]`},
		{name: "non-ASCII UTF-8", data: json.RawMessage(`{"name":"Zoë 東京"}`), want: `{"name":"Zoë 東京"}`},
		{name: "marshalled value", data: map[string]int{"b": 1, "a": 2}, want: `{"a":2,"b":1}`},
		{name: "null", data: json.RawMessage(`null`), want: `null`},
		{name: "protobuf bytes", contentType: "application/x-protobuf", data: []byte{0x08, 0x96, 0x01, 0x00, 0xff, 0x12}, want: "\x08\x96\x01\x00\xff\x12"},
		{name: "empty non-JSON payload", contentType: "application/octet-stream", data: []byte{}, want: ""},
		{name: "nil non-JSON payload", contentType: "application/octet-stream", data: []byte(nil), want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := "o-" + testenv.Suffix()
			tx, err := db.BeginTx(ctx, nil)
			require.NoError(t, err)
			defer tx.Rollback() //nolint:errcheck // no-op after commit
			_, err = w.Write(ctx, tx, outbox.Event{EntityType: "order", EntityID: id, Type: "OrderCreated",
				Data: tt.data, ContentType: tt.contentType})
			require.NoError(t, err)
			require.NoError(t, tx.Commit())

			history, err := outbox.History(ctx, db, "order", id)
			require.NoError(t, err)
			require.Len(t, history, 1)
			require.Equal(t, []byte(tt.want), history[0].Data)
			require.Equal(t, tt.contentType, history[0].ContentType)
			if tt.contentType != "" {
				require.Equal(t, tt.contentType, history[0].Headers[outbox.HeaderContentType])
			} else {
				require.NotContains(t, history[0].Headers, outbox.HeaderContentType, "JSON events carry no content type")
			}
		})
	}
}

func TestWriteRolledBackLeavesNoRows(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})

	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	ids, err := w.Write(ctx, tx, validEvent(), validEvent())
	require.NoError(t, err)
	require.Len(t, ids, 2)
	require.Equal(t, 2, countEvents(t, tx, "events"), "the transaction sees its own events")
	require.NoError(t, tx.Rollback())

	require.Zero(t, countEvents(t, db, "events"))
}

func TestWriteWithTransactionTypes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	tests := []struct {
		name  string
		write func(t *testing.T, db *testenv.DB, w *outbox.Writer, ev outbox.Event) []uuid.UUID
	}{
		{"sql.Tx", func(t *testing.T, db *testenv.DB, w *outbox.Writer, ev outbox.Event) []uuid.UUID {
			tx, err := db.DB.DB.BeginTx(ctx, nil)
			require.NoError(t, err)
			ids, err := w.Write(ctx, tx, ev)
			require.NoError(t, err)
			require.NoError(t, tx.Commit())
			return ids
		}},
		{"sqlx.Tx", func(t *testing.T, db *testenv.DB, w *outbox.Writer, ev outbox.Event) []uuid.UUID {
			tx, err := db.BeginTxx(ctx, nil)
			require.NoError(t, err)
			ids, err := w.Write(ctx, tx, ev)
			require.NoError(t, err)
			require.NoError(t, tx.Commit())
			return ids
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			db := testenv.NewDB(t)
			w := newWriter(t, outbox.Config{})

			ids := tt.write(t, db, w, validEvent())
			require.Len(t, ids, 1)

			history, err := w.History(ctx, db, "order", "o-1")
			require.NoError(t, err)
			require.Len(t, history, 1)
			require.Equal(t, ids[0], history[0].ID)
		})
	}
}

func TestWriteCustomTable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	applied, err := schema.Migrate(ctx, db.DB.DB, schema.Tables{Events: "my_events", Processed: "my_processed"})
	require.NoError(t, err)
	require.Equal(t, []int{1, 2, 3, 4}, applied)

	tests := []struct {
		name  string
		table string // Config.Table
	}{
		{"unqualified", "my_events"},
		{"schema-qualified", db.Schema + ".my_events"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWriter(t, outbox.Config{Table: tt.table})
			entity := "o-" + testenv.Suffix()
			tx, err := db.BeginTx(ctx, nil)
			require.NoError(t, err)
			ids, err := w.Write(ctx, tx, outbox.Event{EntityType: "order", EntityID: entity, Type: "OrderCreated", Data: json.RawMessage(`{}`)})
			require.NoError(t, err)
			require.NoError(t, tx.Commit())

			history, err := w.History(ctx, db, "order", entity)
			require.NoError(t, err)
			require.Len(t, history, 1)
			require.Equal(t, ids[0], history[0].ID)

			var inDefault int
			require.NoError(t, db.Get(&inDefault, `SELECT count(*) FROM events WHERE entity_id = $1`, entity))
			require.Zero(t, inDefault, "the default table must stay untouched")
		})
	}
}

func TestWriteMissingTable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{Table: "no_such_events"})

	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer tx.Rollback() //nolint:errcheck // the test ends with it
	_, err = w.Write(ctx, tx, validEvent())
	require.Error(t, err)
	require.NotErrorIs(t, err, outbox.ErrInvalidEvent, "a database error is not a validation error")
	var pqErr *pq.Error
	require.ErrorAs(t, err, &pqErr)
	require.EqualValues(t, "42P01", pqErr.Code) // undefined_table
}

func TestWriteNewIDError(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	errNoID := errors.New("no id for you")
	w := newWriter(t, outbox.Config{NewID: func() (uuid.UUID, error) { return uuid.Nil, errNoID }})

	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = w.Write(ctx, tx, validEvent())
	require.ErrorIs(t, err, errNoID)
	require.NotErrorIs(t, err, outbox.ErrInvalidEvent)
	require.NoError(t, tx.Commit(), "no SQL ran, so the transaction commits")
	require.Zero(t, countEvents(t, db, "events"))
}

func TestWriteCustomNewID(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	want := uuid.MustParse("01890a5d-ac96-774b-bcce-b302099a8057")
	w := newWriter(t, outbox.Config{NewID: func() (uuid.UUID, error) { return want, nil }})

	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	ids, err := w.Write(ctx, tx, validEvent())
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	require.Equal(t, []uuid.UUID{want}, ids)
	rows := storedEvents(t, db, "events")
	require.Len(t, rows, 1)
	require.Equal(t, want, rows[0].ID)
}

func TestNewWriterRejectsBadConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     outbox.Config
		wantErr error // nil: any error
	}{
		{"table with SQL injection", outbox.Config{Table: "events; drop table x"}, schema.ErrInvalidName},
		{"table with quote", outbox.Config{Table: `"events"`}, schema.ErrInvalidName},
		{"table with three parts", outbox.Config{Table: "a.b.c"}, schema.ErrInvalidName},
		{"negative MaxBytes", outbox.Config{MaxBytes: -1}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			w, err := outbox.NewWriter(tt.cfg)
			require.Error(t, err)
			require.Nil(t, w)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
			}
		})
	}
}

func TestHistory(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})

	write := func(events ...outbox.Event) []uuid.UUID {
		t.Helper()
		tx, err := db.BeginTx(ctx, nil)
		require.NoError(t, err)
		ids, err := w.Write(ctx, tx, events...)
		require.NoError(t, err)
		require.NoError(t, tx.Commit())
		return ids
	}
	ev := func(entityID, typ string) outbox.Event {
		return outbox.Event{EntityType: "order", EntityID: entityID, Type: typ,
			Data: map[string]string{"type": typ}, Headers: map[string]string{"traceparent": typ}}
	}
	created := write(ev("o-1", "OrderCreated"), ev("o-2", "OrderCreated"))
	paid := write(ev("o-1", "OrderPaid"))
	write(outbox.Event{EntityType: "customer", EntityID: "o-1", Type: "CustomerCreated", Data: json.RawMessage(`{}`)})
	shipped := write(ev("o-1", "OrderShipped"))

	// The publisher marks the first event published and the second failed.
	_, err := db.Exec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() WHERE event_id = $1`, created[0])
	require.NoError(t, err)
	_, err = db.Exec(`UPDATE events SET event_status = 'FAILED', attempts = 3, last_error = 'no stream' WHERE event_id = $1`, paid[0])
	require.NoError(t, err)

	t.Run("returns the entity's events in seq order", func(t *testing.T) {
		history, err := outbox.History(ctx, db, "order", "o-1")
		require.NoError(t, err)
		require.Len(t, history, 3)

		wantIDs := []uuid.UUID{created[0], paid[0], shipped[0]}
		wantTypes := []string{"OrderCreated", "OrderPaid", "OrderShipped"}
		for i, r := range history {
			require.Equal(t, wantIDs[i], r.ID)
			require.Equal(t, wantTypes[i], r.Type)
			require.Equal(t, "order", r.EntityType)
			require.Equal(t, "o-1", r.EntityID)
			require.Equal(t, "order."+wantTypes[i], r.Subject)
			require.JSONEq(t, fmt.Sprintf(`{"type":%q}`, wantTypes[i]), string(r.Data))
			require.Equal(t, map[string]string{"traceparent": wantTypes[i]}, r.Headers)
			require.False(t, r.CreatedAt.IsZero())
			if i > 0 {
				require.Greater(t, r.Seq, history[i-1].Seq)
			}
		}

		require.Equal(t, outbox.StatusSuccess, history[0].Status)
		require.NotNil(t, history[0].PublishedAt)
		require.Empty(t, history[0].LastError)

		require.Equal(t, outbox.StatusFailed, history[1].Status)
		require.Nil(t, history[1].PublishedAt)
		require.Equal(t, 3, history[1].Attempts)
		require.Equal(t, "no stream", history[1].LastError)

		require.Equal(t, outbox.StatusReady, history[2].Status)
		require.Nil(t, history[2].PublishedAt)
		require.Zero(t, history[2].Attempts)
	})

	t.Run("entity type and id together select the entity", func(t *testing.T) {
		history, err := outbox.History(ctx, db, "customer", "o-1")
		require.NoError(t, err)
		require.Len(t, history, 1)
		require.Equal(t, "CustomerCreated", history[0].Type)
		require.Empty(t, history[0].Headers)
	})

	t.Run("unknown entity has no history", func(t *testing.T) {
		history, err := outbox.History(ctx, db, "order", "o-404")
		require.NoError(t, err)
		require.Empty(t, history)
	})

	t.Run("reads inside the writing transaction", func(t *testing.T) {
		tx, err := db.BeginTxx(ctx, nil)
		require.NoError(t, err)
		defer tx.Rollback() //nolint:errcheck // the subtest ends with it
		_, err = w.Write(ctx, tx, ev("o-3", "OrderCreated"))
		require.NoError(t, err)
		history, err := w.History(ctx, tx, "order", "o-3")
		require.NoError(t, err)
		require.Len(t, history, 1)
	})

	t.Run("missing table is an error", func(t *testing.T) {
		other := newWriter(t, outbox.Config{Table: "no_such_events"})
		_, err := other.History(ctx, db, "order", "o-1")
		require.Error(t, err)
	})
}

// listener receives the NOTIFY channel of an events table.
type listener struct {
	t       *testing.T
	l       *pq.Listener
	db      *testenv.DB
	channel string
}

func listen(t *testing.T, db *testenv.DB, channel string) *listener {
	t.Helper()
	l := pq.NewListener(db.DSN, 10*time.Millisecond, time.Second, nil)
	t.Cleanup(func() { _ = l.Close() })
	require.NoError(t, l.Listen(channel))
	return &listener{t: t, l: l, db: db, channel: channel}
}

// received sends a probe notification from its own transaction and returns
// the payloads that arrived before it. PostgreSQL delivers notifications in
// commit order, so these are exactly the notifications of every transaction
// that committed before the probe: no timing involved.
func (l *listener) received() []string {
	l.t.Helper()
	probe := "probe-" + testenv.Suffix()
	_, err := l.db.Exec(`SELECT pg_notify($1, $2)`, l.channel, probe)
	require.NoError(l.t, err)
	var got []string
	timeout := time.After(10 * time.Second)
	for {
		select {
		case n := <-l.l.Notify:
			if n == nil {
				l.t.Fatal("listener reconnected: notifications may have been lost")
			}
			if n.Extra == probe {
				return got
			}
			got = append(got, n.Extra)
		case <-timeout:
			l.t.Fatalf("probe notification did not arrive on %q within 10s", l.channel)
		}
	}
}

func TestWriteNotifiesOnCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := testenv.NewDB(t)
	w := newWriter(t, outbox.Config{})
	var oid int64
	require.NoError(t, db.Get(&oid, `SELECT to_regclass('events')::oid::bigint`))
	l := listen(t, db, schema.Channel(oid))

	// A publisher holds this lock while it sleeps; the trigger notifies
	// only then.
	sleeper, err := db.Conn(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { sleeper.Close() })
	sleep := func(on bool) {
		q := `SELECT pg_advisory_unlock($1, $2::bigint::oid::int)`
		if on {
			q = `SELECT pg_advisory_lock($1, $2::bigint::oid::int)`
		}
		_, err := sleeper.ExecContext(ctx, q, schema.SleepLockNamespace, oid)
		require.NoError(t, err)
	}
	commitOne := func() {
		tx, err := db.BeginTx(ctx, nil)
		require.NoError(t, err)
		_, err = w.Write(ctx, tx, validEvent())
		require.NoError(t, err)
		require.NoError(t, tx.Commit())
	}

	t.Run("no notification while no publisher sleeps", func(t *testing.T) {
		commitOne()
		require.Empty(t, l.received())
	})

	sleep(true)
	t.Run("one notification for a multi-row write, only after commit", func(t *testing.T) {
		tx, err := db.BeginTx(ctx, nil)
		require.NoError(t, err)
		_, err = w.Write(ctx, tx, validEvent(), validEvent(), validEvent())
		require.NoError(t, err)
		require.Empty(t, l.received(), "no notification before commit")

		require.NoError(t, tx.Commit())
		require.Equal(t, []string{""}, l.received(), "one notification, without payload, per INSERT statement")
	})

	t.Run("no notification for a rolled-back write", func(t *testing.T) {
		tx, err := db.BeginTx(ctx, nil)
		require.NoError(t, err)
		_, err = w.Write(ctx, tx, validEvent())
		require.NoError(t, err)
		require.NoError(t, tx.Rollback())
		require.Empty(t, l.received())
	})

	t.Run("one notification per committed transaction", func(t *testing.T) {
		commitOne()
		commitOne()
		require.Equal(t, []string{"", ""}, l.received())
	})

	t.Run("an uncommitted insert keeps the publisher from going to sleep", func(t *testing.T) {
		sleep(false)
		tx, err := db.BeginTx(ctx, nil)
		require.NoError(t, err)
		_, err = w.Write(ctx, tx, validEvent())
		require.NoError(t, err)
		var ok bool
		require.NoError(t, sleeper.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1, $2::bigint::oid::int)`,
			schema.SleepLockNamespace, oid).Scan(&ok))
		require.False(t, ok, "sleep lock taken while a writer that skipped NOTIFY is uncommitted")
		require.NoError(t, tx.Commit())
		require.NoError(t, sleeper.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1, $2::bigint::oid::int)`,
			schema.SleepLockNamespace, oid).Scan(&ok))
		require.True(t, ok)
	})
}
