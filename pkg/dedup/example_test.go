package dedup_test

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // PostgreSQL driver
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"

	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/schema"
)

// A message delivered twice charges the order once.
func Example() {
	ctx := context.Background()
	db, err := sqlx.Open("postgres", cmp.Or(os.Getenv("DATABASE_URL"), "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer db.Close()

	// The example works in a schema of its own and drops it at the end.
	ns := "dedup_example_" + strings.ToLower(rand.Text()[:10])
	if _, err := db.ExecContext(ctx, `CREATE SCHEMA `+ns+`;
		CREATE TABLE `+ns+`.payments (order_id text PRIMARY KEY)`); err != nil {
		fmt.Println(err)
		return
	}
	defer db.Exec(`DROP SCHEMA ` + ns + ` CASCADE`)
	tables := schema.Tables{Events: ns + ".events", Processed: ns + ".processed_message"}
	if _, err := schema.Migrate(ctx, db.DB, tables); err != nil {
		fmt.Println(err)
		return
	}

	d, err := dedup.New(db, dedup.Config{Table: tables.Processed})
	if err != nil {
		fmt.Println(err)
		return
	}
	charge := func(ctx context.Context, tx *sqlx.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO `+ns+`.payments (order_id) VALUES ($1)`, "order-42")
		return err
	}
	for range 2 { // the broker delivers the same message twice
		res, err := d.Process(ctx, "billing", "0198c1e2-7a4b-7c3d-9e8f-0a1b2c3d4e5f", charge)
		fmt.Println(res, err)
	}

	var payments int
	if err := db.GetContext(ctx, &payments, `SELECT count(*) FROM `+ns+`.payments`); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("payments:", payments)
	// Output:
	// processed <nil>
	// duplicate <nil>
	// payments: 1
}

// Consuming a JetStream stream: every message is handled once per consumer
// name, acked after commit, and redelivered after a second on error.
func ExampleProcessor_Handler() {
	var (
		db   *sqlx.DB           // the service's database
		cons jetstream.Consumer // a durable pull consumer on the outbox stream
	)
	d, err := dedup.New(db, dedup.Config{Logger: slog.Default()})
	if err != nil {
		fmt.Println(err)
		return
	}
	handler := d.Handler(dedup.HandlerConfig{Consumer: "billing", NakDelay: time.Second},
		func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
			var order struct {
				ID string `json:"id"`
			}
			if err := json.Unmarshal(msg.Data(), &order); err != nil {
				return dedup.Permanent(fmt.Errorf("decode order: %w", err))
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO payments (order_id) VALUES ($1)`, order.ID)
			return err
		})
	cc, err := cons.Consume(handler)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cc.Stop()
}

// Counting what consumers do: one Metrics for the process, registered once,
// shared by every Processor; a consumer that traces keeps the writer's
// trace through the global propagator.
func ExampleNewMetrics() {
	var db *sqlx.DB // the service's database

	m := dedup.NewMetrics()
	prometheus.MustRegister(m) // outbox_consumer_messages_total, outbox_consumer_handler_duration_seconds
	otel.SetTextMapPropagator(propagation.TraceContext{})

	d, err := dedup.New(db, dedup.Config{Metrics: m})
	if err != nil {
		fmt.Println(err)
		return
	}
	_ = d.Handler(dedup.HandlerConfig{Consumer: "billing"},
		func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
			// ctx carries the span context of the transaction that wrote the
			// event: spans started here are its children.
			return nil
		})
}
