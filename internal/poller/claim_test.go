package poller_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

func TestRolledBackEventsAreNeverPublished(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.start(t, fastConfig())
	ctx := context.Background()

	rolledBack, err := b.db.Beginx()
	require.NoError(t, err)
	_, err = b.w.Write(ctx, rolledBack, changes(b.prefix+".order.rolledback", 3, 2)...)
	require.NoError(t, err)
	require.NoError(t, rolledBack.Rollback())
	committed := changes(b.prefix+".order.committed", 3, 2)
	b.write(t, committed...)

	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(committed) },
		"the committed transaction's %d events SUCCESS", len(committed))
	require.Equal(t, len(committed), b.db.Int(t, `SELECT count(*) FROM events`),
		"a rolled-back transaction left rows")
	msgs := b.received(t)
	requireOnceInOrder(t, msgs, len(committed))
	for _, m := range msgs {
		require.Equal(t, b.prefix+".order.committed", m.Subject())
	}
}

// An event whose transaction commits after a later-seq event was published
// is still published: the loop keeps no high-water mark.
func TestLateCommitIsPublished(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.start(t, fastConfig())
	ctx := context.Background()

	late, err := b.db.Beginx()
	require.NoError(t, err)
	t.Cleanup(func() { _ = late.Rollback() })
	lateIDs, err := b.w.Write(ctx, late, outbox.Event{
		EntityType: "order", EntityID: "a", Type: "Created", Subject: b.prefix + ".order.a", Data: map[string]int{},
	})
	require.NoError(t, err)
	b.write(t, outbox.Event{
		EntityType: "order", EntityID: "b", Type: "Created", Subject: b.prefix + ".order.b", Data: map[string]int{},
	})
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 },
		"the early commit SUCCESS")
	var lateSeq, earlySeq int64
	require.NoError(t, b.db.Get(&earlySeq, `SELECT seq FROM events WHERE event_status = 'SUCCESS'`))

	require.NoError(t, late.Commit())
	require.NoError(t, b.db.Get(&lateSeq, `SELECT seq FROM events WHERE event_id = $1`, lateIDs[0]))
	require.Less(t, lateSeq, earlySeq, "the late transaction's event must have the lower seq")
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 2 },
		"the late commit SUCCESS")
	msgs := b.received(t)
	requireOnceInOrder(t, msgs, 2)
	require.True(t, streamIDs(msgs)[lateIDs[0].String()], "late event not in the stream")
}
