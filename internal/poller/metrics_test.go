package poller_test

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// histogram returns the number and sum of h's observations.
func histogram(t *testing.T, h prometheus.Histogram) (count uint64, sum float64) {
	t.Helper()
	var m dto.Metric
	require.NoError(t, h.Write(&m))
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

func TestMetricsFollowThePublishLoop(t *testing.T) {
	t.Parallel()
	b := setup(t)
	m := poller.NewMetrics()
	cfg := fastConfig()
	cfg.Metrics = m
	cfg.MaxAttempts = 2

	events := changes(b.prefix+".order", 5, 2) // 10 events a stream covers
	// No stream covers this subject: refused once (retried), then FAILED.
	events = append(events, outbox.Event{EntityType: "order", EntityID: "lost", Type: "Changed",
		Subject: "nostream" + testenv.Suffix() + ".order", Data: 1})
	b.write(t, events...)

	_, stop := b.run(t, cfg)
	testenv.Eventually(t, 20*time.Second, func() bool {
		return testutil.ToFloat64(m.Leader) == 1
	}, "outbox_leader is 1 while leading")
	testenv.Eventually(t, 20*time.Second, func() bool {
		return b.db.Count(t, "SUCCESS") == 10 && b.db.Count(t, "FAILED") == 1
	}, "10 events published and 1 FAILED")

	require.Equal(t, 10.0, testutil.ToFloat64(m.Events.WithLabelValues(poller.OutcomeSuccess)))
	require.Equal(t, 1.0, testutil.ToFloat64(m.Events.WithLabelValues(poller.OutcomeRetried)))
	require.Equal(t, 1.0, testutil.ToFloat64(m.Events.WithLabelValues(poller.OutcomeFailed)))
	n, _ := histogram(t, m.PublishLatency)
	require.EqualValues(t, 10, n, "one publish latency per acked event")
	n, _ = histogram(t, m.BatchDuration)
	require.Positive(t, n, "batch durations observed")
	_, claimed := histogram(t, m.BatchSize)
	require.GreaterOrEqual(t, claimed, 12.0, "every claim counted: 10 events once, the refused one twice")

	require.NoError(t, stop())
	require.Zero(t, testutil.ToFloat64(m.Leader), "outbox_leader is 0 once stopped")
}

func TestHousekeepingRefreshesBacklogGauges(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.write(t, ofEntities(b.prefix+".order", "a", "a", "a", "b", "b", "c")...)
	// a's first event FAILED, b's first waiting for a retry (both block
	// their entity), c's created an hour ago.
	b.db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 1 WHERE seq = 1`)
	b.db.MustExec(`UPDATE events SET attempts = 1, available_at = now() + interval '1 hour' WHERE seq = 4`)
	b.db.MustExec(`UPDATE events SET created_at = now() - interval '1 hour' WHERE seq = 6`)

	m := poller.NewMetrics()
	stop, err := poller.StartHousekeeping(context.Background(), poller.Housekeeping{
		DB: b.db.DB.DB, Table: "events", Logger: testLogger(t),
		MetricsSchedule: "@every 1s", Metrics: m,
	})
	require.NoError(t, err)
	defer stop()

	// The first refresh runs before StartHousekeeping returns.
	require.Equal(t, 5.0, testutil.ToFloat64(m.ReadyEvents))
	require.Equal(t, 1.0, testutil.ToFloat64(m.RetryingEvents))
	require.Equal(t, 1.0, testutil.ToFloat64(m.FailedEvents))
	require.Equal(t, 2.0, testutil.ToFloat64(m.BlockedEntities))
	require.GreaterOrEqual(t, testutil.ToFloat64(m.OldestReadyAge), 3600.0)
	require.InDelta(t, float64(time.Now().Unix()), testutil.ToFloat64(m.BacklogRefreshed), 60)

	b.db.MustExec(`UPDATE events SET event_status = 'SUCCESS', attempts = 0, published_at = now()`)
	testenv.Eventually(t, 20*time.Second, func() bool {
		return testutil.ToFloat64(m.ReadyEvents) == 0 && testutil.ToFloat64(m.FailedEvents) == 0
	}, "gauges refreshed on the schedule")
	require.Zero(t, testutil.ToFloat64(m.OldestReadyAge), "no READY event: age 0")
	require.Zero(t, testutil.ToFloat64(m.BlockedEntities))
	require.Zero(t, testutil.ToFloat64(m.RetryingEvents))
}

func TestHousekeepingRejectsBadMetricsSchedule(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	_, err := poller.StartHousekeeping(context.Background(), poller.Housekeeping{
		DB: db.DB.DB, Table: "events", MetricsSchedule: "often", Metrics: poller.NewMetrics(),
	})
	require.ErrorContains(t, err, `metrics schedule "often"`)
}

func TestMetricsNames(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(poller.NewMetrics()))
	families, err := reg.Gather()
	require.NoError(t, err)
	var names []string
	for _, f := range families {
		names = append(names, f.GetName())
	}
	require.ElementsMatch(t, []string{
		"outbox_events_published_total",
		"outbox_publish_latency_seconds",
		"outbox_batch_duration_seconds",
		"outbox_batch_size_events",
		"outbox_publish_backoffs_total",
		"outbox_order_violations_total",
		"outbox_leader",
		"outbox_paused",
		"outbox_partitions_held",
		"outbox_partitions_configured",
		"outbox_nats_reconnects_total",
		"outbox_database_reconnects_total",
		"outbox_ready_events",
		"outbox_retrying_events",
		"outbox_oldest_ready_age_seconds",
		"outbox_failed_events",
		"outbox_blocked_entities",
		"outbox_backlog_refresh_timestamp_seconds",
	}, names)
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	require.Empty(t, problems, "Prometheus naming conventions")
}
