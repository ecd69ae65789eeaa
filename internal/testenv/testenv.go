// Package testenv gives tests their own slice of the real PostgreSQL and
// NATS servers: a fresh schema per test, and JetStream streams with unique
// names and subjects, or an in-process NATS server where a test must stop
// or restart the broker.
//
// DATABASE_URL and NATS_URL override the local defaults. When a server is
// unreachable the test fails with a message saying which, where and how to
// start it; it never skips.
package testenv

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // PostgreSQL driver
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/redact"
	"github.com/pgnats/outbox/schema"
)

// Default addresses of the local services.
const (
	DefaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	DefaultNATSURL     = "nats://127.0.0.1:4222"
)

// DatabaseURL returns DATABASE_URL or the local default.
func DatabaseURL() string { return cmp.Or(os.Getenv("DATABASE_URL"), DefaultDatabaseURL) }

// NATSURL returns NATS_URL or the local default.
func NATSURL() string { return cmp.Or(os.Getenv("NATS_URL"), DefaultNATSURL) }

// Suffix returns a short random lowercase hex string for unique names.
func Suffix() string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// DB is a test's own PostgreSQL schema with the outbox tables migrated.
type DB struct {
	*sqlx.DB
	// DSN connects with search_path set to the test's schema, so the
	// default table names resolve inside it.
	DSN    string
	Schema string
}

// NewDB creates a schema named after a random suffix, migrates the default
// tables into it and drops it when the test ends.
func NewDB(t testing.TB) *DB {
	t.Helper()
	admin := openDB(t, DatabaseURL())
	name := "t_" + Suffix()
	_, err := admin.Exec(`CREATE SCHEMA ` + name)
	if err != nil {
		t.Fatalf("create test schema: %v", err)
	}
	t.Cleanup(func() {
		_, _ = admin.Exec(`DROP SCHEMA ` + name + ` CASCADE`)
		admin.Close()
	})
	dsn := schema.WithSearchPath(DatabaseURL(), name)
	db := openDB(t, dsn)
	t.Cleanup(func() { db.Close() })
	if _, err := schema.Migrate(context.Background(), db.DB, schema.Tables{}); err != nil {
		t.Fatalf("migrate test schema: %v", err)
	}
	return &DB{DB: db, DSN: dsn, Schema: name}
}

func openDB(t testing.TB, dsn string) *sqlx.DB {
	t.Helper()
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		t.Fatalf("open database: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		t.Fatalf("PostgreSQL is unreachable at %s: %v\n"+
			"start it (e.g. pg_ctlcluster <version> main start) or set DATABASE_URL", redact.DSN(dsn), err)
	}
	return db
}

// NATS connects to NATS_URL (or the local server) and returns the
// connection and its JetStream context, closed when the test ends.
func NATS(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	return ConnectNATS(t, NATSURL())
}

// ConnectNATS connects to the NATS server at url for the test.
func ConnectNATS(t testing.TB, url string) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(url, nats.Timeout(5*time.Second), nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatalf("NATS is unreachable at %s: %v\n"+
			"start nats-server with JetStream (nats-server -js) or set NATS_URL", url, err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	return nc, js
}

// Stream creates a memory-backed stream with a unique name covering
// "<prefix>.>", where prefix is also unique, and deletes it when the test
// ends. It returns the stream and the subject prefix.
func Stream(t testing.TB, js jetstream.JetStream) (jetstream.Stream, string) {
	t.Helper()
	sfx := Suffix()
	prefix := "t" + sfx
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:       "T_" + strings.ToUpper(sfx),
		Subjects:   []string{prefix + ".>"},
		Storage:    jetstream.MemoryStorage,
		Duplicates: 2 * time.Minute,
	})
	if err != nil {
		t.Fatalf("create stream: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = js.DeleteStream(ctx, s.CachedInfo().Config.Name)
	})
	return s, prefix
}

// Eventually polls cond every 20ms until it returns true or timeout passes,
// then fails the test with msg.
func Eventually(t testing.TB, timeout time.Duration, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: "+msg, append([]any{timeout}, args...)...)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Int runs a query returning one integer in the test's schema.
func (db *DB) Int(t testing.TB, query string, args ...any) int {
	t.Helper()
	var n int
	if err := db.Get(&n, query, args...); err != nil {
		t.Fatalf("query %q: %v", query, err)
	}
	return n
}

// Count returns the number of events in status.
func (db *DB) Count(t testing.TB, status string) int {
	t.Helper()
	return db.Int(t, `SELECT count(*) FROM events WHERE event_status = $1`, status)
}

// Sleeping reports whether a publisher holds the sleep lock of the test's
// events table, that is waits for a NOTIFY (schema.SleepLockNamespace).
func (db *DB) Sleeping(t testing.TB) bool {
	t.Helper()
	return db.Int(t, `SELECT count(*) FROM pg_locks
		WHERE locktype = 'advisory' AND classid = $1::bigint::oid
		  AND objid = to_regclass('events')::oid AND objsubid = 2 AND granted`,
		schema.SleepLockNamespace) == 1
}

// IDs returns the ids of the events in status ("" for all), in seq order.
func (db *DB) IDs(t testing.TB, status string) []string {
	t.Helper()
	var ids []string
	if err := db.Select(&ids, `SELECT event_id::text FROM events
		WHERE $1 = '' OR event_status = $1 ORDER BY seq`, status); err != nil {
		t.Fatalf("read event ids: %v", err)
	}
	return ids
}
