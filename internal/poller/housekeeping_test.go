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
	testenv.Eventually(t, 20*time.Second, func() bool { return b.count(t, "SUCCESS") == 100 },
		"old SUCCESS events deleted")
	require.Equal(t, 50, b.count(t, "READY"))
	require.Equal(t, 50, b.count(t, "FAILED"))
}

func TestHousekeepingRejectsBadSchedules(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	for name, h := range map[string]poller.Housekeeping{
		"bad cron":          {BacklogSchedule: "every minute"},
		"retention missing": {RetentionSchedule: "@every 1m"},
		"bad table":         {Table: "a;b"},
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
