package poller_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
)

// TestBlockedMeansWhatTheClaimSkips checks that status and the
// blocked-entities gauge count an entity as blocked exactly when the claim
// holds its later events back: behind a FAILED event or a retry not yet
// due, not behind a READY event whose retry is due.
func TestBlockedMeansWhatTheClaimSkips(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.write(t, ofEntities(b.prefix+".order", "due", "due", "waiting", "waiting", "failed", "failed")...)
	b.db.MustExec(`UPDATE events SET attempts = 1, available_at = now() - interval '1 second' WHERE seq = 1`)
	b.db.MustExec(`UPDATE events SET attempts = 1, available_at = now() + interval '1 hour' WHERE seq = 3`)
	b.db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 1 WHERE seq = 5`)

	st, err := poller.ReadStatus(t.Context(), b.db.DB.DB, "events", 10)
	require.NoError(t, err)
	var blocked []string
	for _, e := range st.Blocked {
		blocked = append(blocked, e.EntityID)
	}
	require.ElementsMatch(t, []string{"waiting", "failed"}, blocked, "status: blocked entities")
	require.Equal(t, 2, st.BlockedTotal, "status: blocked total")
	require.Equal(t, 2, st.Retrying, "status: both READY rows with attempts are retrying")

	m := poller.NewMetrics()
	stop, err := poller.StartHousekeeping(context.Background(), poller.Housekeeping{
		DB: b.db.DB.DB, Table: "events", Logger: testLogger(t), MetricsSchedule: "@every 1h", Metrics: m,
	})
	require.NoError(t, err)
	stop()
	require.Equal(t, 2.0, testutil.ToFloat64(m.BlockedEntities), "outbox_blocked_entities")

	// The claim agrees: the entity behind a due retry is published, the
	// others' second events wait.
	b.start(t, fastConfig())
	testenv.Eventually(t, 20*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = 'due' AND event_status = 'SUCCESS'`) == 2
	}, "both events of the entity behind a due retry published")
	require.Equal(t, 2, b.db.Int(t, `SELECT count(*) FROM events WHERE seq IN (4, 6) AND event_status = 'READY'`),
		"events behind a waiting retry and a FAILED event still wait")
}

// TestStatusEstimatesSuccessFromThePlanner checks the counts of
// ReadStatusWith with EstimateSuccess: READY and FAILED exact, SUCCESS
// from pg_class once the table was analyzed, and an exact count before.
func TestStatusEstimatesSuccessFromThePlanner(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ids := make([]string, 20)
	for i := range ids {
		ids[i] = fmt.Sprint(i)
	}
	b.write(t, ofEntities(b.prefix+".order", ids...)...)
	b.db.MustExec(`UPDATE events SET event_status = 'SUCCESS' WHERE seq <= 15`)
	b.db.MustExec(`UPDATE events SET event_status = 'FAILED' WHERE seq IN (16, 17)`)
	want := map[string]int{"READY": 3, "FAILED": 2, "SUCCESS": 15}
	opts := poller.StatusOptions{EstimateSuccess: true}

	st, err := poller.ReadStatusWith(t.Context(), b.db.DB.DB, "events", opts)
	require.NoError(t, err)
	require.False(t, st.SuccessEstimated, "a table never analyzed is counted")
	require.Equal(t, want, st.Counts)

	b.db.MustExec(`ANALYZE events`)
	b.db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data)
		VALUES (gen_random_uuid(), 'x.y', 'T', 'order', 'late', '{}')`)
	st, err = poller.ReadStatusWith(t.Context(), b.db.DB.DB, "events", opts)
	require.NoError(t, err)
	require.True(t, st.SuccessEstimated)
	require.Equal(t, 4, st.Counts["READY"], "READY is counted, not estimated")
	require.Equal(t, 2, st.Counts["FAILED"])
	require.Equal(t, 14, st.Counts["SUCCESS"], "the estimate: 20 rows as of ANALYZE less 4 READY and 2 FAILED")

	exact, err := poller.ReadStatus(t.Context(), b.db.DB.DB, "events", 10)
	require.NoError(t, err)
	require.False(t, exact.SuccessEstimated)
	require.Equal(t, 15, exact.Counts["SUCCESS"])
}
