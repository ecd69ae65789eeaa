package outbox_test

import (
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
	"fmt"
	"net/url"
	"os"
	"strings"

	_ "github.com/lib/pq" // PostgreSQL driver

	"github.com/pgnats/outbox/pkg/outbox"
	"github.com/pgnats/outbox/schema"
)

// Example writes an order and its OrderCreated event in one transaction:
// the event exists if and only if the order does.
func Example() {
	ctx := context.Background()
	db, done := exampleDB() // DATABASE_URL, in a schema of its own
	defer done()

	// Once per database (the publisher's "migrate" subcommand does the same).
	if _, err := schema.Migrate(ctx, db, schema.Tables{}); err != nil {
		panic(err)
	}
	w, err := outbox.NewWriter(outbox.Config{})
	if err != nil {
		panic(err)
	}

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		panic(err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, total) VALUES ($1, $2)`, "o-1", 4200); err != nil {
		panic(err)
	}
	if _, err := w.Write(ctx, tx, outbox.Event{
		EntityType: "order",
		EntityID:   "o-1",
		Type:       "OrderCreated",
		Data:       map[string]any{"id": "o-1", "total": 4200},
	}); err != nil {
		panic(err)
	}
	if err := tx.Commit(); err != nil {
		panic(err)
	}

	var ready int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM events WHERE event_status = 'READY'`).Scan(&ready); err != nil {
		panic(err)
	}
	fmt.Println("READY events:", ready)
	// Output:
	// READY events: 1
}

// ExampleWriter_Write writes two events of one order in one statement and
// reads them back, in order, from the order's history.
func ExampleWriter_Write() {
	ctx := context.Background()
	db, done := exampleDB()
	defer done()
	if _, err := schema.Migrate(ctx, db, schema.Tables{}); err != nil {
		panic(err)
	}
	w, err := outbox.NewWriter(outbox.Config{})
	if err != nil {
		panic(err)
	}

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		panic(err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	ids, err := w.Write(ctx, tx,
		outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: map[string]any{"total": 4200}},
		outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderPaid", Subject: "billing.paid", Data: map[string]any{"amount": 4200},
			Headers: map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}},
	)
	if err != nil {
		panic(err)
	}
	if err := tx.Commit(); err != nil {
		panic(err)
	}
	fmt.Println("ids:", len(ids))

	history, err := outbox.History(ctx, db, "order", "o-1")
	if err != nil {
		panic(err)
	}
	for _, r := range history {
		fmt.Println(r.Type, r.Subject, r.Status)
	}
	// Output:
	// ids: 2
	// OrderCreated order.OrderCreated READY
	// OrderPaid billing.paid READY
}

// exampleDB connects to DATABASE_URL (default: the local server) with
// search_path set to a new schema holding an orders table. done closes the
// connection and drops the schema.
func exampleDB() (db *sql.DB, done func()) {
	dsn := cmp.Or(os.Getenv("DATABASE_URL"), "postgres://postgres@127.0.0.1:5432/test?sslmode=disable")
	name := "example_" + strings.ToLower(rand.Text()[:10])

	admin, err := sql.Open("postgres", dsn)
	if err != nil {
		panic(err)
	}
	if _, err := admin.Exec(`CREATE SCHEMA ` + name); err != nil {
		panic(err)
	}
	u, err := url.Parse(dsn)
	if err != nil {
		panic(err)
	}
	q := u.Query()
	q.Set("search_path", name)
	u.RawQuery = q.Encode()
	db, err = sql.Open("postgres", u.String())
	if err != nil {
		panic(err)
	}
	if _, err := db.Exec(`CREATE TABLE orders (id text PRIMARY KEY, total bigint NOT NULL)`); err != nil {
		panic(err)
	}
	return db, func() {
		db.Close()
		_, _ = admin.Exec(`DROP SCHEMA ` + name + ` CASCADE`)
		admin.Close()
	}
}
