package poller_test

import (
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
)

// TestPauseHoldsEventsThenResumesInOrder pauses a running single leader,
// and two partitioned publishers, through the table's pause switch: events
// written meanwhile stay READY, and after resume they go out in order.
func TestPauseHoldsEventsThenResumesInOrder(t *testing.T) {
	t.Parallel()
	for _, partitions := range []int{0, 4} {
		t.Run(map[int]string{0: "single_leader", 4: "partitioned"}[partitions], func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			subject := b.prefix + ".order.changed"
			logs := &testenv.SyncBuffer{}
			cfg := fastConfig()
			cfg.Partitions = partitions
			cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
			ps := []*poller.Poller{b.start(t, cfg)}
			if partitions > 0 {
				ps = append(ps, b.start(t, cfg))
			}
			first := changes(subject, 4, 5)
			b.write(t, first...)
			testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(first) },
				"the first %d events SUCCESS", len(first))

			require.NoError(t, poller.SetPause(t.Context(), b.db.DB.DB, "", true, "ops-alice"))
			testenv.Eventually(t, 10*time.Second, func() bool {
				for _, p := range ps {
					if !p.Stats().Paused {
						return false
					}
				}
				return true
			}, "every publisher sees the pause")
			later := changes(subject, 4, 5)
			b.write(t, later...)
			// Nothing is published while paused: look for a bounded time.
			deadline := time.Now().Add(2 * time.Second)
			for time.Now().Before(deadline) {
				require.Equal(t, len(first), b.db.Count(t, "SUCCESS"), "published while paused")
				time.Sleep(100 * time.Millisecond)
			}
			require.Equal(t, len(later), b.db.Count(t, "READY"))
			require.Contains(t, logs.String(), `msg="publishing paused" by=ops-alice`)

			require.NoError(t, poller.SetPause(t.Context(), b.db.DB.DB, "", false, "ops-bob"))
			testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(first)+len(later) },
				"every event SUCCESS after resume")
			requireOnceInOrder(t, b.received(t), len(first)+len(later))
			require.Contains(t, logs.String(), `msg="publishing resumed" by=ops-bob`)
		})
	}
}
