package poller_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

func TestHousekeepingDeletesOnlyOldPublishedEvents(t *testing.T) {
	t.Parallel()
	b := setup(t)
	var events []outbox.Event
	for i := range 2500 {
		events = append(events, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed",
			Subject: b.prefix + ".order", Data: i})
	}
	b.write(t, events...)
	// 2300 old published events, 100 recent ones, 50 READY, 50 FAILED.
	_, err := b.db.Exec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() - interval '2 hours' WHERE seq <= 2300`)
	require.NoError(t, err)
	_, err = b.db.Exec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() WHERE seq > 2300 AND seq <= 2400`)
	require.NoError(t, err)
	_, err = b.db.Exec(`UPDATE events SET event_status = 'FAILED', created_at = now() - interval '2 hours' WHERE seq > 2450`)
	require.NoError(t, err)

	stop, err := poller.StartHousekeeping(context.Background(), poller.Housekeeping{
		DB: b.db.DB.DB, Table: "events", Logger: testLogger(t),
		RetentionSchedule: "@every 1s", Retention: time.Hour,
	})
	require.NoError(t, err)
	defer stop()
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 100 },
		"old SUCCESS events deleted")
	require.Equal(t, 50, b.db.Count(t, "READY"))
	require.Equal(t, 50, b.db.Count(t, "FAILED"))
}

// A retention run that outlasts its schedule (here, waiting on a row lock)
// is not joined by a second one selecting the same rows.
func TestRetentionRunsOneAtATime(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.write(t, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order", Data: 1},
		outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order", Data: 2})
	_, err := b.db.Exec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() - interval '2 hours'`)
	require.NoError(t, err)
	lock, err := b.db.Begin()
	require.NoError(t, err)
	t.Cleanup(func() { lock.Rollback() }) //nolint:errcheck
	_, err = lock.Exec(`SELECT 1 FROM events ORDER BY seq LIMIT 1 FOR UPDATE`)
	require.NoError(t, err)

	stop, err := poller.StartHousekeeping(context.Background(), poller.Housekeeping{
		DB: b.db.DB.DB, Table: "events", Logger: testLogger(t),
		RetentionSchedule: "@every 1s", Retention: time.Hour,
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		lock.Rollback() //nolint:errcheck // first: stop waits for the run blocked on it
		stop()
	})
	waiting := func() int {
		var n int
		require.NoError(t, b.db.Get(&n, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'
			  AND query LIKE 'DELETE FROM "events"%' AND query LIKE '%' || $1 || '%'`, "event_status = 'SUCCESS'"))
		return n
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return waiting() >= 1 }, "a retention run waits on the lock")
	// Three more turns of the schedule: never a second run beside it.
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		require.Equal(t, 1, waiting(), "retention runs waiting on the same rows")
	}
	require.NoError(t, lock.Rollback())
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 0 }, "old events deleted once the lock is gone")
}

func TestHousekeepingDeletesOnlyOldProcessedMessages(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	// 2300 old records (more than two delete batches), 100 recent ones.
	_, err := db.Exec(`INSERT INTO processed_message (consumer_id, message_id, processed_at)
		SELECT 'billing', 'old-' || i, now() - interval '2 hours' FROM generate_series(1, 2300) i`)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO processed_message (consumer_id, message_id, processed_at)
		SELECT 'billing', 'new-' || i, now() - interval '10 minutes' FROM generate_series(1, 100) i`)
	require.NoError(t, err)

	stop, err := poller.StartHousekeeping(context.Background(), poller.Housekeeping{
		DB: db.DB.DB, Table: "events", Logger: testLogger(t),
		RetentionSchedule: "@every 1s", ProcessedRetention: time.Hour,
	})
	require.NoError(t, err)
	defer stop()
	count := func(prefix string) int {
		var n int
		require.NoError(t, db.Get(&n, `SELECT count(*) FROM processed_message WHERE message_id LIKE $1 || '%'`, prefix))
		return n
	}
	testenv.Eventually(t, 20*time.Second, func() bool { return count("old-") == 0 }, "old processed_message rows deleted")
	require.Equal(t, 100, count("new-"), "recent processed_message rows kept")
}

func TestHousekeepingProcessedRetentionLeavesEventsAlone(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.write(t, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order", Data: 1})
	_, err := b.db.Exec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() - interval '2 hours'`)
	require.NoError(t, err)
	_, err = b.db.Exec(`INSERT INTO processed_message (consumer_id, message_id, processed_at)
		VALUES ('billing', 'old', now() - interval '2 hours')`)
	require.NoError(t, err)

	stop, err := poller.StartHousekeeping(context.Background(), poller.Housekeeping{
		DB: b.db.DB.DB, Table: "events", Logger: testLogger(t),
		RetentionSchedule: "@every 1s", ProcessedRetention: time.Hour, // Retention 0: keep events
	})
	require.NoError(t, err)
	defer stop()
	testenv.Eventually(t, 20*time.Second, func() bool {
		var n int
		require.NoError(t, b.db.Get(&n, `SELECT count(*) FROM processed_message`))
		return n == 0
	}, "old processed_message row deleted")
	require.Equal(t, 1, b.db.Count(t, "SUCCESS"), "published events are kept without --retention")
}

func TestHousekeepingRejectsBadSchedules(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	for name, h := range map[string]poller.Housekeeping{
		"bad cron":          {BacklogSchedule: "every minute"},
		"retention missing": {RetentionSchedule: "@every 1m"},
		"bad table":         {Table: "a;b"},
		"bad processed":     {ProcessedTable: "a;b", ProcessedRetention: time.Hour, RetentionSchedule: "@every 1m"},
	} {
		t.Run(name, func(t *testing.T) {
			h.DB = db.DB.DB
			if h.Table == "" {
				h.Table = "events"
			}
			_, err := poller.StartHousekeeping(context.Background(), h)
			require.Error(t, err)
		})
	}
}
