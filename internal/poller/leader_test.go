package poller_test

import (
	"database/sql"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// Two pollers on one table: one leads; when it stops, the other takes over
// and drains, and every event is in the stream once, in order.
func TestStandbyTakesOverWhenLeaderStops(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.BatchSize = 20
	p1, stop1 := b.run(t, cfg)
	nc2, _ := testenv.NATS(t)
	cfg.NATS = nc2
	p2, stop2 := b.run(t, cfg)

	testenv.Eventually(t, 10*time.Second, func() bool { return p1.Stats().Leader || p2.Stats().Leader },
		"one poller leads")
	require.NotEqual(t, p1.Stats().Leader, p2.Stats().Leader, "exactly one poller leads")
	leader, standby, stopLeader := p1, p2, stop1
	if p2.Stats().Leader {
		leader, standby, stopLeader = p2, p1, stop2
	}

	subject := b.prefix + ".order.changed"
	first := changes(subject, 10, 30)
	b.write(t, first...)
	testenv.Eventually(t, 10*time.Second, func() bool { return leader.Stats().Published > 0 },
		"the leader publishes")
	require.Zero(t, standby.Stats().Published, "the standby must not publish while the other leads")
	require.False(t, standby.Stats().Leader, "exactly one poller leads")

	require.NoError(t, stopLeader())
	require.False(t, leader.Stats().Leader)
	second := changes(subject, 10, 30)
	b.write(t, second...)
	testenv.Eventually(t, 10*time.Second, func() bool { return standby.Stats().Leader },
		"the standby takes over")

	total := len(first) + len(second)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == total },
		"all %d events SUCCESS", total)
	require.Positive(t, standby.Stats().Published, "the new leader publishes")
	require.Zero(t, b.db.Count(t, "FAILED"))
	requireOnceInOrder(t, b.received(t), total)
}

// Terminating the poller's database sessions (pool, LISTEN and leader lock)
// while it publishes loses nothing: all delivered, none FAILED, in order.
func TestDatabaseSessionsTerminated(t *testing.T) {
	t.Parallel()
	b := setup(t)
	app := "obx_" + b.db.Schema
	dsn := withApplicationName(t, b.db.DSN, app)
	db, err := sql.Open("postgres", dsn)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	cfg := fastConfig()
	cfg.BatchSize = 50
	cfg.DB, cfg.DSN = db, dsn
	p := b.start(t, cfg)

	// The leader connection renames itself; it is found by the leader lock
	// (first key "obx1") it holds on this schema's events table. Writers
	// take other advisory locks on the table, so the key matters.
	terminate := func() int {
		return b.db.Int(t, `SELECT count(*) FROM (
			SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
			WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
			  AND (a.application_name = $1 OR a.pid IN (
				SELECT l.pid FROM pg_locks l
				WHERE l.locktype = 'advisory' AND l.classid = x'6f627831'::bigint::oid
				  AND l.objid = 'events'::regclass::oid))) t`, app)
	}

	subject := b.prefix + ".order.changed"
	const rounds = 5
	total := 0
	for range rounds {
		events := changes(subject, 10, 40)
		b.write(t, events...)
		total += len(events)
		published := p.Stats().Published
		testenv.Eventually(t, 20*time.Second, func() bool { return p.Stats().Published > published },
			"the poller publishes between terminations")
		testenv.Eventually(t, 10*time.Second, func() bool { return terminate() > 0 },
			"the poller's sessions are terminated")
	}

	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == total },
		"all %d events SUCCESS", total)
	require.Zero(t, b.db.Count(t, "FAILED"))
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`))
	requireOnceInOrder(t, b.received(t), total)
}

// withApplicationName returns dsn connecting as application name.
func withApplicationName(t *testing.T, dsn, name string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil || u.Scheme == "" {
		return strings.TrimSpace(dsn) + " application_name=" + name
	}
	q := u.Query()
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	return u.String()
}
