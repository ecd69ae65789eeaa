package poller_test

import (
	"context"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/schema"
)

// A publisher started against an events table that 'migrate' has not yet
// brought to the current version (event_data still jsonb) says so and
// stops, instead of failing every claim and backing off forever while it
// looks healthy.
func TestRunRefusesATableBeforeThePayloadMigration(t *testing.T) {
	t.Parallel()
	nc, _ := testenv.NATS(t)
	admin, err := sqlx.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	t.Cleanup(func() { admin.Close() })
	name := "t_" + testenv.Suffix()
	admin.MustExec(`CREATE SCHEMA ` + name)
	t.Cleanup(func() { admin.MustExec(`DROP SCHEMA ` + name + ` CASCADE`) })
	dsn := schema.WithSearchPath(testenv.DatabaseURL(), name)
	db, err := sqlx.Open("postgres", dsn)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	_, err = schema.MigrateTo(context.Background(), db.DB, schema.Tables{}, 2)
	require.NoError(t, err)

	cfg := fastConfig()
	cfg.DB, cfg.DSN, cfg.NATS, cfg.Logger = db.DB, dsn, nc, testLogger(t)
	p, err := poller.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = p.Run(ctx)
	require.Error(t, err, "Run against a version-2 table")
	require.Contains(t, err.Error(), "publisher migrate")
	require.Contains(t, err.Error(), "jsonb")
}

// A column the claim returns changing type while the publisher runs (a
// later migration, or an operator's ALTER TABLE) makes PostgreSQL refuse
// the prepared claim on every connection it was prepared on ("cached plan
// must not change result type"). The publisher prepares it again and goes
// on publishing instead of backing off until it is restarted.
func TestClaimIsPreparedAgainAfterAColumnChangesType(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.db.SetMaxOpenConns(3) // every pooled connection has the claim prepared
	b.start(t, fastConfig())
	subject := b.prefix + ".order.changed"
	b.write(t, changes(subject, 3, 4)...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 12 }, "published before the change")

	b.db.MustExec(`ALTER TABLE events ALTER COLUMN event_type TYPE varchar(255)`)
	b.write(t, changes(subject, 3, 4)...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 24 },
		"published after event_type became varchar")
	requireOnceInOrder(t, b.received(t), 24)
}
