package poller_test

import (
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// The database role OPERATIONS.md names as enough for the publisher
// (USAGE on the schema, SELECT and UPDATE on the events table, SELECT on
// its control table; with
// partitions, SELECT, INSERT, UPDATE and DELETE on the lease tables) is
// enough: it publishes, alone and partitioned.
func TestPublisherRunsWithTheLeastPrivilegeRole(t *testing.T) {
	t.Parallel()
	for _, partitions := range []int{0, 4} {
		t.Run("partitions "+strconv.Itoa(partitions), func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			role, dsn := leastPrivilegeRole(t, b)
			if partitions > 0 {
				b.db.MustExec(`GRANT SELECT, INSERT, UPDATE, DELETE ON events_leases, events_replicas TO ` + role)
			}
			db, err := sqlx.Open("postgres", dsn)
			require.NoError(t, err)
			t.Cleanup(func() { db.Close() })

			cfg := fastConfig()
			if partitions > 0 {
				cfg = partitioned(partitions, "r1")
			}
			cfg.DB, cfg.DSN = db.DB, dsn
			p := b.start(t, cfg)
			events := changes(b.prefix+".order.changed", 4, 5)
			b.write(t, events...)
			testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
				"published by the least-privilege role (backoffs %d)", p.Stats().Backoffs)
			requireOnceInOrder(t, b.received(t), len(events))
		})
	}
}

// leastPrivilegeRole makes a login role with what OPERATIONS.md names as
// enough for a single publisher (USAGE on the schema, SELECT and UPDATE on
// the events table, SELECT on its control table), dropped with the test,
// and returns it with a DSN that connects as it.
func leastPrivilegeRole(t *testing.T, b *bundle) (role, dsn string) {
	t.Helper()
	role = "outbox_pub_" + testenv.Suffix()
	b.db.MustExec(`CREATE ROLE ` + role + ` LOGIN`)
	t.Cleanup(func() {
		b.db.MustExec(`DROP OWNED BY ` + role)
		b.db.MustExec(`DROP ROLE ` + role)
	})
	b.db.MustExec(`GRANT USAGE ON SCHEMA ` + b.db.Schema + ` TO ` + role)
	b.db.MustExec(`GRANT SELECT, UPDATE ON events TO ` + role)
	b.db.MustExec(`GRANT SELECT ON events_control TO ` + role)
	u, err := url.Parse(b.db.DSN)
	require.NoError(t, err)
	u.User = url.User(role)
	return role, u.String()
}
