package bench

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// A smoke test of the bench code with tiny sizes: every figure is measured
// and positive, and the round-trip proxy counts the publisher's requests.
// The figures themselves mean nothing at this size.
func TestRunTiny(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := Run(ctx, Config{DatabaseURL: testenv.DatabaseURL(), NATSURL: testenv.NATSURL(),
		Events: 300, BatchSize: 100, Entities: 10, Duration: 300 * time.Millisecond,
		WriteFor: 200 * time.Millisecond, Writers: 1, Scale: []int{1000}})
	require.NoError(t, err)
	for name, v := range map[string]float64{
		"bare": res.BareDB, "db limit": res.DBLimit, "reference": res.Reference, "drain": res.Drain,
		"drain vs reference": res.DrainVsReference, "db limit vs bare": res.DBLimitVsBare,
	} {
		require.Positive(t, v, name)
	}
	require.Len(t, res.Scale, 1)
	require.Positive(t, res.Scale[0].EventsPerSec)
	require.Positive(t, res.Scale[0].Claims.Samples, "claims timed")
	require.Positive(t, res.Scale[0].Claims.P50)
	// At least BEGIN, the claim, the mark and COMMIT.
	require.GreaterOrEqual(t, res.RoundTripsPerBatch, 4.0)
	require.GreaterOrEqual(t, res.DrainCost.PublisherUS, 0.0)
}

// Each scale scenario at a tiny size: the figures are all there and sane.
// They mean nothing at this size.
func TestScaleCasesTiny(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg := Config{DatabaseURL: testenv.DatabaseURL(), NATSURL: testenv.NATSURL(),
		Events: 500, BatchSize: 100, Entities: 10, ScaleCases: ScaleCaseNames,
		ScaleBacklog: 2000, ScaleBlocked: 200, ScaleEntities: 300, ScaleRetentionRows: 5000}.withDefaults()
	e, cleanup, err := setup(ctx, cfg)
	require.NoError(t, err)
	defer cleanup()
	sc, err := e.scaleCases(ctx)
	require.NoError(t, err)

	claimed := func(name string, s DrainStat) {
		t.Helper()
		require.Positive(t, s.EventsPerSec, name)
		require.Positive(t, s.Claims.Samples, name+": claims timed")
		require.Positive(t, s.Claims.P50, name+": claim p50")
		require.GreaterOrEqual(t, s.Claims.P99, s.Claims.P50, name)
		require.GreaterOrEqual(t, s.Claims.Max, s.Claims.P99, name)
	}
	b := sc.Backlog
	require.NotNil(t, b)
	require.Equal(t, 2000, b.Events)
	require.Equal(t, 200, b.Window)
	claimed("backlog", b.DrainStat)
	require.Positive(t, b.First)
	require.Positive(t, b.Last)
	require.InDelta(t, b.Last/b.First, b.LastVsFirst, 1e-9)

	require.NotNil(t, sc.Blocked)
	require.Equal(t, 200, sc.Blocked.Entities)
	claimed("blocked", sc.Blocked.DrainStat)
	claimed("baseline", sc.Blocked.Baseline)
	require.Positive(t, sc.Blocked.VsBaseline)

	require.NotNil(t, sc.Entities)
	require.Equal(t, 300, sc.Entities.Entities)
	claimed("entities", sc.Entities.DrainStat)
	require.Equal(t, sc.Blocked.Baseline, sc.Entities.Baseline, "one baseline for both")

	r := sc.Retention
	require.NotNil(t, r)
	claimed("without retention", r.Without)
	claimed("with retention", r.With)
	require.Positive(t, r.Deleted)
	require.LessOrEqual(t, r.Deleted, int64(5000), "only the old rows are past the retention")
	require.Positive(t, r.DeletedPerSec)

	// The chore deleted old rows only: both backlogs are still there.
	var success int64
	require.NoError(t, e.db.GetContext(ctx, &success, `SELECT count(*) FROM events WHERE event_status = 'SUCCESS'`))
	require.Equal(t, 2*500+5000-r.Deleted, success)
	js, _ := json.MarshalIndent(sc, "", " ")
	t.Logf("%s", js)
}
