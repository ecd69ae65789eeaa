package bench

import (
	"context"
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
	// At least BEGIN, the claim, the mark and COMMIT.
	require.GreaterOrEqual(t, res.RoundTripsPerBatch, 4.0)
	require.GreaterOrEqual(t, res.DrainCost.PublisherUS, 0.0)
}
